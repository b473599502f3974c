"""Module 6 load and durability, through the real HTTP server (uvicorn process, loopback): 20 clients x 250 POSTs store
exactly 5,000 rows with no 5xx; SIGKILL of the API server mid-load, and SIGKILL of the PostgreSQL server mid-load then its
restart, lose no acknowledged row and duplicate none. The PostgreSQL here is this file's own, under /tmp: the shared
workspace's server is never touched. LOYALTYLENS_KILL_REPEATS=5 runs each kill test five times in a row."""
import os, threading, time, uuid
from collections import Counter

import pytest

from loyaltylens import feedback as fb
from test_feedback import make_pairs, postgres_env

REPEATS = range(int(os.environ.get("LOYALTYLENS_KILL_REPEATS", "1")))
KILL_AFTER_ROWS = 300  # kill once this many rows are in: mid-load, with clients in flight


@pytest.fixture(scope="module")
def pg():
    "This file's own PostgreSQL: the kill test stops and restarts it."
    yield from postgres_env()


@pytest.fixture
def setup(pg, monkeypatch):
    "A fresh schema with one pair; returns (schema, pair_id)."
    schema = f"d_{uuid.uuid4().hex[:10]}"
    monkeypatch.setenv("LOYALTYLENS_FEEDBACK_SCHEMA", schema)
    pair = make_pairs(1)[0]
    with fb.open_store(schema) as conn: fb.store_pairs(conn, [pair])
    return schema, pair["pair_id"]


def rows(schema: str) -> tuple[int, set]:
    "Row count and the set of idempotency keys stored (a fresh connection: the server may have been restarted)."
    with fb.connect(schema) as conn:
        keys = [str(k) for (k,) in conn.execute("SELECT idempotency_key FROM feedback")]
    return len(keys), set(keys)


def wait_for_rows(schema: str, n: int, timeout: float = 60):
    t = time.monotonic()
    while rows(schema)[0] < n:
        assert time.monotonic() - t < timeout, f"fewer than {n} rows after {timeout}s"
        time.sleep(0.05)


def check_durable(schema: str, r: dict) -> dict:
    "Every acknowledged key stored, none twice; the report line of a kill test."
    n, keys = rows(schema)
    lost = set(r["acked"]) - keys
    assert not lost, f"{len(lost)} acknowledged rows lost"
    assert n == len(keys), f"{n - len(keys)} duplicated rows"
    assert len(r["acked"]) == r["sent"], f"{r['sent'] - len(r['acked'])} judgements never acknowledged"
    assert n == r["sent"]
    return {"sent": r["sent"], "acked": len(r["acked"]), "rows": n, "lost": len(lost), "statuses": dict(Counter(r["statuses"]))}


def test_load_20_clients_x_250_posts(setup):
    schema, pair_id = setup
    port = fb.free_port()
    proc = fb.start_server(port, {"LOYALTYLENS_FEEDBACK_SCHEMA": schema})
    try: r = fb.post_judgements(port, pair_id, clients=20, per_client=250)
    finally: proc.kill(); proc.wait()
    statuses = Counter(r["statuses"])
    n, keys = rows(schema)
    print(f"\ningest: {len(r['acked'])} acknowledged writes in {r['seconds']:.2f}s = {r['rate']:.0f}/s; statuses {dict(statuses)}; "
          f"load average {os.getloadavg()[0]:.1f}")
    assert not [s for s in statuses if s >= 500 or s == 0], statuses
    assert (len(r["acked"]), n, len(keys)) == (5000, 5000, 5000)
    assert set(r["acked"]) == keys


@pytest.mark.parametrize("run", REPEATS)
def test_sigkill_api_server_mid_load(setup, run):
    schema, pair_id = setup
    port, env = fb.free_port(), {"LOYALTYLENS_FEEDBACK_SCHEMA": schema}
    proc, result = fb.start_server(port, env), {}
    load = threading.Thread(target=lambda: result.update(fb.post_judgements(port, pair_id, clients=10, per_client=150, timeout=120)))
    load.start()
    try:
        wait_for_rows(schema, KILL_AFTER_ROWS)
        proc.kill(); proc.wait()  # SIGKILL: no shutdown handler runs
        before_restart = rows(schema)[0]
        proc = fb.start_server(port, env)
        load.join()
    finally:
        proc.kill(); proc.wait(); load.join()
    report = check_durable(schema, result)
    print(f"\nAPI SIGKILL run {run}: killed at {before_restart} rows; {report}")
    assert report["statuses"].get(0, 0) > 0  # clients really saw the server die mid-load
    assert not [s for s in report["statuses"] if s >= 500 and s != 503]


@pytest.mark.parametrize("run", REPEATS)
def test_sigkill_postgres_mid_load_then_restart(setup, pg, run):
    schema, pair_id = setup
    port = fb.free_port()
    proc, result = fb.start_server(port, {"LOYALTYLENS_FEEDBACK_SCHEMA": schema}), {}
    load = threading.Thread(target=lambda: result.update(fb.post_judgements(port, pair_id, clients=10, per_client=150, timeout=120)))
    load.start()
    try:
        wait_for_rows(schema, KILL_AFTER_ROWS)
        pg.kill()  # SIGKILL of the postmaster; its backends exit with it
        time.sleep(0.5)  # clients get 503 meanwhile
        pg.start()  # crash recovery replays the write-ahead log
        load.join()
    finally:
        proc.kill(); proc.wait(); load.join()
    report = check_durable(schema, result)
    print(f"\nPostgreSQL SIGKILL run {run}: {report}")
    assert report["statuses"].get(503, 0) > 0  # the outage was seen, and answered with 503 (retry), never 500
    assert not [s for s in report["statuses"] if s >= 500 and s != 503]
