"""Spark (notebook 01b) against DuckDB (notebook 01): the six features on random and hand-made events (in a UTC and a Berlin session)
and on every SMOKE snapshot, the ASOF training set row for row, batch scores, the `--engine spark` build served by the store and
over HTTP, the settings that stay local, and the clear errors for a bad master URL, a missing Java or a cluster master given to
the one-computer benchmark. One Spark session for the whole run (the `spark` fixture in conftest.py)."""
import os, subprocess, sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from loyaltylens.core import app
from loyaltylens.features import (CHANNELS, EVENT_TYPES, FeatureStore, _frame, compute_features, default_store, default_world,
                                  monthly_moments, router, served_store)
from loyaltylens.scale import (DST_CUTOFF, LOCAL_CONF, SPARK_CONF, SUM_RTOL, build_spark_snapshots, compare_features, edge_events, read_events,
                               session_conf, spark_features, spark_scores, spark_training_set)

ROOT = Path(__file__).resolve().parents[1]
PY = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable
DAY = pd.Timedelta(days=1)
T = pd.Timestamp("2024-04-01", tz="UTC")


def random_events(seed: int, n: int = 400) -> pd.DataFrame:
    "Random events with many timestamps exactly on window edges and many channel ties (as tests/test_features.py)."
    rng = np.random.default_rng(seed)
    edges = np.array([0, 30, 90, 1, 29, 31, 89, 91, 200]) * DAY
    offs = np.where(rng.random(n) < 0.4, edges[rng.integers(0, len(edges), n)],
                    pd.to_timedelta(rng.integers(-3600 * 24 * 120, 3600 * 24 * 5, n), unit="s"))
    etype = np.asarray(EVENT_TYPES)[rng.integers(0, 4, n)]
    return pd.DataFrame(dict(customer_id=[f"c{i}" for i in rng.integers(0, 25, n)], event_type=etype,
                             timestamp=T - pd.to_timedelta(offs), amount=np.where(etype == "purchase", np.round(rng.uniform(0, 80, n), 2), np.nan),
                             offer_id=np.where(np.isin(etype, ["offer_view", "redeem"]), "OF000001", None),
                             channel=np.asarray(CHANNELS)[rng.integers(0, 2 if seed % 2 else 3, n)]))


@pytest.fixture(scope="module")
def smoke():
    "The SMOKE world and its DuckDB store (monthly snapshots), built once and cached in the workspace."
    return default_world(True), default_store(True)


def test_edge_cases_match(spark):
    ev = edge_events()
    duck, spk = compute_features(ev, DST_CUTOFF), spark_features(spark, ev, DST_CUTOFF).toPandas()
    assert compare_features(duck, spk)["mismatches"] == 0, compare_features(duck, spk)
    assert "after_only" not in set(spk.customer_id)  # events at or after t never count
    assert spk.set_index("customer_id").loc["at_cutoff", "frequency_30d"] == 1


def test_features_ignore_the_session_time_zone(spark):
    "The cutoff is an instant, not wall-clock text: a session on Berlin time gives DuckDB's features, DST edge included."
    ev = edge_events()
    try:
        spark.conf.set("spark.sql.session.timeZone", "Europe/Berlin")
        berlin = spark_features(spark, ev, DST_CUTOFF).toPandas()
    finally: spark.conf.set("spark.sql.session.timeZone", SPARK_CONF["spark.sql.session.timeZone"])
    got = compare_features(compute_features(ev, DST_CUTOFF), berlin)
    assert got["mismatches"] == 0 and {"dst", "at_cutoff"} <= set(berlin.customer_id), got


def test_only_local_settings_stay_local():
    "A cluster session gets SPARK_CONF and its own settings, none of LOCAL_CONF (loopback, shuffle partitions)."
    cluster = session_conf("spark://10.0.0.5:7077", {"spark.executor.memory": "8g"})
    assert cluster == {**SPARK_CONF, "spark.executor.memory": "8g"} and not set(LOCAL_CONF) & set(cluster), cluster
    assert session_conf("local[2]") == {**SPARK_CONF, **LOCAL_CONF}


def test_bench_scale_refuses_a_cluster_master():
    "The benchmark gives DuckDB the master's cores, which only a local master has: a cluster is exit 2, before any JVM starts."
    r = CliRunner().invoke(app, ["bench", "scale", "--master", "spark://10.0.0.5:7077"])
    assert r.exit_code == 2 and "use a local master" in r.output, r.output


@pytest.mark.parametrize("seed", range(6))
def test_random_events_match(spark, seed):
    ev = random_events(seed)
    got = compare_features(compute_features(ev, T), spark_features(spark, ev, T).toPandas())
    assert got["mismatches"] == 0 and got["customers"] > 0, got


@pytest.fixture(scope="module")
def spark_built(spark, smoke, tmp_path_factory):
    "Every monthly snapshot of the SMOKE world built by the Spark engine: (store, Parquet root, rows), once per module."
    root = tmp_path_factory.mktemp("spark-built")
    store = FeatureStore(root / "spark.duckdb")
    rows = build_spark_snapshots(store, smoke[0], monthly_moments(smoke[0]), snapshots=str(root / "snapshots"))
    return store, root / "snapshots", rows


