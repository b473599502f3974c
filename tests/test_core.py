"""Foundation: embedded services and packaged models work offline; the CLI root and doctor behave."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from loyaltylens import core

BIN = Path(sys.executable).parent


NETWORK_GUARD = textwrap.dedent("""
    import socket, sys
    _connect = socket.socket.connect
    def refuse(self, address, *args):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            print(f"BLOCKED connect to {address}", file=sys.stderr)
            raise OSError(f"network blocked by the test: {address}")
        return _connect(self, address, *args)
    socket.socket.connect = refuse
    _resolve = socket.getaddrinfo
    def resolve(host, *args, **kwargs):
        if host not in (None, "localhost", "127.0.0.1", "::1"):
            print(f"BLOCKED lookup of {host}", file=sys.stderr)
            raise OSError(f"network blocked by the test: {host}")
        return _resolve(host, *args, **kwargs)
    socket.getaddrinfo = resolve
""")


def test_models_load_with_the_network_blocked():
    "Nothing downloads at run time: with the hub's offline flags unset and every TCP connect refused, MiniLM and Gemma load and run."
    script = NETWORK_GUARD + textwrap.dedent("""
        from loyaltylens import core
        print(core.load_minilm().encode(["cat"]).shape[1])
        print(core.load_llm("llama-cpp").complete("Perks: free coffee,", max_tokens=4).completion_tokens)
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "BLOCKED" not in out.stderr, out.stderr[-2000:]
    dims, tokens = out.stdout.split()[-2:]
    assert (dims, int(tokens) > 0) == ("384", True)


def test_settings_public_masks_credentials_in_urls():
    s = core.Settings(LOYALTYLENS_PG_URL="postgresql://user:secret@host/db", MLFLOW_TRACKING_URI="https://ml:secret@mlflow.example.com",
                      OPENAI_BASE_URL="http://u:secret@127.0.0.1:8000/v1", OPENAI_API_KEY="sk-secret", GITHUB_TOKEN="ghp_secret")
    pub = s.public()
    assert pub["pg_url"] == "postgresql://user:***@host/db"
    assert pub["mlflow_uri"] == "https://ml:***@mlflow.example.com"
    assert pub["openai_base_url"] == "http://u:***@127.0.0.1:8000/v1"
    assert [k for k, v in pub.items() if "secret" in str(v)] == []
    assert core.mask_credentials("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"  # nothing to hide: unchanged


def test_embedded_postgres_pgvector_hnsw_finds_true_neighbour():
    rng = np.random.default_rng(7)
    vecs = rng.normal(size=(500, 384)).astype(np.float32)
    target = 123
    query = vecs[target] + rng.normal(scale=0.05, size=384).astype(np.float32)
    exact = int(np.argmax((vecs @ query) / np.linalg.norm(vecs, axis=1)))
    with core.pg_connect() as conn:
        assert core.ensure_vector_extension(conn)
        conn.execute("DROP TABLE IF EXISTS test_core_hnsw")
        conn.execute("CREATE TABLE test_core_hnsw (id int PRIMARY KEY, embedding vector(384))")
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO test_core_hnsw VALUES (%s, %s)", list(enumerate(vecs)))
        conn.execute("CREATE INDEX ON test_core_hnsw USING hnsw (embedding vector_cosine_ops)")
        plan = "\n".join(r[0] for r in conn.execute(
            "EXPLAIN SELECT id FROM test_core_hnsw ORDER BY embedding <=> %s LIMIT 1", (query,)).fetchall())
        conn.execute("SET enable_seqscan = off")
        got = conn.execute("SELECT id FROM test_core_hnsw ORDER BY embedding <=> %s LIMIT 1", (query,)).fetchone()[0]
        conn.execute("DROP TABLE test_core_hnsw")
    assert got == exact == target
    assert "hnsw" in plan.lower() or "Index Scan" in plan


def test_parallel_first_start_of_embedded_postgres(tmp_path):
    "Three processes start the embedded server on a fresh data folder at once: the file lock makes all succeed."
    script = textwrap.dedent("""
        from loyaltylens.core import pg_connect
        with pg_connect() as c: print(c.execute("SELECT 1").fetchone()[0])
    """)
    env = {**os.environ, "LOYALTYLENS_HOME": str(tmp_path / "ws")}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [o[1][-500:] for o in outs]
    assert [o[0].strip() for o in outs] == ["1", "1", "1"]


def test_minilm_embeddings_offline():
    v = core.load_minilm().encode(["cat", "kitten", "stocks"], normalize_embeddings=True)
    assert v.shape == (3, 384)
    assert v[0] @ v[1] > v[0] @ v[2]


def test_gemma_llama_cpp_generates():
    c = core.load_llm("llama-cpp").complete("Loyalty perks: free coffee, double points,", max_tokens=8)
    assert c.runtime == "llama-cpp" and c.text.strip() and c.completion_tokens > 0


def test_gemma_transformers_fallback_generates():
    c = core.load_llm("transformers").complete("Loyalty perks: free coffee, double points,", max_tokens=8)
    assert c.runtime == "transformers" and c.text.strip() and c.completion_tokens > 0


def test_mlflow_store_is_sqlite_in_workspace():
    import mlflow
    exp_id = core.mlflow_experiment("test-core")
    assert core.mlflow_uri().startswith("sqlite:///")
    with mlflow.start_run(experiment_id=exp_id) as run:
        mlflow.log_metric("x", 1.0)
        mlflow.log_text("hello", "note.txt")
    assert str(core.get_settings().workspace) in mlflow.get_run(run.info.run_id).info.artifact_uri


def test_cli_help_and_bad_option():
    out = subprocess.run([BIN / "loyaltylens", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "doctor" in out.stdout and "demo" in out.stdout
    bad = subprocess.run([BIN / "loyaltylens", "doctor", "--no-such-flag"], capture_output=True, text=True)
    assert bad.returncode == 2 and "no-such-flag" in bad.stderr


def test_doctor_exits_zero_with_a_line_per_backend():
    out = subprocess.run([BIN / "loyaltylens", "doctor"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    for backend in ["duckdb", "postgres+pgvector", "mlflow store", "MiniLM", "Gemma via llama-cpp",
                    "Gemma via transformers", "OpenAI", "Weaviate", "node", "chromium", "java", "spark"]:
        assert backend in out.stdout, backend


def test_doctor_fails_when_a_required_backend_is_broken_and_masks_credentials(tmp_path):
    """A PostgreSQL URL that cannot be reached is a broken required backend: exit 1, and the line says why.
    Passwords inside the URLs doctor prints (PostgreSQL, MLflow, an OpenAI-compatible server) never appear."""
    env = {**os.environ, "LOYALTYLENS_PG_URL": "postgresql://nobody:pg-s3cret@127.0.0.1:1/none?connect_timeout=2",
           "OPENAI_BASE_URL": "http://user:oa-s3cret@127.0.0.1:1/v1",
           "MLFLOW_TRACKING_URI": "http://ml:mlf-s3cret@127.0.0.1:1", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}
    out = subprocess.run([BIN / "loyaltylens", "doctor"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "postgres+pgvector" in out.stdout and "fail" in out.stdout
    assert "http://user:***@127.0.0.1:1/v1" in out.stdout
    assert [line for line in (out.stdout + out.stderr).splitlines() if "s3cret" in line] == []
