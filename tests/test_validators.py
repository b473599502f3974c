"""Names and paths (issue 16): every user-supplied version name, prompt version and id is checked against a pattern
at the boundary. Property tests (hypothesis) over those patterns: whatever they accept is one safe path component and
one safe URL segment — no separator, no traversal, no NUL or control character, nothing oversized — and what the
HTTP boundary rejects is a 4xx naming the field, never a 5xx."""
import re, shutil
import string

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings, strategies as st

from loyaltylens import features, generation, pipeline, retrieval
from loyaltylens.feedback import SCHEMA_PATTERN

VALIDATORS = {  # name -> the pattern the boundary applies (fullmatch)
    "feature version": features._VERSION_RE.pattern,
    "customer id (features router)": features._ID_PATTERN,
    "customer id (pipeline router)": pipeline.ID_PATTERN,
    "customer id (offers router)": retrieval.RetrieveRequest.model_fields["customer_id"].metadata[0].pattern,
    "prompt version": f"^{generation.VERSION_RE}$",
    "feedback schema": SCHEMA_PATTERN,
    "pgvector table": f"^{retrieval.TABLE_PATTERN}$",
}
MAX_NAME = 64  # the longest name any of them accepts
ATTACKS = ["..", "../x", "..%2Fx", "/etc/passwd", "a/b", "a\\b", "a\x00b", "x" * 65, " a", "a\n", "~root", ".hidden", "-rf", "%00"]


def safe_component(s: str) -> bool:
    "A name that is one path component and one URL segment: no separator, no dot-only or dot-led name, printable ASCII."
    return (0 < len(s) <= MAX_NAME and not s.startswith((".", "-")) and all(c in string.ascii_letters + string.digits + "_.-" for c in s))


@pytest.mark.parametrize("name", VALIDATORS)
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(s=st.one_of(st.text(max_size=80), st.text(alphabet=string.ascii_letters + string.digits + "_.-/\\\x00 ~%", max_size=80),
                   st.sampled_from(ATTACKS)))
def test_accepted_names_are_safe_components(name, s):
    if re.fullmatch(VALIDATORS[name], s): assert safe_component(s), (name, s)


@pytest.mark.parametrize("name", VALIDATORS)
def test_known_attacks_are_rejected(name):
    accepted = [a for a in ATTACKS if re.fullmatch(VALIDATORS[name], a)]
    assert not accepted, (name, accepted)


@pytest.mark.parametrize("name", VALIDATORS)
@settings(max_examples=100, deadline=None)
@given(s=st.from_regex(r"\A[a-z][a-z0-9]{0,20}\Z"))
def test_ordinary_names_still_pass(name, s):
    "The patterns are not so tight that plain names fail (prompt versions have their own shape: v<digits>[-slug])."
    s = f"v{len(s)}-{s}" if name == "prompt version" else s
    assert re.fullmatch(VALIDATORS[name], s), (name, s)


def test_prompt_registry_refuses_traversal(tmp_path):
    reg = generation.PromptRegistry(tmp_path)
    for v in ("../active", "/etc/passwd", "v1/../../x", "v1\x00", "v" + "1" * 100 + "/"):
        with pytest.raises(generation.UnknownPromptVersion): reg.load(v)


