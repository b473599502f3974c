"""Module 6 (feedback): store and migrations, the router (validation, idempotency, token auth), stats window, daily
aggregates, preference export, the retrain trigger against a local stand-in for GitHub, and the UI in a real browser.
Every test runs against a PostgreSQL of its own under /tmp (never the shared workspace's), one schema per test."""
import http.server, json, os, shutil, signal, subprocess, sys, tempfile, threading, uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psutil, psycopg, pytest, yaml
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from loyaltylens import feedback as fb
from loyaltylens.core import app
from loyaltylens.generation import OfferCopy, PromptRegistry, prompt_context

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync"]


class TempPostgres:
    "A pgserver in a folder of its own under /tmp: start, SIGKILL (with its children gone), restart, stop."
    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="llfb-"))
        self.root.chmod(0o755)  # pgserver runs postgres as its own system user when we are root
        self.pgdata = self.root / "pg"

    def start(self) -> str:
        code = f"import pgserver; print(pgserver.get_server({str(self.pgdata)!r}, cleanup_mode=None).get_uri())"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, check=True)
        self.url = out.stdout.strip().splitlines()[-1]
        return self.url

    def pid(self) -> int: return int((self.pgdata / "postmaster.pid").read_text().split()[0])

    def _signal_and_wait(self, sig: int, timeout: float = 30):
        master = psutil.Process(self.pid())
        procs = [master, *master.children(recursive=True)]
        os.kill(master.pid, sig)
        _, alive = psutil.wait_procs(procs, timeout=timeout)
        assert not alive, f"postgres processes still alive after signal {sig}: {alive}"

    def kill(self): self._signal_and_wait(signal.SIGKILL)  # the postmaster; its backends notice and exit
    def stop(self):
        "Fast shutdown, then remove the folder."
        self._signal_and_wait(signal.SIGINT)
        shutil.rmtree(self.root, ignore_errors=True)


def postgres_env():
    "A throwaway PostgreSQL; LOYALTYLENS_PG_URL and LOYALTYLENS_HOME point at it and a temp folder, no API token, until it stops."
    server = TempPostgres()
    saved = {k: os.environ.get(k) for k in ("LOYALTYLENS_PG_URL", "LOYALTYLENS_HOME", "LOYALTYLENS_API_TOKEN")}
    os.environ.update(LOYALTYLENS_PG_URL=server.start(), LOYALTYLENS_HOME=str(server.root / "home"))
    os.environ.pop("LOYALTYLENS_API_TOKEN", None)
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None: os.environ.pop(k, None)
        else: os.environ[k] = v


@pytest.fixture(scope="module")
def pg():
    "One throwaway PostgreSQL for this file; module scope, so the environment is restored before the next file runs."
    yield from postgres_env()


@pytest.fixture
def schema(pg, monkeypatch) -> str:
    "A fresh schema for this test, made the configured one."
    name = f"t_{uuid.uuid4().hex[:10]}"
    monkeypatch.setenv("LOYALTYLENS_FEEDBACK_SCHEMA", name)
    return name


@pytest.fixture
def store(schema):
    with fb.open_store(schema) as conn: yield conn


CUSTOMER = dict(recency_days=3, frequency_30d=4, monetary_90d=120.0, offer_redemption_rate=0.25, channel_preference="mobile", engagement_score=0.61)
OFFER = dict(offer_id="O0001", title="Morning boost: double points on coffee", category="coffee", discount_pct=0.2, expiry_days=14, channel="mobile")


def make_pairs(n: int, versions=("v1", "v2")) -> list[dict]:
    "n pairs of hand-written copies for n customers, with the real rendered prompts of the repository's prompt versions."
    def copy(ctx, version, headline, i):
        return OfferCopy(headline=headline, body=f"Get 20% off coffee, customer {i}.", cta="Claim it", tone="friendly",
                         customer_id=ctx["customer_id"], offer_id="O0001", prompt_version=version, backend="local",
                         model="hand-written", latency_ms=1.0, prompt_tokens=1, completion_tokens=1)
    pairs = []
    for i in range(n):
        ctx = prompt_context({**CUSTOMER, "customer_id": f"C{i:08d}"}, 0.42, OFFER)
        pairs.append(fb.make_pair(ctx, copy(ctx, versions[0], "Coffee on us", i), copy(ctx, versions[1], "Double points on coffee", i)))
    return pairs


def judgement(pair: dict, **kw) -> dict:
    return {"pair_id": pair["pair_id"], "reviewer": "ana", "choice": "A", "rating_a": 4, "rating_b": 2, **kw}


