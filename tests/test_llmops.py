"""Module 05 integration tests: prompt CLI (activate/rollback, locked and atomic, live for generation), the eval gate
passing the active prompt and failing v3-pushy, PSI against an independent computation and on the timezone bug, the
drift CLI, the audit on a biased fixture, the dashboard (AppTest and headless Chromium), the router, the eval-gate
workflow (tests/test_workflows.py lints every workflow)."""
import bisect, json, multiprocessing as mp, os, shutil, socket, subprocess, sys, time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import given, settings, strategies as st
from typer.testing import CliRunner

from loyaltylens import llmops as L
from loyaltylens.core import app
from loyaltylens.generation import PromptRegistry, write_copy

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
GATE_N = 8  # the notebook's SMOKE gate size: shares its cached generations


@pytest.fixture()
def smoke(monkeypatch):
    "SMOKE settings: the gate's reward model is the SMOKE one the notebooks built (the default one writes an 800-copy corpus)."
    monkeypatch.setenv("LOYALTYLENS_SMOKE", "1")


@pytest.fixture()
def prompts(tmp_path, monkeypatch):
    "A scratch copy of prompts/ that the registry, the CLI and generation use."
    dst = tmp_path / "prompts"
    shutil.copytree(ROOT / "prompts", dst, ignore=shutil.ignore_patterns("*.lock", ".*"))
    monkeypatch.setenv("LOYALTYLENS_PROMPTS_DIR", str(dst))
    return PromptRegistry(dst)


# --- prompt CLI -------------------------------------------------------------------------------------------------

def test_prompt_cli_list_show_diff_activate_rollback(prompts):
    active = prompts.active_version()
    r = runner.invoke(app, ["prompt", "list"]); assert r.exit_code == 0 and f"* {active}" in r.output and "v3-pushy" in r.output
    assert "version: v1" in runner.invoke(app, ["prompt", "show", "v1"]).output
    r = runner.invoke(app, ["prompt", "diff", "v1", "v2"]); assert r.exit_code == 0 and r.output.startswith("--- prompts/v1.yaml")
    n = len(prompts.history())
    r = runner.invoke(app, ["prompt", "activate", "v1", "--note", "try v1"]); assert r.exit_code == 0, r.output
    h = prompts.history()[-1]
    assert (prompts.active_version(), h.version, h.reason, len(prompts.history())) == ("v1", "v1", "try v1", n + 1)
    assert h.by and h.activated_at
    r = runner.invoke(app, ["prompt", "rollback"]); assert r.exit_code == 0, r.output
    assert prompts.active_version() == active and prompts.history()[-1].reason == "rollback from v1"


@pytest.mark.parametrize("bad", ["v99", "../v1", "v1/../v2", "/etc/passwd", "v1\x00", "x" * 5000])
def test_unknown_or_malformed_version_exits_2_and_leaves_active_yaml(prompts, bad):
    before = prompts.active_path.read_bytes()
    r = runner.invoke(app, ["prompt", "activate", bad, "--note", "no"])
    assert r.exit_code == 2, r.output
    assert prompts.active_path.read_bytes() == before
    assert runner.invoke(app, ["prompt", "show", bad]).exit_code == 2
    assert runner.invoke(app, ["prompt", "diff", "v1", bad]).exit_code == 2


def _activate_many(root: str, versions: list[str], rollback_every: int):
    os.environ["LOYALTYLENS_PROMPTS_DIR"] = root
    from loyaltylens import llmops  # noqa: F401  (registers rollback)
    reg = PromptRegistry(root)
    for i, v in enumerate(versions):
        reg.rollback(by=f"p{os.getpid()}") if rollback_every and i % rollback_every == rollback_every - 1 else reg.activate(v, by=f"p{os.getpid()}", reason=f"#{i}")