@pytest.fixture(scope="module")
def client(tmp_path_factory, root):
    "The one app, activating versions of a copy of prompts/ (never the repository's), SMOKE world."
    prompts = tmp_path_factory.mktemp("validators") / "prompts"
    shutil.copytree(root / "prompts", prompts, ignore=shutil.ignore_patterns("*.lock"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOYALTYLENS_PROMPTS_DIR", str(prompts)); mp.setenv("LOYALTYLENS_SMOKE", "1"); mp.delenv("LOYALTYLENS_API_TOKEN", raising=False)
        with TestClient(pipeline.create_app(), raise_server_exceptions=False) as c: yield c


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(s=st.one_of(st.sampled_from(ATTACKS), st.text(min_size=1, max_size=300)))
def test_http_boundary_rejects_with_4xx(client, s):
    "Hostile versions and ids at the HTTP boundary: 4xx (422 naming the field), never 5xx, never a file outside."
    for r in (client.get("/features/stats", params={"version": s}),
              client.get("/llmops/evals/latest", params={"version": s}),
              client.post("/llmops/prompts/activate", json={"version": s, "note": "validator test"}),
              client.post("/offers/retrieve", json={"customer_id": s})):
        assert r.status_code < 500 or r.status_code == 503, (r.request.url, s, r.status_code, r.text)
        if r.status_code == 422: assert "version" in r.text or "customer_id" in r.text, r.text


# --- paths typed on the command line -------------------------------------------------------------------------------
import functools, inspect, typing
from pathlib import Path

from typer.models import ArgumentInfo, OptionInfo
from typer.testing import CliRunner

from loyaltylens import core

A_FILE = str(Path(__file__).resolve().parents[1] / "pyproject.toml")  # an existing file on every machine (not /etc/hostname: macOS has none)


def cli_commands(typer_app, prefix=()):
    "(command path, callback) of every command registered on `typer_app` and its groups."
    for c in typer_app.registered_commands: yield (*prefix, c.name or c.callback.__name__), c.callback
    for g in typer_app.registered_groups: yield from cli_commands(g.typer_instance, (*prefix, g.name))


def path_parameters():
    "(command, parameter, default) of every CLI parameter annotated with Path, after every module registered its commands."
    import loyaltylens
    for mod in sorted(m.name for m in __import__("pkgutil").iter_modules(loyaltylens.__path__)):
        if not mod.startswith("_"): __import__(f"loyaltylens.{mod}")
    for name, fn in cli_commands(core.app):
        hints = typing.get_type_hints(fn)
        for p in inspect.signature(fn).parameters.values():
            if Path in (hints.get(p.name), *typing.get_args(hints.get(p.name))): yield " ".join(name), p.name, p.default


def test_every_cli_path_is_checked():
    "A Path parameter declared without `path_option`/`path_argument` would skip `checked_path`: name each one."
    params = list(path_parameters())
    assert len(params) >= 10, params  # the walk found the CLI's paths (features, propensity, llmops, feedback, deploy, bench)
    unchecked = [(cmd, name) for cmd, name, default in params
                 if not (isinstance(default, (OptionInfo, ArgumentInfo)) and isinstance(default.parser, functools.partial)
                         and default.parser.func is core.checked_path)]
    assert not unchecked, unchecked


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(st.text(max_size=300), st.sampled_from(["a\x00b", "x" * 5000, "/".join(["y" * 256] * 2), f"{A_FILE}/x", "~0", "~no-such-user/x"])),
       role=st.sampled_from(core.PATH_ROLES))
def test_accepted_paths_are_openable_names(text, role):
    "Whatever `checked_path` accepts has no NUL or control character and fits the system's limits."
    try: path = core.checked_path(text, role)
    except __import__("typer").BadParameter: return
    assert not any(ord(c) < 32 or ord(c) == 127 for c in text), text
    assert len(text) <= core.MAX_PATH_CHARS and all(len(p) <= core.MAX_NAME_CHARS for p in path.parts), text


def test_unreadable_path_is_refused_not_raised(monkeypatch):
    "A folder the user may not look into (EACCES) is a bad parameter naming the reason, not a traceback."
    def refuse(self, *a, **k): raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(Path, "stat", refuse)
    with pytest.raises(__import__("typer").BadParameter, match="Permission denied"): core.checked_path("/root/private/x", "input")


@pytest.mark.parametrize("args, says", [
    (["bench", "all", "--out", A_FILE], "is a file; give a folder"),
    (["feedback", "export", "--format", "trl", "--out", f"{A_FILE}/prefs.jsonl"], "nothing can be written under it"),
    (["feedback", "export", "--format", "trl", "--out", "/tmp"], "is a folder; give a file name"),
    (["features", "build", "--as-of", "2024-01-01", "--events", "/no/such/world"], "no such file or folder"),
    (["data", "generate", "--out", "x" * 300], "the limit is 255"),
])
def test_cli_refuses_bad_paths_before_running(args, says, tmp_path, monkeypatch):
    "Exit 2 naming the option and the problem, and nothing written (the workspace stays empty)."
    monkeypatch.setenv("LOYALTYLENS_HOME", str(tmp_path / "ws"))
    r = CliRunner().invoke(core.app, args)
    assert r.exit_code == 2 and says in r.output and "Invalid value for '--" in r.output, (r.exit_code, r.output)
    assert not (tmp_path / "ws").exists() or not any((tmp_path / "ws").rglob("*")), list((tmp_path / "ws").rglob("*"))
