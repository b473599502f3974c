"""Durability suite (issue 16): a process SIGKILLed in the middle of a write leaves every store readable and
consistent. The suite, in one place:

- the feature store (module 1): a writer killed at several moments of a 3M-row version leaves only complete versions;
- the feedback store (module 6): SIGKILL of the API server and of PostgreSQL mid-load loses no acknowledged judgement
  and stores none twice (and the 20 x 250 load test they share their server with);
- the prompt registry (module 5): a process killed during `prompt activate` leaves `active.yaml` valid, its active
  version the last entry of a history that only ever grows by whole entries.

Run the whole suite: `pytest tests/test_durability.py`; `LOYALTYLENS_KILL_REPEATS=20` repeats each kill test."""
import os, random, shutil, signal, subprocess, sys, textwrap, threading, time, uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from loyaltylens import feedback as fb
from loyaltylens.features import FeatureStore
from loyaltylens.generation import PromptRegistry
from test_feedback import make_pairs, postgres_env

ROOT = Path(__file__).resolve().parents[1]
PY = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable
REPEATS = range(int(os.environ.get("LOYALTYLENS_KILL_REPEATS", "1")))  # each kill test runs this many times in a row


# ---------------------------------------------------------------- prompt registry: kill `prompt activate`
KILLS = 12  # SIGKILLs per run, each at a different moment of a stream of activations
MAX_DELAY_S = 0.25  # the latest kill, after the child's first activation is under way

ACTIVATOR = """
import sys
from loyaltylens.generation import PromptRegistry
reg, versions = PromptRegistry(sys.argv[1]), sys.argv[2:]
print("ready", flush=True)
i = 0
while True:  # activate, activate, ... until killed
    reg.activate(versions[i % len(versions)], by="durability-test", reason=f"activation {i}"); i += 1
"""


def check_registry(root: Path, before: list[dict]) -> int:
    "active.yaml parses and validates, its active version is the last in its history, the old history is a prefix of the new; returns the new entries."
    reg = PromptRegistry(root)
    history = [h.model_dump() for h in reg.history()]  # raises PromptError on a truncated or invalid file
    assert history[:len(before)] == before, "the history before the kill was rewritten"
    assert reg.active_version() == history[-1]["version"], (reg.active_version(), history[-1])
    reasons = [h["reason"] for h in history[len(before):]]
    assert reasons == [f"activation {i}" for i in range(len(reasons))], reasons  # whole entries, in order, none lost mid-way
    return len(reasons)


def kill_during_activations(root: Path, delay: float) -> int:
    "Start a child activating versions of `root` in a loop; SIGKILL it `delay` s after it is ready. Returns its return code."
    versions = [v for v in PromptRegistry(root).versions()][:2]
    proc = subprocess.Popen([sys.executable, "-c", ACTIVATOR, str(root), *versions], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL); proc.wait()
    return proc.returncode


def test_killed_prompt_activation_leaves_a_valid_active_yaml(tmp_path, root):
    prompts = tmp_path / "prompts"
    shutil.copytree(root / "prompts", prompts, ignore=shutil.ignore_patterns("*.lock"))
    before = [h.model_dump() for h in PromptRegistry(prompts).history()]
    rng, outcomes = random.Random(16), []
    for i in range(KILLS):
        delay = MAX_DELAY_S * i / (KILLS - 1) + rng.uniform(0, 0.01)  # spread over the run, jittered: different moments
        rc = kill_during_activations(prompts, delay)
        assert rc == -signal.SIGKILL, f"the child ended by itself ({rc}) before the kill"
        added = check_registry(prompts, before)
        before = [h.model_dump() for h in PromptRegistry(prompts).history()]  # the next kill must keep this one's result
        outcomes.append(added)
    t = time.perf_counter()
    PromptRegistry(prompts).activate("v1", by="durability-test", reason="after the kills")  # the lock a killed child held is free
    assert time.perf_counter() - t < 5
    leftovers = sorted(p.name for p in prompts.glob(".active.yaml.*.tmp"))
    print(f"\nprompt activate: {KILLS} SIGKILLs, activations completed before each kill: {outcomes}; temp files left: {len(leftovers)}")
    assert sum(outcomes) > 0, "no kill happened after an activation: the test did not exercise writes"