def test_every_smoke_snapshot_matches(smoke, spark_built):
    "The Spark engine writes every monthly snapshot as Parquet, imports it, and every value equals the DuckDB store's."
    (world, duck), (store, snapshots, rows) = smoke, spark_built
    assert [r["version"] for r in rows] == [v for v, _ in monthly_moments(world)]
    assert sorted(p.name for p in snapshots.iterdir() if p.is_dir())[0] == f"snapshot_date={world.month_ends()[0]:%Y-%m-%d}"
    for v, _ in monthly_moments(world):
        got = compare_features(_frame(duck, v), _frame(store, v))
        assert got["mismatches"] == 0 and got["customers"] == len(_frame(duck, v)), (v, got)


def test_asof_training_set_is_identical(spark, smoke, spark_built):
    world, duck = smoke
    ends = world.month_ends()
    rng = np.random.default_rng(1)
    ids = _frame(duck, monthly_moments(world)[-1][0]).customer_id.to_numpy()
    entity = pd.DataFrame({"customer_id": np.r_[rng.choice(ids, 400), [ids[0]] * 3, ["nobody"]],
                           "timestamp": [*(ends[0] + pd.to_timedelta(rng.integers(-20 * 24, 24 * 330, 400), unit="h")), ends[3], ends[3],
                                         world.start, ends[5]]})
    got = spark_training_set(spark, spark.read.parquet(str(spark_built[1])), entity, world)
    want = duck.training_set(entity)
    pd.testing.assert_frame_equal(got, want, check_dtype=False, rtol=SUM_RTOL)
    assert got.as_of.iloc[401] == ends[3] and got.recency_days.isna().iloc[-1], got.tail()  # tie: a snapshot at the moment counts


def test_batch_scores_match_in_process(spark, smoke):
    from loyaltylens.propensity import default_model
    world, duck = smoke
    model = default_model(True)
    feats = _frame(duck, monthly_moments(world)[-1][0])
    spark_scored = spark_scores(spark, spark.createDataFrame(feats), model).toPandas()
    both = feats.assign(score=model.predict(feats))[["customer_id", "score"]].merge(spark_scored, on="customer_id", suffixes=("", "_spark"))
    assert len(both) == len(feats)
    assert (both.score - both.score_spark).abs().max() <= 1e-6


def test_cli_engine_spark_version_is_served(spark, smoke, tmp_path, monkeypatch):
    "`features build --engine spark` writes a version the store looks up and the HTTP router serves."
    world, duck = smoke
    store_path = tmp_path / "cli.duckdb"
    when = world.month_ends()[6]
    r = CliRunner().invoke(app, ["features", "build", "--engine", "spark", "--master", "local[2]", "--as-of", f"{when:%Y-%m-%d}",
                                 "--events", str(world.root), "--store", str(store_path), "--snapshots", f"file://{tmp_path / 'snaps'}"])
    assert r.exit_code == 0, r.output
    store = FeatureStore(store_path)
    version = f"asof-{when:%Y-%m-%d}"
    want = _frame(duck, monthly_moments(world)[6][0]).set_index("customer_id")
    cid = want.index[0]
    assert store.get(cid, version)["frequency_30d"] == want.loc[cid, "frequency_30d"]
    monkeypatch.setenv("LOYALTYLENS_FEATURE_STORE", str(store_path))
    served_store.cache_clear()
    try:
        api = FastAPI(); api.include_router(router)
        with TestClient(api) as client:
            body = client.get(f"/features/{cid}").json()
            assert body["version"] == version and body["recency_days"] == want.loc[cid, "recency_days"], body
            assert client.get("/features/nobody-here").status_code == 404
    finally: served_store.cache_clear()


@pytest.mark.parametrize("master, says", [("locl[2]", "is not one Spark knows"), ("spark://127.0.0.1:1", "no Spark master answers at 127.0.0.1:1")])
def test_bad_master_is_exit_2_naming_the_fix(spark, smoke, tmp_path, master, says):
    r = CliRunner().invoke(app, ["features", "build", "--engine", "spark", "--master", master, "--as-of", "2024-06-01",
                                 "--events", str(smoke[0].root), "--store", str(tmp_path / "x.duckdb")])
    assert r.exit_code == 2 and says in r.output and "local[2]" in r.output, r.output
    assert not (tmp_path / "x.duckdb").exists() or not len(FeatureStore(tmp_path / "x.duckdb").versions())


@pytest.mark.parametrize("env, says", [({"JAVA_HOME": "/nonexistent-jdk"}, "JAVA_HOME=/nonexistent-jdk has no bin/java"),
                                       ({"JAVA_HOME": None, "PATH": "/nonexistent-bin"}, "no java on PATH")])
def test_missing_java_is_exit_2_naming_the_fix(smoke, tmp_path, env, says):
    "The real CLI in a child process with no usable Java: exit 2, the apt-get line, no JVM stack trace."
    child = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
    r = subprocess.run([PY, "-c", "from loyaltylens.core import main; main()", "features", "build", "--engine", "spark", "--as-of", "2024-06-01",
                        "--events", str(smoke[0].root), "--store", str(tmp_path / "x.duckdb")], capture_output=True, text=True, env=child, timeout=300)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert says in r.stderr and "apt-get install openjdk-17-jre-headless" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_events_read_from_a_uri(spark, smoke):
    "A file:// URI is read like a folder: on a cluster the same call takes s3a:// or gs://."
    world = smoke[0]
    assert read_events(spark, f"file://{world.events_path}").count() == world.stats["events"]
