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