def test_killed_cli_activation_leaves_a_valid_active_yaml(tmp_path, root):
    "The CLI path: `loyaltylens prompt activate` on a copy of prompts/ (LOYALTYLENS_PROMPTS_DIR), killed mid-way or after."
    prompts = tmp_path / "prompts"
    shutil.copytree(root / "prompts", prompts, ignore=shutil.ignore_patterns("*.lock"))
    before = [h.model_dump() for h in PromptRegistry(prompts).history()]
    proc = subprocess.Popen([sys.executable, "-c", "from loyaltylens.core import main; main()", "prompt", "activate", "v1",
                             "--note", "activation 0"], env={**os.environ, "LOYALTYLENS_PROMPTS_DIR": str(prompts)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while not (proc.poll() is not None or any(prompts.glob(".active.yaml.*")) or "active: v1" in (prompts / "active.yaml").read_text()):
        time.sleep(0.001)  # until the write is under way (its temp file exists) or done
    proc.send_signal(signal.SIGKILL); proc.wait()
    assert check_registry(prompts, before) in (0, 1)


# ---------------------------------------------------------------- feature store: kill a writer mid-version
BIG_ROWS = 3_000_000  # rows of the killed version: large enough that the write takes about a second or more
KILL_DELAYS = [0.0, 0.3, 0.8]  # seconds between the write getting under way and the SIGKILL
BIG_FRAME = textwrap.dedent("""
    import numpy as np, pandas as pd
    def big_frame(n):
        rng = np.random.default_rng(0)
        return pd.DataFrame({"customer_id": [f"K{i:09d}" for i in range(n)], "recency_days": rng.integers(0, 90, n),
                             "frequency_30d": rng.integers(0, 9, n), "monetary_90d": rng.uniform(0, 500, n),
                             "offer_redemption_rate": rng.uniform(0, 1, n), "channel_preference": "web",
                             "engagement_score": rng.uniform(0, 1, n)})
""")
WRITER = BIG_FRAME + textwrap.dedent("""
    import sys
    from loyaltylens.features import FeatureStore
    df = big_frame(int(sys.argv[2]))
    print("writing", flush=True)
    FeatureStore(sys.argv[1]).write("big", df, "2024-06-01", {"events": "none"})
    print("done", flush=True)
""")


def _small(n=50):
    rng = np.random.default_rng(1)
    return pd.DataFrame({"customer_id": [f"S{i:04d}" for i in range(n)], "recency_days": rng.integers(0, 90, n),
                         "frequency_30d": rng.integers(0, 9, n), "monetary_90d": rng.uniform(0, 500, n),
                         "offer_redemption_rate": rng.uniform(0, 1, n), "channel_preference": "mobile",
                         "engagement_score": rng.uniform(0, 1, n)})


def _checksums(con, version):
    "Row count and per-column sums of one version, straight from the table."
    return con.execute("SELECT count(*), sum(recency_days), sum(frequency_30d), sum(monetary_90d), sum(offer_redemption_rate), "
                       "sum(engagement_score), count(DISTINCT customer_id), min(customer_id), max(customer_id) "
                       "FROM features WHERE version = ?", [version]).fetchall()[0]


def _kill_writer(path: Path, delay: float) -> str:
    """Start a writer of version 'big' into `path`, SIGKILL it `delay` s after its write is under way.
    Returns 'torn' (killed before its commit), 'killed-after-commit' or 'finished' (it exited before the signal)."""
    before = path.stat().st_size
    proc = subprocess.Popen([PY, "-c", WRITER, str(path), str(BIG_ROWS)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    wal = Path(f"{path}.wal")
    deadline = time.monotonic() + 120  # wait until the write is under way (the file or its WAL grows), then kill
    while time.monotonic() < deadline and proc.poll() is None:
        if path.stat().st_size != before or (wal.exists() and wal.stat().st_size > 0): break
        time.sleep(0.005)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode != -signal.SIGKILL: return "finished"
    return "killed-after-commit" if "big" in FeatureStore(path).versions().version.tolist() else "torn"


@pytest.mark.parametrize("run", REPEATS)
def test_killed_writer_leaves_only_complete_versions(tmp_path, run):
    """SIGKILL a writer at several moments of a 3M-row version. Whatever the moment, the store shows either no 'big'
    or all of it (rows and values), 'v1' is untouched, no stray rows exist and the store stays writable. The kill must
    land before the commit at least once, or the test proved nothing."""
    import duckdb
    ns: dict = {}
    exec(BIG_FRAME, ns)
    big = ns["big_frame"](BIG_ROWS)
    want = (BIG_ROWS, int(big.recency_days.sum()), int(big.frequency_30d.sum()), big.monetary_90d.sum(),
            big.offer_redemption_rate.sum(), big.engagement_score.sum(), BIG_ROWS, big.customer_id.min(), big.customer_id.max())
    outcomes = {}
    for delay in KILL_DELAYS:
        path = tmp_path / f"store-{delay}.duckdb"
        FeatureStore(path).write("v1", _small(), "2024-05-01", {"events": "none"})
        outcomes[delay] = outcome = _kill_writer(path, delay)
        reopened = FeatureStore(path)
        vs = reopened.versions()
        assert vs.version.tolist() == (["v1"] if outcome == "torn" else ["v1", "big"]), (delay, outcome, vs.version.tolist())
        con = duckdb.connect(str(path), read_only=True)
        try:
            if outcome != "torn":  # visible, so it must be complete: every row, every value
                got = _checksums(con, "big")
                assert got[0] == want[0] and got[1:3] == want[1:3] and got[6:] == want[6:], (delay, got, want)
                np.testing.assert_allclose(got[3:6], want[3:6], rtol=1e-9, err_msg=f"delay {delay}")
                assert int(vs.set_index("version").loc["big", "n_rows"]) == BIG_ROWS
            stray = con.execute("SELECT count(*) FROM features WHERE version NOT IN (SELECT version FROM feature_versions)").fetchall()[0][0]
        finally: con.close()
        assert stray == 0, (delay, outcome, stray)
        pd.testing.assert_frame_equal(reopened.get_many(_small().customer_id, "v1"), _small(), check_dtype=False)
        reopened.write("v2", _small(), "2024-06-01", {"events": "none"})  # still writable
        assert reopened.versions().version.tolist()[-1] == "v2"
    print("kill outcomes by delay:", outcomes)
    assert "torn" in outcomes.values(), f"no kill landed before the commit, so nothing was tested: {outcomes}"


# ---------------------------------------------------------------- feedback store: load and SIGKILL through the real HTTP server
# (uvicorn process, loopback). This file's own PostgreSQL, under /tmp: the shared workspace's server is never touched.


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