def test_concurrent_activations_keep_every_history_entry(prompts):
    before = len(prompts.history())
    jobs, per = 6, 8
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_activate_many, args=(str(prompts.root), ["v1", "v2"] * (per // 2), 3 if k % 2 else 0)) for k in range(jobs)]
    for p in procs: p.start()
    for p in procs: p.join(120)
    assert [p.exitcode for p in procs] == [0] * jobs
    hist = prompts.history()
    assert len(hist) == before + jobs * per
    assert prompts.active_version() == hist[-1].version


def test_generation_uses_the_newly_active_version_at_once(prompts):
    case = L.load_golden()[0]
    for version in ["v1", "v2"]:
        assert runner.invoke(app, ["prompt", "activate", version, "--note", "test"]).exit_code == 0
        copy = write_copy(case.customer, case.propensity, case.offer, backend="local", seed=0)  # registry=None: what serving does
        assert copy.prompt_version == version
    assert runner.invoke(app, ["prompt", "rollback"]).exit_code == 0
    assert write_copy(case.customer, case.propensity, case.offer, backend="local", seed=0).prompt_version == "v1"


# --- eval gate --------------------------------------------------------------------------------------------------

def test_eval_gate_passes_active_and_fails_v3_pushy(smoke):
    t0 = time.perf_counter()
    ok = runner.invoke(app, ["eval", "gate", "--n", str(GATE_N), "--copies", "1"])
    took = time.perf_counter() - t0
    assert ok.exit_code == 0, ok.output
    bad = runner.invoke(app, ["eval", "gate", "--prompt", "v3-pushy", "--n", str(GATE_N), "--copies", "1"])
    assert bad.exit_code == 1, bad.output
    assert "FAIL" in bad.output and "PASS" in ok.output and "95% interval" in ok.output
    assert "guaranteed by decoding, weigh 0: schema_valid, within_limits, mentions_offer, fact_consistency, tone_rule" in ok.output
    print(f"gate run of the active prompt: {took:.1f} s")
    # results saved as JSON and logged to MLflow, one run per evaluation
    hist = L.eval_history()
    latest = json.loads(Path(hist.path.iloc[-1]).read_text())
    assert latest["prompt_version"] == "v3-pushy" and not latest["passed"] and len(latest["copies"]) == GATE_N
    import mlflow
    L.mlflow_experiment(L.EVAL_EXPERIMENT)
    runs = mlflow.search_runs(filter_string="params.prompt_version = 'v3-pushy'", max_results=1, order_by=["start_time DESC"])
    assert len(runs) == 1 and runs["metrics.passed"].iloc[0] == 0.0 and runs["params.backend"].iloc[0] == "local"


def test_eval_is_seeded_same_inputs_same_verdict(smoke):
    a, b = L.evaluate(n=GATE_N), L.evaluate(n=GATE_N)
    assert (a.score, a.passed, a.criteria) == (b.score, b.passed, b.criteria)


def test_eval_cli_bad_input_exits_2():
    assert runner.invoke(app, ["eval", "run", "--prompt", "../etc"]).exit_code == 2
    assert runner.invoke(app, ["eval", "run", "--prompt", "v99", "--n", "1"]).exit_code == 2
    assert runner.invoke(app, ["eval", "run", "--n", "0"]).exit_code == 2
    assert runner.invoke(app, ["eval", "run", "--copies", "0"]).exit_code == 2
    bad = runner.invoke(app, ["eval", "run", "--n", "1", "--without", "vibes"])
    assert bad.exit_code == 2 and "unknown criterion 'vibes'" in bad.output, bad.output


def test_gate_weighs_zero_what_the_route_guarantees():
    for route, guaranteed in L.ROUTE_GUARANTEES.items():
        w = L.gate_weights(route)
        assert all(w[k] == 0 for k in guaranteed) and abs(sum(w.values()) - 1) < 1e-9, route
        assert all(w[k] > 0 for k in L.CRITERIA if k not in guaranteed), route  # what is not guaranteed is weighed
    assert L.gate_weights("openai")["fact_consistency"] > 0  # nothing is guaranteed on a remote server


def test_a_prompt_file_cannot_set_its_own_bar(prompts):
    import yaml
    data = yaml.safe_load((prompts.root / "v2.yaml").read_text()) | {"version": "v9"}
    data["eval_criteria"]["gate_threshold"] = 0.1
    (prompts.root / "v9.yaml").write_text(yaml.safe_dump(data))
    r = runner.invoke(app, ["eval", "gate", "--prompt", "v9", "--n", "1"])
    assert r.exit_code == 2 and "gate_threshold" in r.output, r.output


# --- PSI and drift ----------------------------------------------------------------------------------------------

def _psi_by_hand(expected, actual, bins=10):
    "PSI with plain Python: decile edges by sorting, bins by bisect, shares floored at 1e-4."
    e = sorted(float(x) for x in expected)
    edges = sorted({float(np.quantile(e, q / bins)) for q in range(1, bins)})
    def shares(xs):
        counts = [0] * (len(edges) + 1)
        for x in xs: counts[bisect.bisect_right(edges, float(x))] += 1
        return [max(c / len(xs), 1e-4) for c in counts]
    import math
    return sum((a - b) * math.log(a / b) for a, b in zip(shares(actual), shares(e)))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3), min_size=5, max_size=300), st.lists(st.floats(-1e3, 1e3), min_size=5, max_size=300))
