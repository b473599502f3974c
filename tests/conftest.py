"""Shared pytest setup: offline model hubs and a workspace of its own for the test session."""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("LOYALTYLENS_HOME", str(ROOT / "workspace"))


@pytest.fixture(scope="session")
def root() -> Path:
    "The repository root."
    return ROOT


@pytest.fixture(scope="session")
def spark():
    "One local[2] Spark session for the whole pytest run (a JVM start costs seconds); skips, saying why, without Java or pyspark."
    from loyaltylens.scale import SparkUnavailable, spark_session
    try: session = spark_session("local[2]")
    except SparkUnavailable as e: pytest.skip(f"Spark cannot start here: {e}")
    yield session
    session.stop()
