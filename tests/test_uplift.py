"""Integration tests of loyaltylens.uplift (notebook 02a) on the SMOKE world v2: the learners recover a known effect, the
metrics behave at their edges, the frame uses only the past, the world's oracle agrees with its own events, and the
router / CLI answer 422 / 503 / exit codes as the DESIGN says."""
import os, subprocess, sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

import loyaltylens.uplift as U
from loyaltylens.features import default_store, default_world
from loyaltylens.propensity import temporal_split

CLI = str(Path(sys.executable).parent / "loyaltylens")


@pytest.fixture(scope="module")
def smoke_env():
    mp = pytest.MonkeyPatch()
    mp.setenv("LOYALTYLENS_SMOKE", "1")
    yield
    mp.undo()


@pytest.fixture(scope="module")
def split(smoke_env):
    return temporal_split(U.uplift_frame(default_store(True), default_world(True)))


@pytest.fixture(scope="module")
def bundle(smoke_env):
    return U.default_uplift(True, train_if_missing=True)


def test_learners_recover_a_known_effect(split):
    "Randomized toy data with an effect of 0.4 where engagement is above the median and 0 elsewhere."
    rng = np.random.default_rng(1)
    toy = split.train.sample(6_000, replace=True, random_state=1).reset_index(drop=True)
    toy["treated"] = rng.random(len(toy)) > 0.2
    step = (toy.engagement_score > toy.engagement_score.median()).to_numpy()
    toy["bought"] = (rng.random(len(toy)) < 0.25 + 0.4 * (toy.treated & step)).astype(int)
    for learner in (U.TLearner(), U.XLearner()):
        est = learner.fit(toy).effect(toy)
        assert abs(est[step].mean() - 0.4) < 0.1 and abs(est[~step].mean()) < 0.1, (learner.name, est[step].mean(), est[~step].mean())


def test_qini_metrics_at_their_edges():
    effect = np.random.default_rng(0).normal(0.1, 0.2, 2_000)
    assert U.auuc_share(effect, effect) == pytest.approx(1.0)
    assert U.auuc_share(-effect, effect) < 0  # the reversed ranking is worse than random
    assert abs(U.auuc_share(np.random.default_rng(1).random(2_000), effect)) < 0.15
    curve = U.qini_curve(effect, effect)
    assert curve[0] == 0 and curve[-1] == pytest.approx(effect.sum())
    assert U.pehe(effect, effect) == 0.0
    with pytest.raises(ValueError, match="shapes"): U.pehe([1.0], [1.0, 2.0])


def test_frame_uses_only_the_past(split):
    "History columns count purchases before the snapshot only; past response rates use earlier months only."
    world = default_world(True)
    rows = split.test.sample(20, random_state=0)
    ev = world.load_events()
    buys = ev[ev.event_type == "purchase"]
    for r in rows.itertuples():
        mine = buys[(buys.customer_id == r.customer_id) & (buys.category == r.category) & (buys.timestamp < r.as_of)]
        assert r.category_purchases_90d == int((mine.timestamp >= r.as_of - pd.Timedelta(days=90)).sum())
    asg = world.load_assignments()
    month = int(split.test.month.iloc[0])
    earlier = asg[(asg.month < month) & asg.customer_id.isin(rows.customer_id)]
    n_treated = earlier.groupby("customer_id").treated.sum()
    assert (rows.set_index("customer_id").past_treated_rate.isna() == (n_treated.reindex(rows.customer_id).fillna(0) == 0).to_numpy()).all()
    assert set(split.test.treated) == {True, False}


def test_oracle_label_probability_is_calibrated(split):
    "The world's exact label probability averages to the observed label rate of module 2's test month."
    world = default_world(True)
    test = split.test
    p = world.label_probability(test.customer_id, test.as_of.iloc[0])
    assert abs(p.mean() - test.label.mean()) < 0.03
    holdout = ~test.treated.to_numpy()
    assert p[holdout].mean() < p[~holdout].mean()  # the holdout sees no offers in the label month


def test_router_codes(bundle, split, monkeypatch):
    api = FastAPI(); api.include_router(U.router)
    client = TestClient(api)
    cols = [c for c in U.UPLIFT_COLUMNS if c != "past_response"]
    row = split.test.head(1)[["customer_id", *cols]].to_json(orient="records")
    row = pd.read_json(pd.io.common.StringIO(row)).iloc[0].to_dict()
    row = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()}
    ok = client.post("/uplift/predict", json=row)
    assert ok.status_code == 200 and ok.json()["learner"] == bundle.chosen
    assert client.post("/uplift/predict", json={**row, "category": "yachts"}).status_code == 422
    assert client.post("/uplift/predict", json={**row, "past_holdout_rate": 2}).json()["detail"][0]["loc"][-1] == "past_holdout_rate"
    assert client.post("/uplift/predict", json={"rows": []}).status_code == 422
    monkeypatch.setattr(U, "_LOADED", {})
    monkeypatch.setenv("LOYALTYLENS_HOME", str(pytest.importorskip("tempfile").mkdtemp()))
    missing = client.post("/uplift/predict", json=row)  # no bundle in this workspace: 503 naming the command, never training
    assert missing.status_code == 503 and U.TRAIN_UPLIFT_COMMAND in missing.json()["detail"]


def test_cli(bundle, tmp_path):
    "The real CLI in its own process (an in-process CliRunner would share the app with any notebook code a docs test ran)."
    env = {**os.environ, "LOYALTYLENS_SMOKE": "1"}
    r = subprocess.run([CLI, "uplift", "evaluate", "--smoke"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "top20_ratio" in r.stdout, (r.returncode, r.stdout, r.stderr)
    r = subprocess.run([CLI, "uplift", "evaluate", "--smoke"], capture_output=True, text=True, env={**env, "LOYALTYLENS_HOME": str(tmp_path)}, timeout=300)
    assert r.returncode == 1 and U.TRAIN_UPLIFT_COMMAND in r.stderr, (r.returncode, r.stdout, r.stderr)
