"""Integration tests of loyaltylens.pipeline: the copy is written for the top retrieved offer, missing artefacts fail
with the command that builds them (in process, from the CLI, and from `loyaltylens serve` running as a real process on
an empty workspace: 503, not a hang and not training), the one app's routes and schema, token and CORS modes."""
import json, time
from pathlib import Path

import httpx
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from loyaltylens import features as fs, propensity as prop, retrieval as ret
from loyaltylens.core import DEMO_STEPS, app as cli, get_settings
from loyaltylens.pipeline import (LoyaltyLensPipeline, MissingArtefact, UnknownCustomer, create_app, serve_process,
                                  stop_process)

SMOKE = True  # the small world: the pipeline's behaviour does not depend on the world's size


@pytest.fixture(scope="module")
def pipeline():
    fs.default_store(SMOKE); prop.default_model(SMOKE); ret.serving_retriever("pgvector", SMOKE)  # cached after the first build
    return LoyaltyLensPipeline(SMOKE)


@pytest.fixture(scope="module")
def cid(pipeline):
    return pipeline.sample_customers(1, seed=3)[0]


@pytest.fixture
def smoke_env(monkeypatch):
    monkeypatch.setenv("LOYALTYLENS_SMOKE", "1")


def test_copy_is_for_the_top_retrieved_offer(pipeline, cid):
    r = pipeline.run_for_customer(cid)
    assert r.offers, f"no eligible offer for {cid}: {r.filters}"
    assert r.copy_["offer_id"] == r.offers[0]["offer_id"], (r.copy_["offer_id"], [o["offer_id"] for o in r.offers])
    # the retrieval module, asked on its own with the same features and propensity, ranks the same offers
    _, as_of = pipeline.snapshot()
    ranked = ret.retrieve_for_customer(pipeline.retriever, pipeline.world, cid, k=5, as_of=as_of,
                                       features=r.features, propensity=r.propensity)
    assert ranked.offer_id.tolist() == [o["offer_id"] for o in r.offers]
    assert r.copy_["customer_id"] == cid and r.brand is not None and isinstance(r.fact_issues, list)
    assert {"features", "propensity", "retrieval", "generation", "scoring", "total"} == set(r.latency_ms)


def test_propensity_is_the_calibrated_model_and_decides_eligibility(pipeline, cid):
    r = pipeline.run_for_customer(cid, copy=False)
    want = float(prop.predict(pd.DataFrame([r.features]), pipeline.model)[0])
    assert abs(r.propensity - want) < 1e-12
    assert r.filters == ret.customer_filters(r.features["channel_preference"], r.propensity)
    assert all(o["min_propensity"] <= r.propensity for o in r.offers)


def test_point_in_time(pipeline, cid):
    r = pipeline.run_for_customer(cid, as_of="2024-06-15", copy=False)
    assert pd.Timestamp(r.as_of) <= pd.Timestamp("2024-06-15", tz="UTC")
    assert r.features == {c: pipeline.store.get(cid, r.feature_version)[c] for c in fs.FEATURE_COLUMNS}
    with pytest.raises(ValueError, match="before the first feature snapshot"): pipeline.run_for_customer(cid, as_of="2000-01-01")


def test_unknown_customers_fail_before_any_work(pipeline, cid, monkeypatch):
    with pytest.raises(UnknownCustomer, match="C99999999"): pipeline.run_for_customer("C99999999")
    calls = []
    monkeypatch.setattr(LoyaltyLensPipeline, "run_for_customer", lambda self, *a, **k: calls.append(a))
    with pytest.raises(UnknownCustomer, match="nobody"): pipeline.run_batch([cid, "nobody"])
    assert calls == []


def test_run_batch_reuses_components(pipeline):
    ids = pipeline.sample_customers(4)
    out = pipeline.run_batch(ids, copy=False, progress=False)
    assert [r.customer_id for r in out] == ids


def test_missing_model_names_the_command(tmp_path, monkeypatch):
    "World and snapshots present, model absent: a clear error, and nothing is trained."
    shared = get_settings().workspace
    for d in ("worlds", "features"): (tmp_path / d).symlink_to(shared / d)
    monkeypatch.setenv("LOYALTYLENS_HOME", str(tmp_path))
    monkeypatch.setattr(prop, "_DEFAULT", {})
    with pytest.raises(MissingArtefact, match=r"the propensity model is missing: run `loyaltylens pipeline prepare --smoke`"):
        LoyaltyLensPipeline(SMOKE)
    assert not (tmp_path / "models" / prop._default_dir(True).name).exists()
    r = CliRunner().invoke(cli, ["pipeline", "run", "C00000001", "--smoke"])
    assert r.exit_code == 1 and "loyaltylens pipeline prepare --smoke" in r.output, r.output


