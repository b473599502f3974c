"""Integration tests of loyaltylens.propensity on the SMOKE world: temporal separation, the leaky published label, the
MLflow round trip (without warnings), atomic installs, the model card's claims, export agreement, bad input over
Python, HTTP and the CLI, the demo step's size, and a light import."""
import dataclasses, json, logging, os, subprocess, sys, warnings

import numpy as np
import pandas as pd
import pytest

from loyaltylens import propensity as P
from loyaltylens.features import FEATURE_COLUMNS, default_store, default_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def smoke_env(monkeypatch):
    "predict() / the router / the demo default to the SMOKE model in these tests (and only in these tests)."
    monkeypatch.setenv("LOYALTYLENS_SMOKE", "1")


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
    assert (tr.timestamp != tr.as_of).sum() == 0 and te.as_of.max() + h <= default_world(True).end
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
    with pytest.raises(AssertionError, match="label window"):  # Article 2's random split mixes months across parts
        P.check_separation(P.random_split(pd.concat([df] * 10, ignore_index=True)))


class _FakeStore:
    "Just enough of a FeatureStore for build_training_set: one snapshot, features and labels for every asked-for row."
    def versions(self): return pd.DataFrame(dict(as_of=[pd.Timestamp("2024-02-01", tz="UTC")]))
    def training_set(self, entity, horizon_days):
        return entity.assign(recency_days=1, frequency_30d=1, monetary_90d=1.0, offer_redemption_rate=0.0,
                             channel_preference="web", engagement_score=0.5, as_of=entity.timestamp, label=0)


def test_build_training_set_reads_an_events_path_with_a_quote(tmp_path):
    events = tmp_path / "it's a workspace" / "events"
    events.mkdir(parents=True)
    pd.DataFrame(dict(customer_id=["b", "a", "a"])).to_parquet(events / "part-0.parquet")
    world = type("World", (), dict(events_glob=str(events / "*.parquet"), end=pd.Timestamp("2024-06-01", tz="UTC")))()
    ts = P.build_training_set(_FakeStore(), world)
    assert ts.customer_id.tolist() == ["a", "b"]


def test_published_label_leaks_and_the_future_window_label_does_not(split):
    from sklearn.metrics import roc_auc_score
    # the label is a threshold on an input: that input, used as a score with no model at all, ranks it perfectly
    assert roc_auc_score(P.published_label(split.test), split.test.offer_redemption_rate) == 1.0
    auc = {}
    for name, label_of in {"published": P.published_label, "future window": lambda d: d.label}.items():
        s = P.relabel(split, label_of)
        est = P.fit_baselines(s, names=["logistic regression"])["logistic regression"]
        auc[name] = roc_auc_score(s.test.label, P.baseline_predict(est, s.test))
    assert auc["published"] > 0.99 and 0.6 < auc["future window"] < 0.95, auc


def test_registered_model_reproduces_in_memory_scores(model, split):
    assert model.version is not None
    reloaded = P.load_registered(model.version)  # models:/loyaltylens-propensity/<v>
    ours, theirs = model.predict(split.test), np.asarray(reloaded.predict(split.test[FEATURE_COLUMNS]))
    np.testing.assert_array_equal(ours, theirs)


def _fake_report(model, split, tt_auc: float, gb_auc: float) -> "P.Report":
    "A Report with chosen ROC-AUCs (other metrics real-looking), built without training."
    y = split.test.label.to_numpy()
    p = model.predict(split.test)
    row = P.classification_metrics(y, p, model.threshold)
    metrics = pd.DataFrame({"TabTransformer (calibrated)": {**row, "roc_auc": tt_auc}, "TabTransformer (raw)": row,
                            "gradient boosting": {**row, "roc_auc": gb_auc}, "logistic regression": row}).T
    metrics.index.name = "model"
    history = pd.DataFrame(dict(epoch=[1, 2], train_loss=[0.6, 0.5], valid_loss=[0.6, 0.55], valid_auc=[0.7, 0.72], seconds=[1.0, 2.0]))
    return P.Report(metrics, history, P.segment_metrics(split.test, p), split.summary(), dict(tabtransformer=2.0, baselines=1.0),
                    y, {"TabTransformer (calibrated)": p})


@pytest.mark.parametrize("tt_auc,gb_auc,winner", [(0.80, 0.70, "TabTransformer (calibrated)"), (0.70, 0.80, "gradient boosting")])
def test_model_card_says_who_won_from_the_numbers(model, split, tt_auc, gb_auc, winner):
    card = P.model_card(dataclasses.replace(model), _fake_report(model, split, tt_auc, gb_auc))
    assert f"{winner} ranks better than" in card
    assert "below gradient boosting" not in card


def test_model_card_says_scores_sum_to_expected_redeeming_customers(model, split):
    card = P.model_card(dataclasses.replace(model), _fake_report(model, split, 0.8, 0.8))
    assert "expected redeeming customers" in card and "expected redemptions" not in card


class _Collect(logging.Handler):
    def __init__(self): super().__init__(logging.WARNING); self.messages = []
    def emit(self, record): self.messages.append(f"{record.name}: {record.getMessage()}")


