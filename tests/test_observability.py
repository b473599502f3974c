"""Observability (notebook 07b): /metrics after a burst of mixed requests counts exactly what was sent, per route
template and status, with no customer id in any label; a pipeline call is one trace whose stage spans cover its wall
time and whose LLM span's token counts equal llama.cpp's own counters; spans reach an OTLP/HTTP receiver; the alert
rules pass promtool's unit tests; /metrics is token-protected when a token is set; the dashboard's live, trace and feedback
panels render from a running app, its trace file and a feedback store, and say what is absent when they are not there."""
import re, secrets, shutil, subprocess, sys, threading, time
from collections import Counter
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from loyaltylens import observability as obs
from loyaltylens.pipeline import LoyaltyLensPipeline, MissingArtefact, create_app

TOKEN = "metrics-token-5d2e"  # a made-up token for these tests


@pytest.fixture(scope="module")
def pipeline():
    "The SMOKE world's pipeline with in-memory offers, or a skip naming the command that builds it."
    try: return LoyaltyLensPipeline(True, "memory", "local")
    except MissingArtefact as e: pytest.skip(str(e))


@pytest.fixture
def smoke_env(monkeypatch):
    monkeypatch.setenv("LOYALTYLENS_SMOKE", "1"); monkeypatch.setenv("LOYALTYLENS_STORE_BACKEND", "memory")
    monkeypatch.setenv("LOYALTYLENS_LLM_BACKEND", "local"); monkeypatch.delenv("LOYALTYLENS_API_TOKEN", raising=False)


def test_metrics_count_a_burst_by_route_and_status(pipeline, smoke_env):
    ids = pipeline.sample_customers(10)
    eligible = next(c for c in ids if pipeline.run_for_customer(c, copy=False).offers)
    rows = pipeline.store.get_many(ids, pipeline.snapshot()[0])[["recency_days", "frequency_30d", "monetary_90d", "offer_redemption_rate",
                                                                   "channel_preference", "engagement_score"]].to_dict("records")
    burst = ([("GET", f"/features/{c}", None) for c in ids] + [("GET", "/features/C99999999", None)]
             + [("POST", "/propensity/predict", r) for r in rows] + [("POST", "/propensity/predict", {"recency_days": "x"})]
             + [("POST", f"/pipeline/{c}?copy=false", None) for c in ids] + [("POST", f"/pipeline/{eligible}", None)]
             + [("GET", f"/no/such/{c}", None) for c in ids] + [("BREW", "/features/x", None)] + [("POST", "/feedback", {"rating": "bad"})])
    with TestClient(create_app()) as client:
        sent = Counter()
        for method, path, body in burst:
            status = client.request(method, path, json=body).status_code
            sent[(method, path, status)] += 1
        text = client.get("/metrics").text
    df = obs.scrape(text)
    template = lambda p: ("/features/{customer_id}" if p.startswith("/features/") else "/pipeline/{customer_id}" if p.startswith("/pipeline/") else
                          "/propensity/predict" if p.startswith("/propensity") else "/feedback" if p == "/feedback" else obs.UNMATCHED)
    expected = Counter()
    for (method, path, status), n in sent.items(): expected[(method if method in obs.METHODS else "other", template(path), str(status))] += n
    reqs = df[df.name == "loyaltylens_http_requests_total"]
    got = Counter({(l["method"], l["route"], l["status"]): int(v) for l, v in zip(reqs.labels, reqs.value)})
    assert got == expected, (got, expected)
    for (method, route, status), n in expected.items():
        assert obs.sample(df, "loyaltylens_http_request_duration_seconds_count", method=method, route=route, status=status) == n
    feedback = {str(s): n for (m, p, s), n in sent.items() if (m, p) == ("POST", "/feedback")}
    assert {s: obs.sample(df, "loyaltylens_feedback_writes_total", status=s) for s in feedback} == feedback
    labels = {v for l in df.labels for v in l.values()}
    assert not any(c in v for c in [*ids, "C99999999"] for v in labels), "a customer id in a label"
    stage_counts = {s: obs.sample(df, "loyaltylens_pipeline_stage_duration_seconds_count", stage=s) for s in ("features", "propensity", "retrieval", "generation")}
    assert stage_counts == {"features": len(ids) + 1, "propensity": len(ids) + 1, "retrieval": len(ids) + 1, "generation": 1}, stage_counts
    attempts = obs.sample(df, "loyaltylens_copy_attempts_total")
    assert attempts >= 1 and obs.sample(df, "loyaltylens_copy_retries_total") == attempts - 1
    assert obs.sample(df, "loyaltylens_copy_tokens_total", type="completion") > 0
    assert obs.sample(df, "loyaltylens_copy_duration_seconds_count") == 1 and obs.sample(df, "loyaltylens_copy_decode_tokens_per_second_count") == 1
    assert obs.sample(df, "loyaltylens_copy_queue_wait_seconds_count") >= 1  # the copy and the brand score each wait for an owner
    assert "loyaltylens_copy_queue_depth" in set(df.name)
    info = df[df.name == "loyaltylens_active_info"].labels.iloc[0]
    assert info["prompt_version"].startswith("v") and info["copy_model"].endswith(".gguf"), info


