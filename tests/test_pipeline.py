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
from loyaltylens import pipeline as pipeline_module
from loyaltylens.pipeline import (LoyaltyLensPipeline, MissingArtefact, PipelineResult, UnknownCustomer, create_app, serve_process,
                                  stop_process, table_path)

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
    r, cold = pipeline.run_for_customer(cid, copy=False), pipeline.run_for_customer(cid, copy=False, precomputed=False)
    want = float(prop.predict(pd.DataFrame([r.features]), pipeline.model)[0])
    assert (r.served_from, cold.served_from) == ("precomputed", "on_request")
    assert abs(cold.propensity - want) < 1e-12  # computed on request: exactly the model's one-row answer
    assert abs(r.propensity - want) < 1e-6  # batch-scored: the same up to float rounding
    assert r.filters == ret.customer_filters(r.features["channel_preference"], r.propensity)
    assert all(o["min_propensity"] <= r.propensity for o in r.offers)


def same_result(a: PipelineResult, b: PipelineResult):
    "Served and cold agree: features, query, filters and offers equal; propensity and scores up to float rounding."
    assert (a.feature_version, a.features, a.query, a.filters["channel"]) == (b.feature_version, b.features, b.query, b.filters["channel"])
    assert abs(a.propensity - b.propensity) < 1e-6, (a.propensity, b.propensity)
    assert [o["offer_id"] for o in a.offers] == [o["offer_id"] for o in b.offers], (a.offers, b.offers)
    assert all(abs(x["score"] - y["score"]) < 1e-4 for x, y in zip(a.offers, b.offers))


def test_served_path_equals_cold_path(pipeline):
    ids = pipeline.sample_customers(6, seed=5)
    for c in ids:
        served, cold = pipeline.run_for_customer(c, copy=False), pipeline.run_for_customer(c, copy=False, precomputed=False)
        assert (served.served_from, cold.served_from) == ("precomputed", "on_request")
        same_result(served, cold)
        assert cold.offers == pipeline.retriever.search(cold.query, pipeline.k, "dense", cold.filters).to_dict("records")  # the same rows as the DataFrame path


def test_table_is_persisted_and_reused_by_the_next_process(pipeline, cid):
    version = pipeline.snapshot()[0]
    pipeline.precompute(version)
    assert table_path(version, pipeline.table_key(version)).exists()
    fresh = LoyaltyLensPipeline(SMOKE, precompute="load")  # never builds: it can only have read the persisted table
    r = fresh.run_for_customer(cid, copy=False)
    assert r.served_from == "precomputed" and fresh.served(version).meta["built_here"] is False
    same_result(r, pipeline.run_for_customer(cid, copy=False, precomputed=False))


def test_new_model_never_uses_the_old_table(pipeline, cid):
    import copy, torch
    version, original = pipeline.snapshot()[0], pipeline.model
    old_key = pipeline.table_key(version)
    nudged = copy.deepcopy(original)
    with torch.no_grad():
        for p in nudged.net.parameters(): p.add_(0.05)
    pipeline.model, pipeline.precompute_policy = nudged, "load"
    try:
        assert pipeline.table_key(version) != old_key
        r = pipeline.run_for_customer(cid, copy=False)
        assert r.served_from == "on_request"
        assert abs(r.propensity - float(nudged.predict(pd.DataFrame([r.features]))[0])) < 1e-12
    finally: pipeline.model, pipeline.precompute_policy = original, "open"
    assert pipeline.table_key(version) == old_key and pipeline.run_for_customer(cid, copy=False).served_from == "precomputed"