# ---------------------------------------------------------------- store

def test_migration_is_versioned_and_idempotent(schema):
    with fb.connect(schema) as conn:
        results = []
        threads = [threading.Thread(target=lambda: results.append(fb.migrate(fb.connect(schema), schema))) for _ in range(3)]
        for t in threads: t.start()
        for t in threads: t.join()
        assert sorted(map(tuple, results)) == [(), (), (1, 2)]  # three processes racing: one applies, two find it done
        assert conn.execute("SELECT version FROM schema_migrations ORDER BY 1").fetchall() == [(1,), (2,)]
        assert fb.migrate(conn, schema) == []
    with pytest.raises(ValueError, match="schema"): fb.connect("x; DROP TABLE feedback")


def test_database_enforces_the_rules(store):
    p = make_pairs(1)[0]
    fb.store_pairs(store, [p])
    ok = "INSERT INTO feedback (idempotency_key, reviewer, pair_id, customer_id, offer_id, choice, rating_a, rating_b) VALUES (%s,%s,%s,%s,%s,%s,%s,%s)"
    row = lambda **kw: [kw.get("key", uuid.uuid4()), kw.get("reviewer", "ana"), p["pair_id"], kw.get("customer", p["customer_id"]),
                        "O0001", kw.get("choice", "A"), kw.get("ra", 3), 3]
    store.execute(ok, row())
    for kw, constraint in [(dict(ra=6), "feedback_rating_a_check"), (dict(choice="C"), "feedback_choice_check"),
                           (dict(reviewer=""), "feedback_reviewer_check"), (dict(customer="C99999999"), "feedback_pair_id_customer_id_offer_id_fkey")]:
        with pytest.raises(psycopg.errors.IntegrityError) as e: store.execute(ok, row(**kw))
        assert e.value.diag.constraint_name == constraint  # a judgement about another customer's pair cannot be stored


# ---------------------------------------------------------------- router