def test_metrics_need_the_token_when_one_is_set(smoke_env, monkeypatch):
    monkeypatch.setenv("LOYALTYLENS_API_TOKEN", TOKEN)
    with TestClient(create_app()) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        r = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200 and "loyaltylens_http_requests_total" in r.text


def test_metrics_off_says_so(smoke_env, monkeypatch):
    monkeypatch.setenv("LOYALTYLENS_OBSERVABILITY", "0")
    with TestClient(create_app()) as client:
        r = client.get("/metrics")
        assert r.status_code == 503 and "LOYALTYLENS_OBSERVABILITY" in r.text


def test_a_pipeline_call_is_one_trace_with_llama_cpp_token_counts(pipeline):
    import llama_cpp
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from loyaltylens import generation as gen
    customer = next(c for c in pipeline.sample_customers(10) if pipeline.run_for_customer(c, copy=False).offers)
    ctx = gen.load_decoder().llm.ctx
    memory = SimpleSpanProcessor(exporter := InMemorySpanExporter())
    obs.span_sinks().add(memory)
    try:
        before = llama_cpp.llama_perf_context(ctx)
        p_eval, n_eval = before.n_p_eval, before.n_eval
        result = pipeline.run_for_customer(customer)
        after = llama_cpp.llama_perf_context(ctx)
    finally: obs.span_sinks().remove(memory)
    spans = exporter.get_finished_spans()
    assert len({s.context.trace_id for s in spans}) == 1, "one trace per call"
    root = next(s for s in spans if s.name == "pipeline")
    stages = [s for s in spans if s.parent and s.parent.span_id == root.context.span_id]
    assert sorted(s.name for s in stages) == ["features", "generation", "propensity", "retrieval", "scoring"]
    wall, total = root.end_time - root.start_time, sum(s.end_time - s.start_time for s in stages)
    assert abs(total - wall) <= 0.10 * wall, (total, wall)
    llm = next(s for s in spans if "gen_ai.usage.input_tokens" in s.attributes)
    a, copy = llm.attributes, result.copy_
    assert llm.parent.span_id == next(s for s in stages if s.name == "generation").context.span_id
    assert llm.name == f"text_completion {copy['model']}" and a["gen_ai.provider.name"] == "llama.cpp"
    assert a["gen_ai.usage.input_tokens"] == copy["prompt_tokens"] and a["loyaltylens.copy.attempts"] == copy["attempts"]
    evaluated = a["gen_ai.usage.input_tokens"] - a["gen_ai.usage.cache_read.input_tokens"]
    assert evaluated == after.n_p_eval - p_eval, ("prompt tokens evaluated", evaluated, after.n_p_eval - p_eval)
    # llama.cpp decodes every sampled token but the last of each attempt (the tone is picked from the logits, never decoded)
    assert a["gen_ai.usage.output_tokens"] == after.n_eval - n_eval + a["loyaltylens.copy.attempts"], (a, after.n_eval - n_eval)


def test_a_callers_trace_continues_and_an_unsampled_request_leaves_no_span(pipeline, smoke_env, monkeypatch):
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    monkeypatch.setenv("LOYALTYLENS_TRACE_SAMPLE_RATIO", "0")  # the app samples nothing itself: only a caller's sampled trace is recorded
    caller_trace, caller_span = secrets.token_hex(16), secrets.token_hex(8)  # the W3C trace id and parent span id a caller sends
    memory = SimpleSpanProcessor(exporter := InMemorySpanExporter())
    cid = pipeline.sample_customers(1)[0]
    with TestClient(create_app()) as client:
        obs.span_sinks().add(memory)
        try:
            assert client.post(f"/pipeline/{cid}?copy=false").status_code == 200
            sent = client.post(f"/pipeline/{cid}?copy=false", headers={"traceparent": f"00-{caller_trace}-{caller_span}-01"})
            assert sent.status_code == 200
        finally: obs.span_sinks().remove(memory)
    spans = exporter.get_finished_spans()
    assert {f"{s.context.trace_id:032x}" for s in spans} == {caller_trace}, "only the caller's trace is recorded"
    assert sorted(s.name for s in spans) == ["POST /pipeline/{customer_id}", "features", "pipeline", "propensity", "retrieval"]
    server = next(s for s in spans if s.name.startswith("POST"))
    assert f"{server.parent.span_id:016x}" == caller_span and server.parent.is_remote, server.parent