def test_psi_matches_an_independent_computation(expected, actual):
    assert L.psi(expected, actual) == pytest.approx(_psi_by_hand(expected, actual), rel=1e-9, abs=1e-12)
    assert L.psi(expected, actual) >= 0 and L.psi(expected, expected) == 0


def test_psi_textbook_value_and_categorical():
    # two bins of expected shares 0.5/0.5 against 0.8/0.2: 0.3 ln(1.6) + 0.3 ln(2.5)
    assert L.psi(["a", "b"] * 50, ["a"] * 80 + ["b"] * 20) == pytest.approx(0.3 * np.log(1.6) + 0.3 * np.log(2.5))
    assert L.psi(["a"] * 10, ["b"] * 10) == pytest.approx(2 * (1 - 1e-4) * np.log(1 / 1e-4))  # the 1e-4 floor


@pytest.fixture(scope="module")
def drift_store():
    store, _ = L.drift_demo_store(smoke=True)
    return store


def test_timezone_bug_psi_and_unchanged_rebuild(drift_store):
    from loyaltylens.propensity import default_model
    psi = lambda v: {r["feature"]: r["psi"] for r in L.drift_report(drift_store, "baseline", v, model=default_model(True))["features"]}
    tz, same, nxt = psi("tz-bug"), psi("rebuild"), psi("next-month")
    assert tz["recency_days"] > 0.25
    assert max(same.values()) < 0.01
    assert nxt["recency_days"] < 0.25  # natural month-over-month drift stays below retrain


def test_drift_cli_exit_codes(drift_store):
    args = ["drift", "check", "--store", str(drift_store.path), "--smoke", "--baseline", "baseline"]
    r = runner.invoke(app, [*args, "--current", "tz-bug"]); assert r.exit_code == 1 and "retrain" in r.output, r.output
    r = runner.invoke(app, [*args, "--current", "rebuild"]); assert r.exit_code == 0 and "status: stable" in r.output, r.output
    assert runner.invoke(app, [*args, "--current", "no-such-version"]).exit_code == 2
    assert runner.invoke(app, [*args, "--current", "rebuild", "--warning", "0.3", "--retrain", "0.2"]).exit_code == 2


# --- audit ------------------------------------------------------------------------------------------------------

class _BiasedModel:
    "Deliberately biased fixture: never selects web or in-store customers."
    threshold = 0.5
    def predict(self, df): return np.where(df.channel_preference == "mobile", 0.9, 0.0)


def test_audit_fails_on_a_biased_fixture():
    copies = [dict(id="G000", text="15% off fuel for you.", fact_spans=[], banned=[])]
    rep = L.audit(smoke=True, copies=copies, model=_BiasedModel())
    fair = pd.DataFrame(rep["fairness"]).set_index("segment")
    assert not rep["passed"] and not fair.loc["channel", "passed"]
    assert fair.loc["channel", "demographic_parity_difference"] > 0.5
    leaky = [dict(id="G001", text="Hi C00000042, 15% off fuel.", fact_spans=[], banned=[])]
    assert L.copy_checks(leaky)["id_leaks"] == 1 and not L.copy_checks(leaky)["passed"]


def test_audit_cli_writes_markdown_and_json(tmp_path):
    r = runner.invoke(app, ["audit", "--smoke", "--out", str(tmp_path)])
    rep = json.loads((tmp_path / "audit.json").read_text())
    assert r.exit_code == (0 if rep["passed"] else 1), r.output
    md = (tmp_path / "audit.md").read_text()
    assert md.startswith("# Responsible-AI audit") and "equalized odds" in md
    assert {f["segment"] for f in rep["fairness"]} == {"channel", "spend_tier", "tenure"}
    print(md)


# --- router -----------------------------------------------------------------------------------------------------

@pytest.fixture()
def client():
    api = FastAPI(); api.include_router(L.router)
    return TestClient(api)


