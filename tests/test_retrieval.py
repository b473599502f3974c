"""Integration tests of loyaltylens.retrieval: every store path (filters, empty results, k bounds, agreement on an
exact-match query), BM25/RRF, the router, the CLI, and the Weaviate path (runs only when a server is reachable)."""
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("LOYALTYLENS_SMOKE", "1")  # the router and CLI serve the small world

from loyaltylens import retrieval as R

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


def test_router(client):
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
