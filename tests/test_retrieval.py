"""Integration tests of loyaltylens.retrieval: every store path (filters, empty results, k bounds, agreement on an
exact-match query), BM25/RRF, the router, the CLI, and the Weaviate path (runs only when a server is reachable)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from loyaltylens import retrieval as R


@pytest.fixture(autouse=True, scope="module")
def smoke_env():
    "The router and CLI serve the small world: LOYALTYLENS_SMOKE for this module's tests only, restored afterwards."
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOYALTYLENS_SMOKE", "1")
        yield

LOCAL = ["memory", "pgvector", "langchain", "llamaindex"]


@pytest.fixture(scope="module")
def catalog() -> pd.DataFrame:
    "A small hand-made catalog (its own tables: offers_12_base_*)."
    rows = [
        ("X01", "Espresso bar: 20% off lattes", "Lattes and flat whites with 20% off.", "coffee", "mobile", 20.0, 14, 0.0),
        ("X02", "Bean Co: 50% off coffee beans", "Whole beans and ground coffee at half price.", "coffee", "web", 50.0, 30, 0.2),
        ("X03", "Morning Cup: 10% off pastries", "Croissants with any coffee.", "coffee", "in_store", 10.0, 7, 0.1),
        ("X04", "FuelUp: 5% off diesel", "Save on diesel at every pump.", "fuel", "in_store", 5.0, 21, 0.0),
        ("X05", "FuelUp: 15% off car wash", "A premium car wash after filling up.", "fuel", "mobile", 15.0, 30, 0.25),
        ("X06", "SkyWay Air: 30% off flights", "Flights to the sun for summer holidays.", "travel", "web", 30.0, 60, 0.05),
        ("X07", "Railjet: 25% off train tickets", "Weekend train tickets across the country.", "travel", "mobile", 25.0, 45, 0.15),
        ("X08", "Urban Thread: 40% off sneakers", "Sneakers for the new season.", "fashion", "web", 40.0, 14, 0.3),
        ("X09", "Glow Studio: 20% off fragrances", "Fragrances and gift sets.", "beauty", "in_store", 20.0, 21, 0.0),
        ("X10", "CinemaMax: 25% off movie tickets", "Two movie tickets for date night.", "entertainment", "mobile", 25.0, 30, 0.1),
        ("X11", "VoltTech: 15% off headphones", "Wireless headphones for working from home.", "electronics", "web", 15.0, 14, 0.2),
        ("X12", "Nest & Nook: 10% off bedding", "Bedding and linen for a cosy winter.", "home", "in_store", 10.0, 60, 0.05),
    ]
    return pd.DataFrame(rows, columns=R.OFFER_COLUMNS)


@pytest.fixture(scope="module")
def stores(catalog):
    return {b: R.offer_store(b, catalog) for b in LOCAL}


@pytest.mark.parametrize("backend", LOCAL)
def test_filters(stores, catalog, backend):
    store, q = stores[backend], R.embed("coffee")[0]
    hits = store.search(q, k=10, filters={"category": "coffee"})
    assert {h.offer_id for h in hits} == {"X01", "X02", "X03"}
    hits = store.search(q, k=10, filters={"channel": ["mobile", "web"], "discount_pct_gte": 25})
    assert {h.offer_id for h in hits} == set(catalog.query("channel in ['mobile','web'] and discount_pct >= 25").offer_id)
    hits = store.search(q, k=10, filters={"min_propensity_lte": 0.05, "expiry_days_gte": 21})
    assert {h.offer_id for h in hits} == set(catalog.query("min_propensity <= 0.05 and expiry_days >= 21").offer_id)
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))  # ranked best first


@pytest.mark.parametrize("backend", LOCAL)
def test_empty_results(stores, backend):
    assert stores[backend].search(R.embed("coffee")[0], k=5, filters={"category": "no-such-category"}) == []
    assert stores[backend].search(R.embed("coffee")[0], k=5, filters={"channel": "web", "discount_pct_gte": 99}) == []


@pytest.mark.parametrize("backend", LOCAL)
def test_k_bounds(stores, catalog, backend):
    q = R.embed("flights")[0]
    for bad in (0, -1, 51, 2.5):
        with pytest.raises(ValueError, match="k must be"): stores[backend].search(q, k=bad)
    assert len(stores[backend].search(q, k=1)) == 1
    assert len(stores[backend].search(q, k=50)) == len(catalog)  # k above the catalog size: everything


def test_unknown_filter_named():
    with pytest.raises(ValueError, match="colour"): R.check_filters({"colour": "red"})


def test_four_paths_same_top_on_exact_match(stores, catalog):
    "Each path through its own text route (LangChain / LlamaIndex embed via their framework wrappers)."
    for i in (0, 5, 11):
        query = R.offer_text(catalog.iloc[i])
        tops = {b: s.search_text(query, k=3)[0] for b, s in stores.items()}
        assert {h.offer_id for h in tops.values()} == {catalog.offer_id.iloc[i]}, tops
        assert np.allclose([h.score for h in tops.values()], 1.0, atol=1e-3)  # the same cosine everywhere


def test_same_ranking_and_scores_across_paths(stores):
    q = R.embed("a cheap train for the weekend")[0]
    ref = stores["memory"].search(q, k=12)
    for b in LOCAL[1:]:
        got = stores[b].search(q, k=12)
        assert [h.offer_id for h in got] == [h.offer_id for h in ref], b
        assert np.allclose([h.score for h in got], [h.score for h in ref], atol=1e-4), b


@pytest.mark.parametrize("backend", ["memory", "pgvector", "langchain", "llamaindex"])
def test_add_delete_count(catalog, backend):
    make = {"memory": lambda: R.MemoryStore(), "pgvector": lambda: R.PgVectorStore("offers_pytest_crud"),
            "langchain": lambda: R.LangChainStore("offers_pytest_crud"), "llamaindex": lambda: R.LlamaIndexStore("offers_pytest_crud")}[backend]
    store = make()
    if backend != "memory": store.drop(); store = make()  # start empty
    vecs = R.offer_vectors(catalog)
    store.add(catalog, vecs)
    assert store.count() == len(catalog)
    store.add(catalog.iloc[:3], vecs[:3])  # re-adding replaces, no duplicates
    assert store.count() == len(catalog)
    assert store.delete(["X01", "X02"]) == 2
    assert store.count() == len(catalog) - 2
    assert "X01" not in {h.offer_id for h in store.search(vecs[0], k=50)}
    if backend != "memory": store.drop()


def test_weaviate_skip_message():
    ok, msg = R.weaviate_status()
    if not ok:
        assert "LOYALTYLENS_WEAVIATE_URL" in msg and "docker run" in msg  # says how to run the Weaviate tests


def test_weaviate_path(catalog):
    ok, msg = R.weaviate_status()
    if not ok: pytest.skip(msg)
    store = R.offer_store("weaviate", catalog)
    assert store.count() == len(catalog)
    q = R.offer_text(catalog.iloc[4])
    assert store.search_text(q, k=1)[0].offer_id == catalog.offer_id.iloc[4]
    assert store.search(R.embed("coffee")[0], k=5, filters={"category": "no-such-category"}) == []
    assert {h.offer_id for h in store.search(R.embed("coffee")[0], k=10, filters={"category": "coffee"})} == {"X01", "X02", "X03"}


def test_bm25_and_rrf(catalog):
    bm = R.BM25Index(catalog)
    assert bm.search("SkyWay flights", k=1)[0].offer_id == "X06"
    assert bm.search("qwertyuiop") == []
    assert all(h.offer_id in {"X01", "X05", "X07", "X10"} for h in bm.search("tickets coffee wash", k=10, filters={"channel": "mobile"}))
    fused = R.rrf([["a", "b"], ["b", "c"]])
    assert [h.offer_id for h in fused] == ["b", "a", "c"]
    assert [h.offer_id for h in R.rrf([["a", "b"], ["b", "a"]], weights=[0.9, 0.1])][0] == "a"


def test_retriever_modes(catalog, stores):
    r = R.OfferRetriever(catalog, store=stores["memory"])
    for mode in R.MODES:
        out = r.search("coffee beans online", k=3, mode=mode)
        assert len(out) == 3 and out["rank"].tolist() == [1, 2, 3] and set(out.score_kind) == {R.SCORE_KIND[mode]}
        assert out.offer_id.iloc[0] == "X02"
        assert r.timing["search_ms"] >= 0
    with pytest.raises(ValueError, match="mode"): r.search("x", mode="sparse")


@pytest.fixture(scope="module")
def client():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    app = FastAPI(); app.include_router(R.router)
    return TestClient(app)


@pytest.fixture(scope="module")
def smoke_model():
    "Notebook 02's SMOKE propensity model, trained once if the workspace has none (retrieval never trains it itself)."
    from loyaltylens import propensity
    return propensity.default_model(smoke=True)


@pytest.fixture(scope="module")
def smoke_world():
    from loyaltylens.features import default_world
    return default_world(smoke=True)


def test_router(client, smoke_model):
    from loyaltylens.features import default_world
    w = default_world(smoke=True)
    cid = R.customer_history(w, w.end).customer_id.iloc[0]
    r = client.post("/offers/retrieve", json={"customer_id": cid, "k": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["offers"]) <= 4 and body["latency_ms"] > 0 and body["filters"]["channel"] in ("mobile", "web", "in_store")
    assert all(o["channel"] == body["filters"]["channel"] for o in body["offers"])
    r = client.post("/offers/retrieve", json={"query": "coffee", "k": 3, "mode": "bm25", "backend": "memory"})
    assert r.status_code == 200 and len(r.json()["offers"]) == 3 and r.json()["score_kind"] == "bm25"
    assert client.post("/offers/retrieve", json={"k": 5}).status_code == 422
    for k in (0, 51):
        r = client.post("/offers/retrieve", json={"query": "x", "k": k})
        assert r.status_code == 422 and "k" in r.text
    assert client.post("/offers/retrieve", json={"customer_id": "C99999999"}).status_code == 404
    assert client.post("/offers/retrieve", json={"query": "x", "backend": "faiss"}).status_code == 422


def _cli(*args):
    return subprocess.run([sys.executable, "-c", "from loyaltylens.core import main; main()", *args],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "LOYALTYLENS_SMOKE": "1"})


def test_cli():
    r = _cli("offers", "search", "flights for the summer", "--k", "2", "--backend", "memory", "--smoke")
    assert r.returncode == 0, r.stderr
    assert "OF0" in r.stdout
    assert _cli("offers", "search", "x", "--k", "0", "--smoke").returncode == 2
    assert _cli("offers", "search", "--smoke").returncode == 2
    r = _cli("offers", "--help")
    assert r.returncode == 0 and all(c in r.stdout for c in ("index", "search", "bench"))


def test_store_backends_has_one_meaning():
    "Retrieval's vector stores are STORE_BACKENDS; BACKENDS (LLM backends in notebook 04) is not a retrieval name."
    assert R.STORE_BACKENDS == ("memory", "pgvector", "langchain", "llamaindex", "weaviate")
    assert not hasattr(R, "BACKENDS")


def test_ground_truth_relevant_offers_pass_the_query_filters(smoke_world, smoke_model):
    "A relevant offer the query's own filters exclude can never be retrieved: customer relevant sets lie within the filters."
    offers = smoke_world.load_offers()
    queries = R.ground_truth_queries(smoke_world, 60, smoke=True)
    cq = queries[queries.kind == "customer"]
    assert len(cq) > 0
    unreachable = {q.customer_id: sorted(q.relevant - set(offers.offer_id[R.filter_mask(offers, q.filters)])) for q in cq.itertuples()}
    assert {c: u for c, u in unreachable.items() if u} == {}
    assert queries.qid[queries.relevant.map(len) == 0].tolist() == []  # nothing left that no retriever could score
    assert queries.attrs["dropped_customer_queries"] >= 0


def _customer(world):
    return R.customer_history(world, world.end).customer_id.iloc[0]


def test_retrieve_for_customer_never_substitutes_the_observed_rate(smoke_world, catalog, monkeypatch):
    "With the propensity model missing, retrieval fails with the command that builds it instead of using another scale."
    from loyaltylens import propensity
    def missing(smoke=False, train_if_missing=True): raise FileNotFoundError("no model here")
    monkeypatch.setattr(propensity, "default_model", missing)
    r = R.OfferRetriever(smoke_world.load_offers(), "memory")
    with pytest.raises(FileNotFoundError, match="loyaltylens model train --smoke"):
        R.retrieve_for_customer(r, smoke_world, _customer(smoke_world), smoke=True)
    with pytest.raises(FileNotFoundError, match="loyaltylens model train`"):
        R.retrieve_for_customer(r, smoke_world, _customer(smoke_world), smoke=False)


def test_retrieve_for_customer_passes_smoke_to_the_propensity_model(smoke_world, monkeypatch):
    from loyaltylens import propensity
    asked = []
    class Half:
        def predict(self, df): return np.full(len(df), 0.5)
    def fake(smoke=False, train_if_missing=True):
        asked.append((smoke, train_if_missing)); return Half()
    monkeypatch.setattr(propensity, "default_model", fake)
    r = R.OfferRetriever(smoke_world.load_offers(), "memory")
    out = R.retrieve_for_customer(r, smoke_world, _customer(smoke_world), smoke=True)
    assert asked == [(True, False)]  # the SMOKE model, and never trained by a retrieval
    assert out.attrs["propensity"] == 0.5 and out.attrs["filters"]["min_propensity_lte"] == 0.5


def test_router_503_names_the_command_when_the_model_is_missing(client, smoke_world, monkeypatch):
    from loyaltylens import propensity
    def missing(smoke=False, train_if_missing=True): raise FileNotFoundError("no model here")
    monkeypatch.setattr(propensity, "default_model", missing)
    r = client.post("/offers/retrieve", json={"customer_id": _customer(smoke_world), "k": 3})
    assert r.status_code == 503 and "loyaltylens model train" in r.text, r.text


def test_fine_tune_writes_its_training_record_before_the_folder_appears(catalog, tmp_path, monkeypatch):
    "The model folder gets its final name only once loyaltylens_training.json is inside it (atomic for readers)."
    seen, rename = [], Path.rename
    def spy(self, target):
        if Path(self).is_dir(): seen.append((Path(target).name, sorted(p.name for p in Path(self).iterdir())))
        return rename(self, target)
    monkeypatch.setattr(Path, "rename", spy)
    texts = R.offer_texts(catalog)
    log = R.fine_tune([(texts[i], texts[i + 1]) for i in range(0, 12, 2)], tmp_path / "model", steps=2, batch_size=3, info={"note": "test"})
    assert len(log) == 2
    at_rename = [names for target, names in seen if target == "model"]
    assert at_rename and R.TRAINING_FILE in at_rename[0], seen
    record = json.loads((tmp_path / "model" / R.TRAINING_FILE).read_text())
    assert (record["note"], record["steps"], record["batch_size"]) == ("test", 2, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folder left


def test_compare_modes_reports_each_mode_on_its_own_queries(catalog):
    "Hand-made queries whose metrics are known: each row of compare_modes carries its own mode's and kind's numbers."
    q = pd.DataFrame([
        dict(kind="text", customer_id=None, text=R.offer_text(catalog.iloc[5]), filters=None, relevant={"X06"}),
        dict(kind="text", customer_id=None, text="qwertyuiop zxcvbnm", filters=None, relevant={"X01"}),
        dict(kind="customer", customer_id="C00000001", text="FuelUp car wash", filters={"channel": "mobile"}, relevant={"X05"}),
    ]).rename_axis("qid").reset_index()
    modes = R.compare_modes(catalog, q).set_index(["mode", "queries"])
    assert modes.index.get_level_values("mode").unique().tolist() == ["dense", "bm25", "hybrid", "hybrid 0.7/0.3"]
    assert modes["n"].to_dict() == {(m, k): n for m in ["dense", "bm25", "hybrid", "hybrid 0.7/0.3"] for k, n in [("all", 3), ("customer", 1), ("text", 2)]}
    bm25 = modes.loc["bm25"]
    assert bm25.loc["text", "mrr"] == 0.5  # the exact title first; the nonsense query finds nothing
    assert bm25.loc["text", "p@5"] == pytest.approx(0.1)  # one relevant in the first top 5, none in the second
    assert bm25.loc["customer", "mrr"] == 1.0 and bm25.loc["all", "mrr"] == pytest.approx(2 / 3)
    assert modes.loc[("dense", "customer"), "mrr"] == 1.0 and modes.loc[("dense", "customer"), "r@5"] == 1.0


def test_demo_step_honours_smoke(smoke_model, monkeypatch):
    "`make demo` under LOYALTYLENS_SMOKE retrieves from the SMOKE world with the SMOKE propensity model."
    from loyaltylens import features
    asked, real = [], features.default_world
    def spy(smoke=False, *a, **kw):
        asked.append(smoke); return real(smoke, *a, **kw)
    monkeypatch.setattr(features, "default_world", spy)
    monkeypatch.setenv("LOYALTYLENS_SMOKE", "1")
    out = R._demo_retrieval()
    path = next(iter(out.values()))
    assert asked and set(asked) == {True}, asked
    assert path.name == "demo_offers_smoke.csv" and len(pd.read_csv(path)) > 0


def test_customer_query_rows_read_only_the_fine_tuning_half_before_the_split(smoke_world):
    "Every positive was redeemed by a fine-tuning-half customer in [as_of, until) before T; every passed-over offer was shown there and not redeemed."
    T = R.split_time(smoke_world)
    pairs = R.customer_query_pairs(smoke_world, max_pairs=300)
    negatives = R.passed_offers(smoke_world, pairs)
    assert len(pairs) > 0 and not pairs.customer_id.map(R.is_eval_customer).any() and (pairs.until <= T).all()
    ev = R.customer_events(smoke_world, pairs.customer_id.unique())
    window = pairs.assign(negative=negatives).merge(ev[["customer_id", "event_type", "offer_id", "timestamp"]], on="customer_id", suffixes=("", "_ev"))
    window = window[(window.timestamp >= window.as_of) & (window.timestamp < window.until)]
    red = window[window.event_type == "redeem"]
    assert set(zip(pairs.customer_id, pairs.as_of, pairs.offer_id)) <= set(zip(red.customer_id, red.as_of, red.offer_id_ev))
    taken = set(zip(red.customer_id, red.as_of, red.offer_id_ev))
    shown = set(zip(window.customer_id[window.event_type == "offer_view"], window.as_of[window.event_type == "offer_view"], window.offer_id_ev[window.event_type == "offer_view"]))
    keys = list(zip(pairs.customer_id, pairs.as_of, negatives))
    assert not any(k in taken for k in keys)  # never an offer the customer redeemed in the window
    assert np.mean([k in shown for k in keys]) > 0.5, "most negatives should be offers the customer was shown"
