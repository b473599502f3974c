"""Access (issue 16): `loyaltylens serve` binds 127.0.0.1 by default; with LOYALTYLENS_API_TOKEN set every
state-changing endpoint of the one app answers 401 without the Bearer token or with a wrong one, while GET endpoints
stay open; CORS is closed unless LOYALTYLENS_CORS_ORIGINS lists the origin. Both modes, in process (TestClient on
`create_app`) and against a real `serve` process."""
import inspect, shutil

import httpx
import pytest
from fastapi.testclient import TestClient

from loyaltylens.pipeline import create_app, serve_cmd, serve_process, stop_process

TOKEN = "test-token-8c1f"  # a made-up token for these tests
OPEN_ORIGIN, OTHER_ORIGIN = "http://dashboard.example", "http://elsewhere.example"
READ_METHODS = {"GET", "HEAD", "OPTIONS"}


@pytest.fixture
def prompts_copy(tmp_path, root, monkeypatch):
    "A copy of prompts/ for anything that might activate a version."
    dst = tmp_path / "prompts"
    shutil.copytree(root / "prompts", dst, ignore=shutil.ignore_patterns("*.lock"))
    monkeypatch.setenv("LOYALTYLENS_PROMPTS_DIR", str(dst))
    return dst


def write_routes(app) -> list[tuple[str, str]]:
    "(method, path) of every state-changing route the app documents, path parameters filled with an invalid value."
    return sorted((m.upper(), path.replace("{customer_id}", "not%20an%20id")) for path, ops in app.openapi()["paths"].items()
                  for m in ops if m.upper() not in READ_METHODS)


def test_every_write_needs_the_token(monkeypatch, prompts_copy):
    monkeypatch.setenv("LOYALTYLENS_API_TOKEN", TOKEN)
    monkeypatch.setenv("LOYALTYLENS_LLM_BACKEND", "openai"); monkeypatch.setenv("OPENAI_API_KEY", "")  # never generate
    app = create_app()
    writes = write_routes(app)
    assert {("POST", "/feedback"), ("POST", "/llmops/prompts/activate")} <= set(writes), writes
    with TestClient(app) as c:
        for method, path in writes:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):  # none, wrong, not "Bearer"
                r = c.request(method, path, headers=headers, json={})
                assert r.status_code == 401, (method, path, headers, r.status_code, r.text)
                assert r.headers.get("www-authenticate") == "Bearer"
            # the right token passes the gate: the malformed request is then rejected by validation (422), or by the 503 of an
            # artefact this workspace has not built (a fresh CI workspace), and nothing ran
            r = c.request(method, path, headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}, content=b"{")
            assert r.status_code == 422 or (r.status_code == 503 and "run `loyaltylens" in r.text), (method, path, r.status_code, r.text)
    assert (prompts_copy / "active.yaml").read_bytes() == (prompts_copy.parent / "prompts" / "active.yaml").read_bytes()


def test_reads_stay_open_with_a_token(monkeypatch, prompts_copy):
    monkeypatch.setenv("LOYALTYLENS_API_TOKEN", TOKEN)
    with TestClient(create_app()) as c:
        for path in ("/health", "/llmops/prompts", "/openapi.json"):
            assert c.get(path).status_code == 200, path


def test_without_a_token_writes_are_open(monkeypatch, prompts_copy):
    "The other mode: no token configured, so the gate lets writes through to validation."
    monkeypatch.delenv("LOYALTYLENS_API_TOKEN", raising=False)
    with TestClient(create_app()) as c:
        assert c.post("/llmops/prompts/activate", json={}).status_code == 422


def test_cors_closed_unless_configured(monkeypatch):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    monkeypatch.delenv("LOYALTYLENS_CORS_ORIGINS", raising=False)
    with TestClient(create_app()) as c:
        for origin in (OPEN_ORIGIN, OTHER_ORIGIN):
            r = c.options("/feedback", headers={"Origin": origin, **preflight})
            assert "access-control-allow-origin" not in r.headers, r.headers
            assert "access-control-allow-origin" not in c.get("/health", headers={"Origin": origin}).headers
    monkeypatch.setenv("LOYALTYLENS_CORS_ORIGINS", OPEN_ORIGIN)
    with TestClient(create_app()) as c:
        r = c.options("/feedback", headers={"Origin": OPEN_ORIGIN, **preflight})
        assert r.headers.get("access-control-allow-origin") == OPEN_ORIGIN, r.headers
        r = c.options("/feedback", headers={"Origin": OTHER_ORIGIN, **preflight})
        assert "access-control-allow-origin" not in r.headers, r.headers