class _Receiver(BaseHTTPRequestHandler):
    "An in-process OTLP/HTTP trace receiver: decodes each ExportTraceServiceRequest and keeps its span names."
    names: list = []
    def do_POST(self):
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
        req = ExportTraceServiceRequest.FromString(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).names += [(self.path, s.name) for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans]
        self.send_response(200); self.send_header("Content-Type", "application/x-protobuf"); self.end_headers()
    def log_message(self, *args): pass


def test_spans_reach_an_otlp_endpoint(pipeline, monkeypatch, tmp_path):
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    server = HTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("LOYALTYLENS_HOME", str(tmp_path))
    exporters = obs.span_exporters()
    assert [type(e).__name__ for e in exporters] == ["JsonlSpanExporter", "OTLPSpanExporter"]
    processors = [SimpleSpanProcessor(e) for e in exporters]
    for p in processors: obs.span_sinks().add(p)
    try: pipeline.run_for_customer(pipeline.sample_customers(1)[0], copy=False)
    finally:
        for p in processors: obs.span_sinks().remove(p); p.shutdown()
        server.shutdown()
    assert sorted(n for _, n in _Receiver.names) == ["features", "pipeline", "propensity", "retrieval"]
    assert {p for p, _ in _Receiver.names} == {"/v1/traces"}
    assert sorted(obs.read_spans(tmp_path / "traces" / "spans.jsonl").name) == ["features", "pipeline", "propensity", "retrieval"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (Debian: apt-get install prometheus; .ci/run installs it)")
def test_alert_rules_fire_and_stay_silent(root):
    r = subprocess.run(["promtool", "check", "rules", "alerts.yml"], cwd=root / "deploy", capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(["promtool", "test", "rules", "alerts_test.yml"], cwd=root / "deploy", capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    broken = obs.psi_alert_test({"recency_days": 0.9})
    broken["tests"][0]["alert_rule_test"][0]["exp_alerts"] = []  # claim it stays silent: promtool must disagree
    assert obs.promtool_test(broken).returncode != 0


# --- the dashboard's live, trace and feedback panels (AppTest: no browser) ---------------------------------------

DASH = Path(obs.__file__).with_name("_dashboard_app.py")
PANELS = ["Feedback trends", "Live metrics", "Latest pipeline traces"]


@pytest.fixture(scope="module")
def served_app(pipeline):
    "`loyaltylens serve` on the SMOKE world as a real process, instrumented; its base URL."
    from loyaltylens.pipeline import serve_process, stop_process
    proc, url = serve_process({"LOYALTYLENS_SMOKE": "1", "LOYALTYLENS_STORE_BACKEND": "memory", "LOYALTYLENS_LLM_BACKEND": "local",
                               "LOYALTYLENS_OBSERVABILITY": "1", "LOYALTYLENS_API_TOKEN": "", "LOYALTYLENS_TRACE_SAMPLE_RATIO": "1"}, timeout=300)
    yield url
    stop_process(proc)


@pytest.fixture
def judged_store(monkeypatch):
    "A throwaway PostgreSQL holding 3 pairs and 3 judgements, made the configured feedback store."
    from test_feedback import TempPostgres, judgement, make_pairs
    from loyaltylens import feedback as fb
    server = TempPostgres()
    monkeypatch.setenv("LOYALTYLENS_PG_URL", server.start()); monkeypatch.setenv("LOYALTYLENS_FEEDBACK_SCHEMA", "dashboard_test")
    with fb.open_store() as conn:
        pairs = make_pairs(3)
        fb.store_pairs(conn, pairs)
        now = datetime.now(timezone.utc)
        fb.record_many(conn, [(fb.FeedbackIn(**judgement(p)), now) for p in pairs], simulated=False)
    yield len(pairs)
    server.stop()


def traced_calls(pipeline, url: str, n: int = 4) -> list[str]:
    "Send `n` pipeline calls to the app at `url` and wait until the batch exporter has written their traces."
    ids, t0 = pipeline.sample_customers(n), time.time_ns()
    with httpx.Client(base_url=url, timeout=60) as c:
        for cid in ids: assert c.post(f"/pipeline/{cid}", params={"copy": "false"}).status_code == 200
    deadline = time.monotonic() + 60  # the batch exporter writes every few seconds
    while time.monotonic() < deadline:
        panel = obs.trace_panel(len(ids))
        if "data" in panel and (panel["data"]["calls"].started.astype("int64") >= t0).sum() == len(ids): return ids
        time.sleep(0.5)
    pytest.fail(f"the {len(ids)} pipeline calls never reached the trace file: {panel}")


def test_dashboard_panels_show_live_metrics_traces_and_feedback(pipeline, served_app, judged_store, monkeypatch):
    from streamlit.testing.v1 import AppTest
    ids = traced_calls(pipeline, served_app)
    monkeypatch.setenv("LOYALTYLENS_METRICS_URL", f"{served_app}/metrics")
    at = AppTest.from_file(str(DASH), default_timeout=180).run()
    assert not at.exception, at.exception
    assert [h.value for h in at.header][-3:] == PANELS, [h.value for h in at.header]
    assert not [i.value for i in at.info if any(w in i.value for w in ("app answers", "trace", "feedback", "judgement"))], [i.value for i in at.info]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["judgements, last 7 days"] == str(judged_store), metrics  # the feedback panel reads window_stats
    assert metrics["copy requests queued"] == "0", metrics
    frames = [d.value for d in at.dataframe]
    rates = next(f for f in frames if "requests_per_s" in f.columns)
    assert "/pipeline/{customer_id}" in rates.index, rates
    stages = next(f for f in frames if "p95_ms" in f.columns)
    assert {"features", "propensity", "retrieval"} <= set(stages.index) and (stages.p50_ms > 0).all(), stages
    calls = next(f for f in frames if "wall_ms" in f.columns)
    assert len(calls) >= len(ids) and calls.wall_ms.gt(0).all(), calls
    assert at.selectbox[0].value == calls.index[0], "the newest call's waterfall is drawn first"
    assert at.get("image"), "the waterfall is drawn"


def test_dashboard_panels_in_headless_chromium(pipeline, served_app, judged_store, monkeypatch, tmp_path):
    "The same three panels as a reader sees them: streamlit serving the dashboard, read in chromium."
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists(): pytest.skip("no system chromium (.ci/run installs it with apt)")
    from playwright.sync_api import sync_playwright
    from loyaltylens.feedback import free_port
    traced_calls(pipeline, served_app)
    monkeypatch.setenv("LOYALTYLENS_METRICS_URL", f"{served_app}/metrics")
    port, log = free_port(), tmp_path / "streamlit.log"
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(DASH), "--server.address", "127.0.0.1", "--server.port", str(port),  # noqa: S603
                             "--server.headless", "true", "--browser.gatherUsageStats", "false"], stdout=open(log, "w"), stderr=subprocess.STDOUT)
    shot = Path(__file__).resolve().parents[1] / "_runs" / "dashboard-observability.png"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None: pytest.fail(f"streamlit exited: {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/_stcore/health", timeout=1).status_code == 200: break
            except httpx.HTTPError: time.sleep(0.5)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                                                          "--disable-component-update", "--disable-sync"])
            page = browser.new_page(viewport={"width": 1280, "height": 2400})
            page.goto(f"http://127.0.0.1:{port}/", timeout=60_000)
            for text in (*PANELS, "Requests per second, by route", "Pipeline stages, ms", "judgements, last 7 days"):
                page.get_by_text(text, exact=True).first.wait_for(timeout=180_000)
            page.locator('[data-testid="stImage"] img, [data-testid="stImage"], img[alt]').last.wait_for(timeout=120_000)  # the waterfall
            body = page.inner_text("body")
            shot.parent.mkdir(exist_ok=True)
            page.get_by_text(PANELS[0], exact=True).first.scroll_into_view_if_needed()  # streamlit scrolls inside its own container
            page.screenshot(path=str(shot))
            browser.close()
        assert re.search(rf"judgements, last 7 days\s+{judged_store}\b", body), body[:3000]  # tables are drawn on a canvas: the metrics are text
        assert not any(w in body for w in ("no app answers", "no trace file")), body[:2000]
        assert shot.stat().st_size > 10_000
    finally:
        proc.terminate()
        try: proc.wait(20)
        except subprocess.TimeoutExpired: proc.kill()


def test_dashboard_panels_say_what_is_absent(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest
    from loyaltylens.feedback import free_port
    monkeypatch.setenv("LOYALTYLENS_HOME", str(tmp_path / "empty")); monkeypatch.delenv("LOYALTYLENS_PG_URL", raising=False)
    monkeypatch.setenv("LOYALTYLENS_METRICS_URL", f"http://127.0.0.1:{free_port()}/metrics")  # nothing listens there
    at = AppTest.from_file(str(DASH), default_timeout=120).run()
    assert not at.exception, at.exception
    assert [h.value for h in at.header][-3:] == PANELS
    infos = " ".join(i.value for i in at.info)
    assert "no feedback store" in infos and "no app answers" in infos and "no trace file" in infos, infos
