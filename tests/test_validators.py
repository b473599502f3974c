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