def test_new_snapshot_never_uses_an_old_table(pipeline, cid, tmp_path, monkeypatch):
    "A snapshot written after the tables were built (a new version, later as_of) is served on request until its own table exists."
    import shutil
    version, t = pipeline.snapshot()
    path = tmp_path / "store.duckdb"
    shutil.copy(pipeline.store.path, path)
    store = fs.FeatureStore(path)
    store.write("m13-extra", pipeline_module.fs._frame(store, version), t + pd.Timedelta(days=1))
    monkeypatch.setattr(pipeline_module, "open_feature_store", lambda smoke: (pipeline.world, store))
    pl = LoyaltyLensPipeline(SMOKE, precompute="load")
    assert pl.snapshot()[0] == "m13-extra" and pl.table_key("m13-extra") != pl.table_key(version)
    r = pl.run_for_customer(cid, copy=False)
    assert (r.feature_version, r.served_from) == ("m13-extra", "on_request")
    assert pl.run_for_customer(cid, as_of=t, copy=False).served_from == "precomputed"  # the older snapshot keeps its table
    rebuilt = {**pl.snapshots.iloc[-1].to_dict(), "created_at": pd.Timestamp.now(tz="UTC")}  # the same name written again
    assert pipeline_module.snapshot_fingerprint(rebuilt, pl.world.root.name) != pipeline_module.snapshot_fingerprint(pl.snapshots.iloc[-1].to_dict(), pl.world.root.name)


def test_background_policy_answers_cold_until_the_table_is_built(pipeline, cid, tmp_path, monkeypatch):
    "The server's policy: the first request of a snapshot without a table is computed on request while a thread builds it."
    pl = LoyaltyLensPipeline(SMOKE, precompute="background")
    monkeypatch.setenv("LOYALTYLENS_HOME", str(tmp_path))  # an empty table folder (the artefacts are already open)
    version = pl.snapshot()[0]
    first = pl.run_for_customer(cid, copy=False)
    assert first.served_from == "on_request"
    building = pl._building.get(pl.table_key(version))
    if building is not None: building.join(600)
    later = pl.run_for_customer(cid, copy=False)
    assert later.served_from == "precomputed" and table_path(version, pl.table_key(version)).exists()
    same_result(later, first)


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
    with TestClient(create_app()) as client: check_routes_and_schema(client, pipeline, cid)


def check_routes_and_schema(client, pipeline, cid):
    r = client.post(f"/pipeline/{cid}", params={"copy": "false"})
    assert r.status_code == 200, r.text
    assert [o["offer_id"] for o in r.json()["offers"]] == [o["offer_id"] for o in pipeline.run_for_customer(cid, copy=False).offers]
    assert client.post("/pipeline/C99999999").status_code == 404
    assert client.post("/pipeline/bad id!").status_code == 422
    bad_date = client.post(f"/pipeline/{cid}", params={"as_of": "2024-13-45"})
    assert bad_date.status_code == 422 and bad_date.json()["detail"][0]["loc"][:2] == ["query", "as_of"], bad_date.text
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["backends"]["offer index"]["status"] == "ok" and {"features", "propensity", "retrieval", "generation", "pipeline"} <= set(h["routers"]), h
    post = client.get("/openapi.json").json()["paths"]["/pipeline/{customer_id}"]["post"]
    assert {"200", "404", "422", "502", "503"} == set(post["responses"])  # no token set: no 401 documented


def test_token_required_on_writes_when_configured(cid, smoke_env, monkeypatch):
    monkeypatch.setenv("LOYALTYLENS_API_TOKEN", "s3cret-test-token")
    auth = {"Authorization": "Bearer s3cret-test-token"}
    with TestClient(create_app()) as client:
        assert client.post(f"/pipeline/{cid}", params={"copy": "false"}).status_code == 401
        assert client.post(f"/pipeline/{cid}", params={"copy": "false"}, headers={"Authorization": "Bearer nope"}).status_code == 401
        ok = client.post(f"/pipeline/{cid}", params={"copy": "false"}, headers=auth)
        assert ok.status_code == 200, ok.text
        assert client.get("/health").status_code == 200 and client.get("/features/versions").status_code == 200  # reads without customer data stay open
        assert client.get(f"/features/{cid}").status_code == 401 and client.get(f"/features/{cid}", headers=auth).status_code == 200


def test_cors_closed_unless_configured(smoke_env, monkeypatch):
    pre = dict(headers={"Origin": "http://ui.example", "Access-Control-Request-Method": "POST"})
    with TestClient(create_app()) as c: closed = c.options("/pipeline/C00000001", **pre)
    assert "access-control-allow-origin" not in closed.headers
    monkeypatch.setenv("LOYALTYLENS_CORS_ORIGINS", "http://ui.example")
    with TestClient(create_app()) as c: opened = c.options("/pipeline/C00000001", **pre)
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
