"""The one app under real traffic (`loyaltylens serve` as a real process, driven over loopback HTTP): concurrent copy
requests get exactly the copy each gets alone (one owner of the llama.cpp context, each attempt from the shared prefix);
mixed requests while a new feature snapshot is published are answered wholly from the old or the new snapshot; an
empty workspace answers 503s naming `loyaltylens pipeline prepare` and every route answers once the artefacts exist,
without a restart; a killed background precompute shows on /health."""
import asyncio, os, random, re, shutil, signal, time
from pathlib import Path

import httpx
import pandas as pd
import pytest

from loyaltylens import features as fs, propensity as prop, retrieval as ret
from loyaltylens.core import get_settings, pg_url
from loyaltylens.pipeline import LoyaltyLensPipeline, serve_process, stop_process

SMOKE = True  # the small world: concurrency does not depend on the world's size
COPY_FIELDS = ("headline", "body", "cta", "tone")
PAIRS = 8  # distinct copy requests; each is sent twice in the concurrent burst (16 at once)
MIXED = 64  # concurrent mixed requests per round while the snapshot is published
COPY_TIMEOUT_S = "900"  # the copy queue admits the whole burst: 16 copies in turn on a busy 2-core machine


@pytest.fixture(scope="module")
def built():
    "The SMOKE artefacts (as `loyaltylens pipeline prepare --smoke` builds them) and a few customers and offers."
    fs.default_store(SMOKE); prop.default_model(SMOKE); ret.serving_retriever("pgvector", SMOKE)
    pl = LoyaltyLensPipeline(SMOKE, precompute="load")
    pl.precompute()
    from loyaltylens.generation import copy_gguf_path
    copy_gguf_path()
    return pl


def shared_home(tmp_path: Path, copy_store: bool) -> dict:
    "A LOYALTYLENS_HOME of this test over the shared workspace (symlinks), with its own copy of the feature store when asked, and the shared PostgreSQL."
    shared = get_settings().workspace
    for entry in shared.iterdir():
        if entry.name in ("features", "pipeline") and copy_store: continue
        (tmp_path / entry.name).symlink_to(entry)
    if copy_store:
        (tmp_path / "features").mkdir()
        shutil.copy(fs.default_store_path(SMOKE), tmp_path / "features" / fs.default_store_path(SMOKE).name)
        (tmp_path / "pipeline" / "tables").mkdir(parents=True)
        for f in (shared / "pipeline" / "tables").glob("*.npz"): (tmp_path / "pipeline" / "tables" / f.name).symlink_to(f)
    return {"LOYALTYLENS_HOME": str(tmp_path), "LOYALTYLENS_PG_URL": pg_url(), "LOYALTYLENS_SMOKE": "1", "LOYALTYLENS_LLM_BACKEND": "local",
            "LOYALTYLENS_API_TOKEN": "", "LOYALTYLENS_RELOAD_POLL_S": "0.2", "LOYALTYLENS_COPY_TIMEOUT_S": COPY_TIMEOUT_S}


async def fire(url: str, requests: list[tuple[str, str, dict | None]]) -> list[httpx.Response]:
    "Send every request at once (one connection each)."
    async with httpx.AsyncClient(base_url=url, timeout=float(COPY_TIMEOUT_S), limits=httpx.Limits(max_connections=len(requests))) as c:
        return await asyncio.gather(*(c.request(m, p, json=b) for m, p, b in requests))


def test_concurrent_copies_equal_each_alone(built, tmp_path):
    "16 /copy/generate at once (8 requests, each twice, shuffled): every answer is valid copy, identical to the same request alone."
    ids, offers = built.sample_customers(PAIRS, seed=5), sorted(built._offers)
    bodies = [{"customer_id": c, "offer_id": offers[(7 * i) % len(offers)]} for i, c in enumerate(ids)]
    proc, url = serve_process(shared_home(tmp_path, copy_store=False), timeout=300)
    try:
        alone = {}
        for b in bodies:
            r = httpx.post(f"{url}/copy/generate", json=b, timeout=300)
            assert r.status_code == 200, r.text
            alone[b["customer_id"]] = {k: r.json()[k] for k in COPY_FIELDS}
        burst = bodies * 2
        random.Random(0).shuffle(burst)
        answers = asyncio.run(fire(url, [("POST", "/copy/generate", b) for b in burst]))
    finally: stop_process(proc)
    for b, r in zip(burst, answers):
        assert r.status_code == 200, (b, r.status_code, r.text)
        assert {k: r.json()[k] for k in COPY_FIELDS} == alone[b["customer_id"]], (b, r.json(), alone[b["customer_id"]])


def new_snapshot(store: fs.FeatureStore) -> tuple[str, pd.DataFrame, pd.Timestamp]:
    "A snapshot one day after the newest, every engagement score shifted a little (so answers say which snapshot they came from)."
    old = store.versions().iloc[-1]
    df = fs._frame(store, old.version)
    df["engagement_score"] = (df.engagement_score * 0.5).round(6)
    return f"{old.version}-republished", df, pd.Timestamp(old.as_of) + pd.Timedelta(days=1)


