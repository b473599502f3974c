"""Secrets (issue 16): keys and tokens come only from the environment and never leave it — not in the CLI's output or
errors, not in the app's responses or logs, not in any file written. Plus `detect-secrets` over the tree, against a
committed baseline whose every entry is a known false positive (explained in FALSE_POSITIVES)."""
import json, logging, os, subprocess, sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

SECRETS = {  # made-up values, each unique enough that finding it anywhere means it leaked
    "OPENAI_API_KEY": "sk-fake-OPENAI-7f3a9c2e",
    "LOYALTYLENS_API_TOKEN": "tok-fake-API-51d2b8",
    "GITHUB_TOKEN": "ghp_fakeGITHUB0c41e9",
    "pg password": "pgpass-fake-93b1",
    "mlflow password": "mlpass-fake-88e0",
}
FAKE_ENV = {"OPENAI_API_KEY": SECRETS["OPENAI_API_KEY"], "LOYALTYLENS_API_TOKEN": SECRETS["LOYALTYLENS_API_TOKEN"],
            "GITHUB_TOKEN": SECRETS["GITHUB_TOKEN"],
            "LOYALTYLENS_PG_URL": f"postgresql://ll:{SECRETS['pg password']}@127.0.0.1:1/none?connect_timeout=2",
            "MLFLOW_TRACKING_URI": f"http://ml:{SECRETS['mlflow password']}@127.0.0.1:1", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
            "OPENAI_BASE_URL": "http://127.0.0.1:1/v1",  # nothing listens: the OpenAI call fails at once
            "LOYALTYLENS_LLM_BACKEND": "openai"}
# detect-secrets findings that are not secrets (the baseline holds their hashes; a new finding fails the scan):
FALSE_POSITIVES = {
    "loyaltylens/core.py": "the docstring of mask_credentials names the `scheme://user:password@` form it masks",
    "nbs/00_core.ipynb": "the lesson on masking credentials shows made-up URLs such as postgresql://user:secret@host/db",
    "tests/test_core.py": "made-up credentials the masking tests expect to see masked",
    "tests/test_features.py": "pinned content hashes of the generated world (a regression pin, not a key)",
    "tools/docs/build.py": "the sha512 subresource-integrity hash of the pinned mermaid script",
    "tests/test_secrets.py": "this file's made-up keys (SECRETS), set so the test can look for them",
}


def leaks(text: str) -> list[str]:
    return [name for name, value in SECRETS.items() if value in text]


def run_cli(*args, env: dict, timeout: int = 180) -> str:
    out = subprocess.run([sys.executable, "-c", "from loyaltylens.core import main; main()", *args],  # noqa: S603 -- fixed argv
                         env=env, capture_output=True, text=True, timeout=timeout)
    return f"exit {out.returncode}\n{out.stdout}\n{out.stderr}"


def test_cli_never_prints_or_writes_a_secret(tmp_path):
    "doctor, and commands that fail fast on a fresh workspace; then every file under that workspace."
    env = {**os.environ, **FAKE_ENV, "LOYALTYLENS_HOME": str(tmp_path / "home"), "LOYALTYLENS_PROMPTS_DIR": str(tmp_path / "none")}
    outputs = {cmd: run_cli(*cmd.split(), env=env) for cmd in
               ("doctor", "pipeline run C00000001 --smoke --json", "copy generate C00000001 O0001 --smoke --backend openai",
                "prompt list")}
    for cmd, text in outputs.items(): assert not leaks(text), (cmd, leaks(text), text[-2000:])
    assert "***" in outputs["doctor"], outputs["doctor"][-2000:]  # the URLs with passwords were shown, masked
    written = [p for p in (tmp_path / "home").rglob("*") if p.is_file()]
    for p in written: assert not leaks(p.read_bytes().decode("utf-8", "replace")), p


def test_app_never_returns_or_logs_a_secret(monkeypatch, caplog):
    "The one app with every key set: /health, the OpenAPI document, a refused write, a copy request that fails upstream."
    for k, v in FAKE_ENV.items(): monkeypatch.setenv(k, v)
    monkeypatch.setenv("LOYALTYLENS_SMOKE", "1")
    from loyaltylens.pipeline import create_app
    caplog.set_level(logging.DEBUG)
    with TestClient(create_app(), raise_server_exceptions=False) as c:
        responses = [c.get("/health"), c.get("/openapi.json"), c.get("/llmops/prompts"),
                     c.post("/llmops/prompts/activate", json={"version": "v1", "note": "x"}, headers={"Authorization": "Bearer wrong"}),
                     c.post("/copy/generate", json={"customer_id": "C00000001", "offer_id": "O0001"},
                            headers={"Authorization": f"Bearer {SECRETS['LOYALTYLENS_API_TOKEN']}"})]
    for r in responses:
        assert r.status_code < 500 or r.status_code in (502, 503), (r.request.url, r.status_code, r.text)
        assert not leaks(r.text + json.dumps(dict(r.headers))), (r.request.url, leaks(r.text), r.text)
    assert not leaks(caplog.text), leaks(caplog.text)


def scanned_files(root: Path) -> list[str]:
    "Tracked files plus new ones not ignored (work not committed yet is scanned too)."
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=root,  # noqa: S603, S607 -- fixed argv
                         capture_output=True, text=True, check=True).stdout.split("\n")
    return [f for f in out if f and f != ".secrets.baseline" and (root / f).is_file()]


def test_detect_secrets_finds_nothing_new(root):
    exe = Path(sys.executable).parent / "detect-secrets"
    if not exe.exists(): pytest.skip(f"detect-secrets is not installed in {exe.parent} (it is a dev dependency)")
    out = subprocess.run([str(exe), "scan", *scanned_files(root)], cwd=root, capture_output=True, text=True, timeout=300)  # noqa: S603
    assert out.returncode == 0, out.stderr
    found = {(f, s["type"], s["hashed_secret"]) for f, ss in json.loads(out.stdout)["results"].items() for s in ss}
    known = {(f, s["type"], s["hashed_secret"]) for f, ss in json.loads((root / ".secrets.baseline").read_text())["results"].items() for s in ss}
    assert not found - known, f"new possible secrets (remove them, or add a false positive to the baseline and FALSE_POSITIVES): {sorted(found - known)}"
    assert {f for f, _, _ in known} <= set(FALSE_POSITIVES), "every baseline entry is explained in FALSE_POSITIVES"