def test_serve_on_an_empty_workspace_answers_503(tmp_path):
    "`loyaltylens serve` as a real process, fresh LOYALTYLENS_HOME: 503 naming the command, quickly, nothing built."
    proc, url = serve_process({"LOYALTYLENS_HOME": str(tmp_path), "LOYALTYLENS_SMOKE": "1"}, timeout=120)
    try:
        t = time.monotonic()
        r = httpx.post(f"{url}/pipeline/C00000001", timeout=60)
        assert r.status_code == 503 and "loyaltylens pipeline prepare" in r.json()["detail"], r.text
        assert time.monotonic() - t < 30
        assert httpx.get(f"{url}/features/versions", timeout=60).status_code == 503  # the feature router no longer builds a world
        row = dict(recency_days=3, frequency_30d=2, monetary_90d=50.0, offer_redemption_rate=0.2, channel_preference="web", engagement_score=0.5)
        assert httpx.post(f"{url}/propensity/predict", json=row, timeout=60).status_code == 503  # nor trains a model
        h = httpx.get(f"{url}/health", timeout=60).json()
        assert h["status"] == "degraded" and h["backends"]["propensity model"]["status"] == "absent", h
    finally: stop_process(proc)
    assert not any((tmp_path / "worlds").iterdir()) and not (tmp_path / "models" / prop._default_dir(True).name).exists()


def test_app_routes_and_schema(pipeline, cid, smoke_env):
    client = TestClient(create_app())
    r = client.post(f"/pipeline/{cid}", params={"copy": "false"})
    assert r.status_code == 200, r.text
    assert [o["offer_id"] for o in r.json()["offers"]] == [o["offer_id"] for o in pipeline.run_for_customer(cid, copy=False).offers]
    assert client.post("/pipeline/C99999999").status_code == 404
    assert client.post("/pipeline/bad id!").status_code == 422
    bad_date = client.post(f"/pipeline/{cid}", params={"as_of": "2024-13-45"})
    assert bad_date.status_code == 422 and bad_date.json()["detail"][0]["loc"] == ["query", "as_of"], bad_date.text
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["backends"]["offer index"]["status"] == "ok" and {"features", "propensity", "retrieval", "generation", "pipeline"} <= set(h["routers"]), h
    post = client.get("/openapi.json").json()["paths"]["/pipeline/{customer_id}"]["post"]
    assert {"200", "401", "404", "422", "502", "503"} == set(post["responses"])


def test_token_required_on_writes_when_configured(cid, smoke_env, monkeypatch):
    monkeypatch.setenv("LOYALTYLENS_API_TOKEN", "s3cret-test-token")
    client = TestClient(create_app())
    assert client.post(f"/pipeline/{cid}", params={"copy": "false"}).status_code == 401
    assert client.post(f"/pipeline/{cid}", params={"copy": "false"}, headers={"Authorization": "Bearer nope"}).status_code == 401
    ok = client.post(f"/pipeline/{cid}", params={"copy": "false"}, headers={"Authorization": "Bearer s3cret-test-token"})
    assert ok.status_code == 200, ok.text
    assert client.get("/health").status_code == 200 and client.get(f"/features/{cid}").status_code == 200


def test_cors_closed_unless_configured(smoke_env, monkeypatch):
    pre = dict(headers={"Origin": "http://ui.example", "Access-Control-Request-Method": "POST"})
    closed = TestClient(create_app()).options("/pipeline/C00000001", **pre)
    assert "access-control-allow-origin" not in closed.headers
    monkeypatch.setenv("LOYALTYLENS_CORS_ORIGINS", "http://ui.example")
    opened = TestClient(create_app()).options("/pipeline/C00000001", **pre)
    assert opened.headers.get("access-control-allow-origin") == "http://ui.example", opened.headers


def test_cli_run(cid):
    r = CliRunner().invoke(cli, ["pipeline", "run", cid, "--no-copy", "--json", "--smoke"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["customer_id"] == cid
    assert CliRunner().invoke(cli, ["pipeline", "run", "C99999999", "--smoke"]).exit_code == 2
    assert CliRunner().invoke(cli, ["pipeline", "run", cid, "--as-of", "yesterday-ish", "--smoke"]).exit_code == 2


def test_demo_step_ends_with_the_pipeline(pipeline, smoke_env):
    assert DEMO_STEPS[70][0].startswith("One pipeline call")
    out = DEMO_STEPS[70][1]()
    res = json.loads(Path(out["result JSON"]).read_text())
    assert res["copy"]["offer_id"] == res["offers"][0]["offer_id"]
    assert any(k.startswith(f"copy for the top offer {res['offers'][0]['offer_id']}") for k in out), out