def listening_addresses(port: int) -> set[str]:
    "Local IPv4 addresses with a socket listening on `port` (from /proc/net/tcp: state 0A = LISTEN)."
    out = set()
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr, p = local.split(":")
        if int(p, 16) == port and state == "0A": out.add(".".join(str(int(addr[i:i + 2], 16)) for i in (6, 4, 2, 0)))
    return out


def test_serve_binds_loopback_and_gates_writes(tmp_path, root):
    "A real `serve` process with a token: bound to 127.0.0.1 only, writes 401 without the token, reads open."
    assert inspect.signature(serve_cmd).parameters["host"].default.default == "127.0.0.1"
    prompts = tmp_path / "prompts"
    shutil.copytree(root / "prompts", prompts, ignore=shutil.ignore_patterns("*.lock"))
    before = (prompts / "active.yaml").read_bytes()
    proc, url = serve_process({"LOYALTYLENS_SMOKE": "1", "LOYALTYLENS_API_TOKEN": TOKEN, "LOYALTYLENS_PROMPTS_DIR": str(prompts),
                               "LOYALTYLENS_CORS_ORIGINS": ""})
    try:
        assert listening_addresses(int(url.rsplit(":", 1)[1])) == {"127.0.0.1"}
        body = {"version": "v1", "note": "access test"}
        assert httpx.post(f"{url}/llmops/prompts/activate", json=body).status_code == 401
        assert httpx.post(f"{url}/llmops/prompts/activate", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert httpx.post(f"{url}/feedback", json={}).status_code == 401
        assert (prompts / "active.yaml").read_bytes() == before  # nothing was activated
        assert httpx.get(f"{url}/llmops/prompts").status_code == 200
        r = httpx.options(f"{url}/feedback", headers={"Origin": OTHER_ORIGIN, "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in r.headers
    finally: stop_process(proc)


def test_non_loopback_host_needs_a_token(monkeypatch):
    "`serve --host 0.0.0.0` without LOYALTYLENS_API_TOKEN refuses to start (exit 2, naming the variable); loopback names are accepted."
    from typer.testing import CliRunner
    from loyaltylens.core import app as cli
    from loyaltylens.pipeline import is_loopback
    monkeypatch.delenv("LOYALTYLENS_API_TOKEN", raising=False)
    r = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0", "--port", "1"])
    assert r.exit_code == 2 and "LOYALTYLENS_API_TOKEN" in r.output, r.output
    assert [is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "127.0.0.2", "0.0.0.0", "192.168.1.5", "example.com")] == [True] * 4 + [False] * 3


def test_customer_data_reads_need_the_token(monkeypatch, prompts_copy):
    "With a token set: customer features and the preference export are 401 without it, a non-ASCII header is a 401 (never a 500), health stays open."
    monkeypatch.setenv("LOYALTYLENS_API_TOKEN", TOKEN)
    monkeypatch.setenv("LOYALTYLENS_SMOKE", "1")
    with TestClient(create_app()) as c:
        for path in ("/features/C00000001", "/feedback/export?format=trl"):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer tést-token".encode()}, {"Authorization": b"Bearer \xff\xfe"}):
                r = c.get(path, headers=headers)
                assert r.status_code == 401, (path, headers, r.status_code, r.text)
            assert c.get(path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code != 401, path
        assert c.get("/health").status_code == 200
        doc = c.get("/openapi.json").json()
        guarded = {(m.upper(), p) for p, ops in doc["paths"].items() for m, op in ops.items() if op.get("security")}
        assert {("GET", "/features/{customer_id}"), ("GET", "/feedback/export"), ("POST", "/feedback")} <= guarded, guarded
        assert ("GET", "/health") not in guarded and ("GET", "/features/versions") not in guarded


def test_non_ascii_authorization_on_a_real_server(tmp_path, root):
    "Raw non-ASCII bytes in the Authorization header of a real `serve` process: 401 on every guarded route, never a 500."
    proc, url = serve_process({"LOYALTYLENS_SMOKE": "1", "LOYALTYLENS_API_TOKEN": TOKEN, "LOYALTYLENS_CORS_ORIGINS": ""})
    try:
        for method, path in (("GET", "/features/C00000001"), ("GET", "/feedback/export?format=trl"), ("POST", "/feedback"),
                             ("POST", "/llmops/prompts/activate"), ("POST", "/pipeline/C00000001")):
            r = httpx.request(method, f"{url}{path}", headers={"Authorization": b"Bearer \xc3\xa9\xff"}, json={})
            assert r.status_code == 401, (method, path, r.status_code, r.text)
    finally: stop_process(proc)