def test_publish_logs_the_model_without_mlflow_warnings(model, split, tmp_path, monkeypatch):
    import mlflow
    monkeypatch.setenv("LOYALTYLENS_HOME", str(tmp_path))  # a throwaway MLflow store
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    candidate = dataclasses.replace(model, metrics=dict(model.metrics))
    handler = _Collect(); logging.getLogger("mlflow").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            version = P.publish(candidate, _fake_report(model, split, 0.8, 0.7), P.TrainConfig(max_epochs=1))
    finally: logging.getLogger("mlflow").removeHandler(handler)
    found = handler.messages + [f"{w.category.__name__}: {w.message}" for w in caught if "mlflow" in w.filename]
    assert found == []
    assert version == 1  # the first version in the throwaway registry
    info = mlflow.models.get_model_info(f"models:/{P.MODEL_NAME}/{version}")
    assert info.signature.inputs.input_names() == FEATURE_COLUMNS and info.saved_input_example_info is not None
    loaded = P.load_registered(version)
    np.testing.assert_array_equal(np.asarray(loaded.predict(split.test.head(50)[FEATURE_COLUMNS])), model.predict(split.test.head(50)))


def test_default_model_never_leaves_a_torn_bundle(model, tmp_path, monkeypatch):
    monkeypatch.setenv("LOYALTYLENS_HOME", str(tmp_path))
    monkeypatch.setattr(P, "_DEFAULT", {})
    import loyaltylens.features as F
    monkeypatch.setattr(F, "default_store", lambda smoke: None); monkeypatch.setattr(F, "default_world", lambda smoke: None)
    monkeypatch.setattr(P, "build_training_set", lambda store, world: None)
    monkeypatch.setattr(P, "temporal_split", lambda ts: None)
    monkeypatch.setattr(P, "train_propensity", lambda split, cfg, progress: (model, None))
    monkeypatch.setattr(P, "publish", lambda *a, **k: model.version)
    real_save = P.PropensityModel.save

    def dies_after_the_weights(self, path):  # a crash between the two files of a bundle
        import torch
        path.mkdir(parents=True, exist_ok=True); torch.save(self.net.state_dict(), path / "network.pt")
        raise RuntimeError("killed mid-write")
    monkeypatch.setattr(P.PropensityModel, "save", dies_after_the_weights)
    with pytest.raises(RuntimeError, match="killed mid-write"): P.default_model(smoke=True)
    folder = P._default_dir(True)
    assert not folder.exists(), sorted(p.name for p in folder.iterdir())  # no half-written default
    assert sorted(p.name for p in folder.parent.iterdir()) == []  # and no temporary folder left behind
    monkeypatch.setattr(P.PropensityModel, "save", real_save)
    installed = P.default_model(smoke=True)  # a later call trains again and installs a whole bundle
    assert sorted(p.name for p in folder.iterdir()) == ["bundle.json", "network.pt"] and installed.version == model.version


def test_exports_agree_on_1000_rows_and_the_benchmark_times_the_same_function(model, split, tmp_path):
    rows = split.test.sample(1000, replace=len(split.test) < 1000, random_state=0)
    cat, num = model.pre.transform(rows)
    rts = P.runtimes(model, tmp_path)
    ref = rts["PyTorch"](cat, num)
    assert ref.shape == (1000,)
    for name, f in rts.items(): np.testing.assert_allclose(f(cat, num), ref, rtol=0, atol=1e-5, err_msg=name)
    # the calibrated probability from exported scores equals predict()
    np.testing.assert_allclose(model.calibrator(rts["ONNX Runtime"](cat, num)), model.predict(rows), atol=1e-6)
    # the benchmark reports how far each runtime is from PyTorch, so a broken export cannot be timed as a fast one
    bench = P.benchmark(rts, cat, num, repeats=2, batch_repeats=1)
    assert bench.max_abs_score_gap.max() <= 1e-5, bench
    broken = P.benchmark({**rts, "ONNX Runtime": lambda c, n: rts["ONNX Runtime"](c, n) + 1}, cat, num, repeats=2, batch_repeats=1)
    assert broken.loc["ONNX Runtime", "max_abs_score_gap"] == pytest.approx(1.0, abs=1e-5)


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


def test_cli_info_and_predict(split, tmp_path):
    model = P.PropensityModel.load(P._default_dir(True))  # what the CLI will load (a notebook run may have installed a newer one)
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


@pytest.mark.parametrize("env,smoke", [("1", True), ("0", False)])
def test_demo_step_uses_the_size_the_settings_ask_for(model, monkeypatch, env, smoke):
    asked = []
    monkeypatch.setenv("LOYALTYLENS_SMOKE", env); monkeypatch.delenv("IN_TEST", raising=False)
    monkeypatch.setattr(P, "default_model", lambda s: asked.append(s) or model)  # no full-size training in a test
    out = P._demo_propensity()
    assert asked == [smoke] and out["model bundle"] == str(P._default_dir(smoke))


def test_import_does_not_load_torch_or_mlflow():
    code = "import sys, loyaltylens.propensity; print(sorted(m for m in ('torch', 'mlflow', 'sklearn') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