def mixed_request(i: int, cid: str, row: dict) -> tuple[str, str, dict | None]:
    "The i-th request of a round: features, pipeline, propensity and retrieval in turn (each customer gets each kind across rounds)."
    return [("GET", f"/features/{cid}", None), ("POST", f"/pipeline/{cid}?copy=false", None), ("POST", "/propensity/predict", row),
            ("POST", "/offers/retrieve", {"customer_id": cid})][(i + i // 4) % 4]


def test_mixed_load_while_a_snapshot_is_published(built, tmp_path):
    "Rounds of 64 concurrent mixed requests while a new snapshot lands: no 5xx, every answer wholly from the old or the new snapshot."
    env = shared_home(tmp_path, copy_store=True)
    path = tmp_path / "features" / fs.default_store_path(SMOKE).name
    store = fs.FeatureStore(path)
    old_version = store.versions().version.iloc[-1]
    ids = built.sample_customers(16, seed=9)
    old = {c: store.get(c, old_version) for c in ids}
    version, df, as_of = new_snapshot(store)
    new = {c: {**old[c], "engagement_score": float(df.set_index("customer_id").engagement_score[c])} for c in ids}
    rows = [{k: old[c][k] for k in fs.FEATURE_COLUMNS} for c in ids]
    proc, url = serve_process(env, timeout=300)
    seen, published, t0 = set(), False, time.monotonic()
    try:
        while seen != {old_version, version} and time.monotonic() - t0 < 120:
            reqs = [mixed_request(i, ids[i % len(ids)], rows[i % len(ids)]) for i in range(MIXED)]
            answers = asyncio.run(fire(url, reqs)) if published else None
            if not published:  # publish while the first round is in flight
                async def round_and_publish():
                    task = asyncio.ensure_future(fire(url, reqs))
                    await asyncio.sleep(0.05)
                    await asyncio.to_thread(fs.FeatureStore(path).write, version, df, as_of)
                    return await task
                answers, published = asyncio.run(round_and_publish()), True
            for (m, p, _), r in zip(reqs, answers):
                assert r.status_code == 200, (m, p, r.status_code, r.text)
                body = r.json()
                if p.startswith("/features/"):
                    want = {version: new, old_version: old}[body["version"]][body["customer_id"]]
                    assert {k: body[k] for k in fs.FEATURE_COLUMNS} == {k: want[k] for k in fs.FEATURE_COLUMNS}, (body, want)
                    seen.add(body["version"])
                elif p.startswith("/pipeline/"):
                    want = {version: new, old_version: old}[body["feature_version"]][body["customer_id"]]
                    assert body["features"] == {k: want[k] for k in fs.FEATURE_COLUMNS}, (body["features"], want)
                    seen.add(body["feature_version"])
        assert seen == {old_version, version}, seen
    finally: stop_process(proc)


def test_empty_workspace_then_prepare(built, tmp_path):
    "An empty workspace: 503s naming the command, nothing built; once the artefacts exist every route answers, without a restart."
    home = tmp_path / "home"; home.mkdir()
    env = {"LOYALTYLENS_HOME": str(home), "LOYALTYLENS_PG_URL": pg_url(), "LOYALTYLENS_SMOKE": "1", "LOYALTYLENS_LLM_BACKEND": "local",
           "LOYALTYLENS_API_TOKEN": "", "LOYALTYLENS_RELOAD_POLL_S": "0.2"}
    cid, offer = built.sample_customers(1, seed=2)[0], sorted(built._offers)[0]
    routes = [("GET", f"/features/{cid}", None), ("POST", f"/pipeline/{cid}?copy=false", None), ("POST", "/offers/retrieve", {"customer_id": cid}),
              ("POST", "/copy/generate", {"customer_id": cid, "offer_id": offer}), ("GET", "/propensity/model", None)]
    proc, url = serve_process(env, timeout=300)
    try:
        for m, p, b in routes:
            r = httpx.request(m, f"{url}{p}", json=b, timeout=60)
            assert r.status_code == 503 and "loyaltylens pipeline prepare" in r.json()["detail"], (p, r.status_code, r.text)
        assert not any(home.joinpath("worlds").iterdir()) and not any(home.joinpath("models").glob("*"))  # nothing was built
        shared = get_settings().workspace  # what `loyaltylens pipeline prepare --smoke` leaves in a workspace (built once, shared)
        for name in ("worlds", "features", "models", "pipeline"):
            target = home / name
            if target.is_dir() and not any(target.iterdir()): target.rmdir()
            if not target.exists(): target.symlink_to(shared / name)
        t0 = time.monotonic()
        while httpx.get(f"{url}/health", timeout=60).json()["status"] != "ok":
            assert time.monotonic() - t0 < 120, httpx.get(f"{url}/health").json()
            time.sleep(0.5)
        for m, p, b in routes:
            r = httpx.request(m, f"{url}{p}", json=b, timeout=300)
            assert r.status_code == 200, (p, r.status_code, r.text)
    finally: stop_process(proc)


def test_killed_precompute_shows_on_health(built, tmp_path):
    "A new snapshot without a table: the app precomputes it in a background process; kill that process and /health says so, while requests still answer."
    env = shared_home(tmp_path, copy_store=True)
    path = tmp_path / "features" / fs.default_store_path(SMOKE).name
    version, df, as_of = new_snapshot(fs.FeatureStore(path))
    fs.FeatureStore(path).write(version, df, as_of)
    proc, url = serve_process(env, timeout=300)
    try:
        table = httpx.get(f"{url}/health", timeout=60).json()["backends"]["snapshot table"]
        pid = re.search(r"pid (\d+)", table["detail"])
        assert pid, table
        os.kill(int(pid[1]), signal.SIGKILL)
        t0 = time.monotonic()
        while not (failure := httpx.get(f"{url}/health", timeout=60).json()["backends"]["snapshot table"]["last_failure"]):
            assert time.monotonic() - t0 < 60
            time.sleep(0.2)
        assert f"precompute of snapshot {version} was killed by signal 9" in failure, failure
        cid = built.sample_customers(1, seed=4)[0]
        r = httpx.post(f"{url}/pipeline/{cid}", params={"copy": "false"}, timeout=120)
        assert r.status_code == 200 and r.json()["served_from"] == "on_request" and r.json()["feature_version"] == version, r.text
    finally: stop_process(proc)
