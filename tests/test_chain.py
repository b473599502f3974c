"""The papermill chain: every numbered notebook, in order, with SMOKE=True, outputs to the git-ignored _runs/."""
from pathlib import Path

import papermill as pm
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for p in (ROOT / "nbs").glob("[0-9][0-9]*.ipynb"))


def test_chain_has_notebooks():
    assert NOTEBOOKS, "no numbered notebooks found in nbs/"
    assert NOTEBOOKS[0].name.startswith("00_core")


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_chain(nb: Path, monkeypatch):
    monkeypatch.delenv("MPLBACKEND", raising=False)  # kernels inherit it: a library that set Agg here would hide every plot
    out = ROOT / "_runs" / nb.name
    out.parent.mkdir(exist_ok=True)
    pm.execute_notebook(str(nb), str(out), parameters={"SMOKE": True}, cwd=str(nb.parent),
                        kernel_name="python3", progress_bar=False, request_save_on_cell_execute=False)
    assert out.exists()