def test_router_reads_and_4xx(client, prompts, tmp_path, monkeypatch):
    assert client.get("/llmops/prompts").json()["active"] == prompts.active_version()
    assert client.get("/llmops/evals/latest", params={"version": "../x"}).status_code == 422
    monkeypatch.setenv("LOYALTYLENS_HOME", str(tmp_path / "empty"))
    r = client.get("/llmops/evals/latest"); assert r.status_code == 503 and "loyaltylens eval run" in r.json()["detail"]
    r = client.post("/llmops/prompts/activate", json={"version": "v99"}); assert r.status_code == 404 and "version" in r.json()["detail"]
    r = client.post("/llmops/prompts/activate", json={"version": "../v1"}); assert r.status_code == 422 and "version" in r.text


def test_activation_endpoint_requires_the_token_when_set(client, prompts, monkeypatch):
    monkeypatch.setenv("LOYALTYLENS_API_TOKEN", "s3cret-test-token")
    before = prompts.active_path.read_bytes()
    assert client.post("/llmops/prompts/activate", json={"version": "v1"}).status_code == 401
    assert client.post("/llmops/prompts/activate", json={"version": "v1"}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert prompts.active_path.read_bytes() == before
    r = client.post("/llmops/prompts/activate", json={"version": "v1", "note": "api"}, headers={"Authorization": "Bearer s3cret-test-token"})
    assert r.status_code == 200 and prompts.active_version() == "v1"


# --- dashboard --------------------------------------------------------------------------------------------------

DASH = ROOT / "loyaltylens" / "_dashboard_app.py"


def test_dashboard_apptest_with_data():
    from streamlit.testing.v1 import AppTest
    at = AppTest.from_file(str(DASH), default_timeout=120).run()
    assert not at.exception, at.exception
    headers = [h.value for h in at.header]
    assert headers == ["Active prompt", "Latest evaluation", "Drift per feature", "Propensity model (MLflow registry)", "Feedback trends",
                       "Live metrics", "Latest pipeline traces"]
    assert PromptRegistry().active_version() in [m.value for m in at.metric]


def test_dashboard_apptest_shows_absent_data_as_absent(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest
    monkeypatch.setenv("LOYALTYLENS_HOME", str(tmp_path / "empty"))
    at = AppTest.from_file(str(DASH), default_timeout=120).run()
    assert not at.exception, at.exception
    infos = " ".join(i.value for i in at.info)
    assert "no evaluation yet" in infos and "no drift report yet" in infos


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def test_dashboard_in_headless_chromium(tmp_path):
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists(): pytest.skip("no system chromium (.ci/run installs it with apt)")
    from playwright.sync_api import sync_playwright
    port = _free_port()
    log = tmp_path / "streamlit.log"
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(DASH), "--server.address", "127.0.0.1", "--server.port", str(port),
                             "--server.headless", "true", "--browser.gatherUsageStats", "false"], stdout=open(log, "w"), stderr=subprocess.STDOUT)
    shot = ROOT / "_runs" / "dashboard.png"
    try:
        import httpx
        for _ in range(240):
            if proc.poll() is not None: pytest.fail(f"streamlit exited: {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/_stcore/health", timeout=1).status_code == 200: break
            except httpx.HTTPError: pass
            time.sleep(0.5)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                                                          "--disable-component-update", "--disable-sync"])
            page = browser.new_page(viewport={"width": 1280, "height": 1800})
            page.goto(f"http://127.0.0.1:{port}/", timeout=60_000)
            page.get_by_text("Drift per feature").wait_for(timeout=120_000)
            page.get_by_text("Feedback trends").wait_for(timeout=120_000)
            body = page.inner_text("body")
            shot.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
        assert "LoyaltyLens LLMOps" in body and "Active prompt" in body and PromptRegistry().active_version() in body
        assert shot.stat().st_size > 10_000
    finally:
        proc.terminate()
        try: proc.wait(20)
        except subprocess.TimeoutExpired: proc.kill()


# --- CI workflows -----------------------------------------------------------------------------------------------

def test_eval_gate_workflow_runs_the_gate_on_prompt_changes():
    import yaml
    wf = yaml.safe_load((ROOT / ".github" / "workflows" / "eval-gate.yml").read_text())
    on = wf.get("on", wf.get(True))
    assert "prompts/**" in on["pull_request"]["paths"] and "prompts/**" in on["push"]["paths"]
    steps = " ".join(s.get("run", "") for s in wf["jobs"]["gate"]["steps"])
    assert "loyaltylens eval gate" in steps
