"""Integration tests of loyaltylens.propensity on the SMOKE world: temporal separation, the MLflow round trip,
export agreement, bad input over Python, HTTP and the CLI, and a light import."""
import json, os, subprocess, sys

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("LOYALTYLENS_SMOKE", "1")  # predict() / the router default to the SMOKE model in tests
from loyaltylens import propensity as P
from loyaltylens.features import FEATURE_COLUMNS, default_store, default_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def split():
    "The temporal split of the SMOKE world's training set."
    return P.temporal_split(P.build_training_set(default_store(True), default_world(True)))


@pytest.fixture(scope="module")
def model():
    "The SMOKE default model (trained and registered once, then loaded from the workspace)."
    return P.default_model(smoke=True)


def test_temporal_separation_real_store(split):
    h = pd.Timedelta(days=P.HORIZON_DAYS)
    tr, va, te = split.train, split.valid, split.test
    assert tr.as_of.max() + h <= va.as_of.min(), "a training label window reaches into validation"
    assert va.as_of.max() + h <= te.as_of.min(), "a validation label window reaches into test"
    assert tr.as_of.max() < va.as_of.min() < te.as_of.min()
    assert va.as_of.nunique() == te.as_of.nunique() == 1 and tr.as_of.nunique() == 8
    # features are point-in-time: each row's snapshot is its own as_of, and every label window is complete
    assert (tr.timestamp == tr.as_of).all() and (te.as_of + h <= default_world(True).end).all()
    P.check_separation(split)


def test_temporal_split_purges_rows_whose_window_reaches_the_next_part():
    # snapshots 29 days apart around February: a 30-day window from 2024-02-01 ends 2024-03-02 > 2024-03-01
    t = pd.to_datetime(["2024-01-01", "2024-02-01", "2024-03-01", "2024-04-01"], utc=True)
    df = pd.DataFrame(dict(as_of=np.repeat(t, 3), customer_id=list("abc") * 4, label=[0, 1, 0] * 4))
    s = P.temporal_split(df, train_months=(1, 2), valid_month=3, test_month=4)
    assert set(s.train.as_of) == {t[0]} and set(s.valid.as_of) == {t[2]} and set(s.test.as_of) == {t[3]}
    with pytest.raises(ValueError, match="valid"):  # validation at 02-01 would peek into a 03-01 test month
        P.temporal_split(df, train_months=(1, 1), valid_month=2, test_month=3)
    with pytest.raises(AssertionError, match="train label window"):
        P.check_separation(P.Split(df[df.as_of <= t[1]], df[df.as_of == t[1]], df[df.as_of == t[3]]))


def test_registered_model_reproduces_in_memory_scores(model, split):
    assert model.version is not None
    reloaded = P.load_registered(model.version)  # models:/loyaltylens-propensity/<v>
    ours, theirs = model.predict(split.test), np.asarray(reloaded.predict(split.test[FEATURE_COLUMNS]))
    assert np.array_equal(ours, theirs)


def test_exports_agree_on_1000_rows(model, split, tmp_path):
    rows = split.test.sample(1000, replace=len(split.test) < 1000, random_state=0)
    cat, num = model.pre.transform(rows)
    rts = P.runtimes(model, tmp_path)
    ref = rts["PyTorch"](cat, num)
    assert ref.shape == (1000,)
    for name, f in rts.items(): np.testing.assert_allclose(f(cat, num), ref, rtol=0, atol=1e-5, err_msg=name)
    # and the calibrated probability from exported logits equals predict()
    np.testing.assert_allclose(model.calibrator(rts["ONNX Runtime"](cat, num)), model.predict(rows), atol=1e-6)


BAD = [("missing", lambda r: {k: v for k, v in r.items() if k != "monetary_90d"}, "monetary_90d"),
       ("nan", lambda r: {**r, "engagement_score": float("nan")}, "engagement_score"),
       ("negative count", lambda r: {**r, "frequency_30d": -2}, "frequency_30d"),
       ("unknown channel", lambda r: {**r, "channel_preference": "fax"}, "channel_preference")]


@pytest.fixture(scope="module")
def good_row(split):
    r = split.test.iloc[0]
    return dict(customer_id=str(r.customer_id), recency_days=int(r.recency_days), frequency_30d=int(r.frequency_30d),
                monetary_90d=float(r.monetary_90d), offer_redemption_rate=float(r.offer_redemption_rate),
                channel_preference=str(r.channel_preference), engagement_score=float(r.engagement_score))


@pytest.mark.parametrize("case,mutate,field", BAD, ids=[b[0] for b in BAD])
def test_predict_names_the_bad_field(model, good_row, case, mutate, field):
    with pytest.raises(ValueError, match=field):
        P.predict(pd.DataFrame([mutate(good_row)]), model)


@pytest.fixture(scope="module")
def client(model):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    api = FastAPI(); api.include_router(P.router)
    api.dependency_overrides[P.current_model] = lambda: model
    return TestClient(api, raise_server_exceptions=False)


@pytest.mark.parametrize("case,mutate,field", BAD, ids=[b[0] for b in BAD])
def test_http_422_names_the_bad_field(client, good_row, case, mutate, field):
    for body in (mutate(good_row), {"rows": [good_row, mutate(good_row)]}):  # one row, and a batch with one bad row
        r = client.post("/propensity/predict", content=json.dumps(body), headers={"content-type": "application/json"})
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["loc"][-1] == field


def test_http_predict_and_model_info(client, model, good_row):
    one = client.post("/propensity/predict", json=good_row).json()
    batch = client.post("/propensity/predict", json={"rows": [good_row] * 3}).json()
    assert one["probabilities"][0] == pytest.approx(float(P.predict(pd.DataFrame([good_row]), model)[0]), abs=1e-12)
    assert len(batch["probabilities"]) == 3 and batch["customer_ids"] == [good_row["customer_id"]] * 3
    assert client.post("/propensity/predict", json={"rows": []}).status_code == 422
    info = client.get("/propensity/model").json()
    assert info["version"] == model.version and info["trained_at"] == model.trained_at
    assert {"gradient boosting", "TabTransformer (calibrated)"} <= set(info["metrics"])


def _cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([os.path.join(os.path.dirname(sys.executable), "loyaltylens"), *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=600)


def test_cli_info_and_predict(model, split, tmp_path):
    info = _cli("model", "info", "--smoke")
    assert info.returncode == 0, info.stderr
    assert f"v{model.version}" in info.stdout
    good, bad = tmp_path / "rows.csv", tmp_path / "bad.csv"
    split.test.head(4).to_csv(good, index=False)
    split.test.head(4).assign(recency_days=-1).to_csv(bad, index=False)
    ok = _cli("model", "predict", str(good), "--smoke")
    assert ok.returncode == 0, ok.stderr
    got = pd.read_csv(pd.io.common.StringIO(ok.stdout)).probability.to_numpy()
    np.testing.assert_allclose(got, model.predict(split.test.head(4)), atol=1e-6)
    err = _cli("model", "predict", str(bad), "--smoke")
    assert err.returncode == 2 and "recency_days" in err.stderr


def test_import_does_not_load_torch_or_mlflow():
    code = "import sys, loyaltylens.propensity; print(sorted(m for m in ('torch', 'mlflow', 'sklearn') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