def test_post_feedback_201_replay_and_errors(store):
    p = make_pairs(1)[0]
    fb.store_pairs(store, [p])
    with TestClient(fb.feedback_app()) as client:
        key = str(uuid.uuid4())
        r = client.post("/feedback", json=judgement(p, idempotency_key=key, comment="names the discount"))
        assert r.status_code == 201, r.text
        rec = r.json()
        assert (rec["customer_id"], rec["offer_id"], rec["version_a"], rec["version_b"], rec["comment"]) == (p["customer_id"], "O0001", "v1", "v2", "names the discount")
        again = client.post("/feedback", json=judgement(p, idempotency_key=key, comment="names the discount"))
        assert (again.status_code, again.json()["id"]) == (200, rec["id"])
        assert client.post("/feedback", json=judgement(p, idempotency_key=key, choice="B")).status_code == 409
        assert client.post("/feedback", json=judgement(p, pair_id="f" * 16)).status_code == 404
        for bad, field in [(dict(rating_a=0), "rating_a"), (dict(rating_b=6), "rating_b"), (dict(choice="C"), "choice"),
                           (dict(reviewer=""), "reviewer"), (dict(reviewer="simulated-01"), "reviewer"), (dict(pair_id="../x"), "pair_id"),
                           (dict(comment="x" * 2001), "comment"), (dict(comment="a\x00b"), "comment"), (dict(idempotency_key="nope"), "idempotency_key"), (dict(extra=1), "extra")]:
            r = client.post("/feedback", json=judgement(p, **bad))
            assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", field], (bad, r.text)
        r = client.post("/feedback", content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 422
    assert store.execute("SELECT count(*) FROM feedback").fetchone()[0] == 1


def test_token_auth_both_modes(store, monkeypatch):
    p = make_pairs(1)[0]
    fb.store_pairs(store, [p])
    with TestClient(fb.feedback_app()) as client:  # no token configured: open
        assert client.post("/feedback", json=judgement(p)).status_code == 201
    monkeypatch.setenv("LOYALTYLENS_API_TOKEN", "s3cret-token")
    with TestClient(fb.feedback_app()) as client:
        assert client.post("/feedback", json=judgement(p)).status_code == 401
        assert client.post("/feedback", json=judgement(p), headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.post("/feedback", json=judgement(p), headers={"Authorization": "Bearer s3cret-token"}).status_code == 201
        assert client.get("/feedback/stats").status_code == 200  # reads stay open
    assert store.execute("SELECT count(*) FROM feedback").fetchone()[0] == 2


def test_next_pair_from_the_cache_or_503(store):
    with TestClient(fb.feedback_app()) as client:
        r = client.get("/feedback/next")
        assert r.status_code == 503 and "loyaltylens feedback pregenerate" in r.json()["detail"]
        pairs = make_pairs(2)
        fb.store_pairs(store, pairs)
        first = client.get("/feedback/next", params={"reviewer": "ana"}).json()
        assert set(first) == {"pair_id", "customer", "offer", "a", "b"} and "version" not in json.dumps(first)  # blind
        assert client.post("/feedback", json=judgement({"pair_id": first["pair_id"]})).status_code == 201
        second = client.get("/feedback/next", params={"reviewer": "ana"}).json()
        assert second["pair_id"] != first["pair_id"]  # pairs ana has not judged come first


def test_stats_honour_the_window(store):
    pairs = make_pairs(2)
    fb.store_pairs(store, pairs)
    now = datetime.now(timezone.utc)
    rows = [(pairs[0], "A", 5, 1, 1), (pairs[0], "B", 2, 4, 3), (pairs[1], "tie", 3, 3, 6), (pairs[1], "A", 1, 1, 10), (pairs[0], "A", 1, 1, 40)]
    for p, choice, ra, rb, age in rows:
        fb.record_feedback(store, fb.FeedbackIn(**judgement(p, choice=choice, rating_a=ra, rating_b=rb)), created_at=now - timedelta(days=age))
    s = fb.window_stats(store, days=7)
    close = lambda x: pytest.approx(x, abs=1e-4)  # the API rounds means to 4 decimals
    assert (s["n"], s["mean_rating"]) == (3, close((5 + 1 + 2 + 4 + 3 + 3) / 6))
    assert {g["key"]: (g["n"], g["mean_rating"]) for g in s["by_prompt_version"]} == {"v1": (3, close(10 / 3)), "v2": (3, close(8 / 3))}
    assert {(h["version"], h["wins"], h["losses"], h["ties"]) for h in s["head_to_head"]} == {("v1", 1, 1, 1), ("v2", 1, 1, 1)}
    assert sum(d["n"] for d in s["daily"]) == 3
    assert fb.window_stats(store, days=30)["n"] == 4 and fb.window_stats(store, days=366)["n"] == 5
    with TestClient(fb.feedback_app()) as client:
        assert client.get("/feedback/stats", params={"days": 7}).json()["n"] == 3
        assert client.get("/feedback/stats", params={"days": 0}).status_code == 422


def test_aggregate_cli_replaces_a_day(store):
    pairs = make_pairs(2)
    fb.store_pairs(store, pairs)
    day = datetime(2026, 3, 1, 12, tzinfo=timezone.utc)
    for i, p in enumerate(pairs * 3):
        fb.record_feedback(store, fb.FeedbackIn(**judgement(p, choice="AB"[i % 2], rating_a=1 + i % 5)), created_at=day + timedelta(minutes=i))
    runner = CliRunner()
    snap = lambda: store.execute("SELECT prompt_version, backend, offer_category, n_ratings, mean_rating, wins, losses, ties FROM feedback_daily ORDER BY 1, 2, 3").fetchall()
    r1 = runner.invoke(app, ["feedback", "aggregate", "--date", "2026-03-01"])
    assert r1.exit_code == 0, r1.output
    first = snap()
    assert sum(r[3] for r in first) == 12 and sum(r[5] for r in first) == 6
    fb.record_feedback(store, fb.FeedbackIn(**judgement(pairs[0])), created_at=day + timedelta(hours=5))  # a late row arrives
    assert runner.invoke(app, ["feedback", "aggregate", "--date", "2026-03-01"]).exit_code == 0
    assert runner.invoke(app, ["feedback", "aggregate", "--date", "2026-03-01"]).exit_code == 0
    assert sum(r[3] for r in snap()) == 14  # replaced, not appended
    bad = runner.invoke(app, ["feedback", "aggregate", "--date", "yesterday-ish"])
    assert bad.exit_code == 2 and "--date" in bad.output


# ---------------------------------------------------------------- export

def test_preference_export_formats(store, tmp_path):
    import datasets
    pairs = make_pairs(4)
    fb.store_pairs(store, pairs)
    votes = {0: ["B", "B", "A", "tie"], 1: ["tie", "tie"], 2: ["A", "B"], 3: ["A"]}  # 0: B wins; 1: only ties; 2: split; 3: A
    for k, choices in votes.items():
        for i, c in enumerate(choices): fb.record_feedback(store, fb.FeedbackIn(**judgement(pairs[k], reviewer=f"r{i}", choice=c)))
    fb.record_many(store, [(fb.FeedbackIn(**judgement(pairs[1], choice="A")), None)], simulated=True)  # simulated: left out by default
    trl = fb.export_preferences(store, "trl", tmp_path / "trl.jsonl")
    oai = fb.export_preferences(store, "openai-dpo", tmp_path / "oai.jsonl")
    assert len(trl) == len(oai) == 2
    by_prompt = {t["prompt"]: t for t in trl}
    assert set(by_prompt) == {pairs[0]["b"]["prompt"], pairs[3]["a"]["prompt"]}  # the real rendered prompt of the chosen copy
    assert json.loads(by_prompt[pairs[0]["b"]["prompt"]]["chosen"]) == pairs[0]["b"]["copy"]
    assert json.loads(by_prompt[pairs[0]["b"]["prompt"]]["rejected"]) == pairs[0]["a"]["copy"]
    for line in (tmp_path / "oai.jsonl").read_text().splitlines():
        x = fb.OpenAIPreference(**json.loads(line))
        assert x.input["messages"][0].role == "system" and x.preferred_output[0].role == "assistant"
    assert json.loads((tmp_path / "oai.jsonl").read_text().splitlines()[0])["input"]["messages"] == pairs[0]["b"]["messages"]
    ds = datasets.load_dataset("json", data_files=str(tmp_path / "trl.jsonl"), split="train")
    assert ds.column_names == ["prompt", "chosen", "rejected"] and ds.num_rows == 2
    assert len(fb.export_preferences(store, "trl", include_simulated=True)) == 3
    with TestClient(fb.feedback_app()) as client:
        r = client.get("/feedback/export", params={"format": "openai-dpo"})
        assert r.status_code == 200 and [json.loads(l) for l in r.text.splitlines()] == oai
        assert client.get("/feedback/export", params={"format": "csv"}).status_code == 422
    out = CliRunner().invoke(app, ["feedback", "export", "--format", "trl", "--out", str(tmp_path / "cli.jsonl")])
    assert out.exit_code == 0 and (tmp_path / "cli.jsonl").read_text() == (tmp_path / "trl.jsonl").read_text()
    assert CliRunner().invoke(app, ["feedback", "export", "--format", "csv", "--out", str(tmp_path / "x")]).exit_code == 2


# ---------------------------------------------------------------- trigger

class _Recorder(http.server.BaseHTTPRequestHandler):
    received: list = []
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(dict(path=self.path, auth=self.headers["Authorization"], body=json.loads(body)))
        self.send_response(204); self.end_headers()
    def log_message(self, *a): pass


@pytest.fixture
def github(monkeypatch):
    "A local stand-in for GitHub's API that records every request."
    _Recorder.received = []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    monkeypatch.setenv("GITHUB_API_URL", f"http://127.0.0.1:{srv.server_port}")
    monkeypatch.setenv("GITHUB_REPOSITORY", "acme/loyaltylens")
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_test_token")
    yield _Recorder.received
    srv.shutdown()


def test_trigger_dispatches_once_per_window(store, github, monkeypatch):
    active = PromptRegistry().active_version()
    pairs = make_pairs(3, versions=(active, "v1"))  # the active version on side A
    fb.store_pairs(store, pairs)
    for i in range(12): fb.record_feedback(store, fb.FeedbackIn(**judgement(pairs[i % 3], reviewer=f"r{i}", choice="B", rating_a=2, rating_b=4)))
    runner = CliRunner()
    quiet = runner.invoke(app, ["feedback", "trigger", "--min-records", "50"])  # 12 records < 50: no evidence, no action
    assert quiet.exit_code == 0 and json.loads(quiet.output)["dispatched"] is False and github == []
    dry = runner.invoke(app, ["feedback", "trigger", "--dry-run", "--min-records", "10"])
    assert dry.exit_code == 0 and json.loads(dry.output)["request"] and github == []
    assert "ghp_test_token" not in dry.output
    first = runner.invoke(app, ["feedback", "trigger", "--min-records", "10"])
    assert first.exit_code == 0 and json.loads(first.output)["dispatched"] is True, first.output
    second = runner.invoke(app, ["feedback", "trigger", "--min-records", "10"])
    assert json.loads(second.output)["dispatched"] is False and "already dispatched" in json.loads(second.output)["skipped"]
    assert len(github) == 1
    req = github[0]
    assert req["path"] == "/repos/acme/loyaltylens/actions/workflows/retrain.yml/dispatches" and req["auth"] == "Bearer ghp_test_token"
    inputs = req["body"]["inputs"]
    assert req["body"]["ref"] == "main" and inputs["prompt_version"] == active and inputs["n_records"] == "12"
    assert float(inputs["mean_rating"]) == 2.0 and float(inputs["loss_rate"]) == 1.0 and "mean rating" in inputs["reason"]
    wf = yaml.safe_load((ROOT / ".github/workflows/retrain.yml").read_text())
    declared = wf[True]["workflow_dispatch"]["inputs"] if True in wf else wf["on"]["workflow_dispatch"]["inputs"]
    assert set(declared) == set(inputs)  # the workflow accepts exactly what the trigger sends
    store.execute("DELETE FROM retrain_dispatch")
    monkeypatch.delenv("GITHUB_TOKEN")
    broken = runner.invoke(app, ["feedback", "trigger", "--min-records", "10"])
    assert broken.exit_code == 1 and "GITHUB_TOKEN" in broken.output


def test_retrain_workflow_runs_the_prompt_side_only():
    "What retrain.yml runs (tests/test_workflows.py lints it with actionlint): the eval gate and the preference export, never model training."
    text = (ROOT / ".github/workflows/retrain.yml").read_text()
    assert "loyaltylens eval gate --prompt" in text and "loyaltylens feedback export --format trl" in text and "upload-artifact" in text
    assert "loyaltylens model" not in text  # copy ratings never retrain the propensity model


# ---------------------------------------------------------------- browser

@pytest.fixture
def served(store, schema):
    "feedback_app under uvicorn as a real process on loopback, with two pairs in the store."
    if not (fb.ui_dir() / "index.html").exists(): pytest.skip("the UI is not built: run `cd ui && npm ci && npm run build` (make install does)")
    if not Path(CHROMIUM).exists(): pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)")
    fb.store_pairs(store, make_pairs(2))
    port = fb.free_port()
    proc = fb.start_server(port, {"LOYALTYLENS_FEEDBACK_SCHEMA": schema})
    yield SimpleServer(proc, port)
    if proc.poll() is None: proc.kill()
    proc.wait()


class SimpleServer:
    def __init__(self, proc, port): self.proc, self.port, self.url = proc, port, f"http://127.0.0.1:{port}"


def _browser():
    from playwright.sync_api import sync_playwright
    pw = sync_playwright().start()
    return pw, pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def test_browser_rates_a_pair_and_the_row_is_stored(served, store):
    pw, browser = _browser()
    try:
        page = browser.new_page()
        page.goto(f"{served.url}/ui/")
        page.get_by_label("Reviewer").fill("browser-tester")
        page.get_by_role("article", name="Copy A").wait_for()
        assert "coffee" in page.get_by_role("region", name="Offer").inner_text()
        page.get_by_role("article", name="Copy A").click()  # focus leaves the text field: shortcuts are live
        page.keyboard.press("b")  # B is better
        page.keyboard.press("Digit2")  # copy A: 2 stars
        page.get_by_label("Copy B: 5 stars").check()  # copy B by the labelled control
        page.get_by_label("Comment (optional)").fill("B names the category")
        page.get_by_role("button", name="Submit rating").click()
        status = page.get_by_role("status")
        status.wait_for()
        assert "Saved as feedback #" in status.inner_text()
        row = store.execute("SELECT reviewer, choice, rating_a, rating_b, comment, simulated FROM feedback").fetchall()
        assert row == [("browser-tester", "B", 2, 5, "B names the category", False)]
        page.get_by_role("button", name="7-day trends").click()
        page.get_by_role("table", name="Mean rating per prompt version").wait_for()
        assert "1 ratings" in page.get_by_role("region", name="Trends of the last 7 days").inner_text()
    finally:
        browser.close(); pw.stop()


def test_browser_shows_the_error_state_when_the_api_is_down(served, store):
    pw, browser = _browser()
    try:
        page = browser.new_page()
        page.goto(f"{served.url}/ui/")
        page.get_by_label("Reviewer").fill("offline-tester")
        page.get_by_role("article", name="Copy A").wait_for()
        page.get_by_role("article", name="Copy A").click()
        page.keyboard.press("a"); page.keyboard.press("Digit4"); page.keyboard.press("Shift+Digit3")
        served.proc.send_signal(signal.SIGKILL); served.proc.wait()  # the API goes away
        page.keyboard.press("Control+Enter")
        alert = page.get_by_role("alert")
        alert.wait_for()
        assert "Not saved" in alert.inner_text() and "unreachable" in alert.inner_text()
        assert page.get_by_role("button", name="Submit rating").is_enabled()  # answers kept: the reviewer can retry
    finally:
        browser.close(); pw.stop()
    assert store.execute("SELECT count(*) FROM feedback").fetchone()[0] == 0
