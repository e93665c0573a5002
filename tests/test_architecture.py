"""The architecture of README.md's Layout section, as import-linter contracts (.importlinter):
`lint-imports` (run by `make test`) passes on this tree and fails on a change that breaks
a contract, on a copy of the tree."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT = str(Path(sys.executable).with_name("lint-imports"))


def _lint(where: Path) -> subprocess.CompletedProcess:
    return subprocess.run([LINT, "--no-cache", "--no-logo"], cwd=where, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def tree(tmp_path):
    """The project's packages and contracts, copied (no tests, no studies)."""
    for pkg in ("study", "noise", "models"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", tmp_path)
    return tmp_path


def test_the_tree_keeps_every_contract():
    r = _lint(ROOT)
    assert r.returncode == 0 and "6 kept, 0 broken" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("file, line, broken", [
    ("study/config.py", "import ray", "Only study.cluster imports ray BROKEN"),
    ("study/modes.py", "def f():\n    import mlflow", "Only study.tracking imports mlflow BROKEN"),
    ("study/objectives.py", "import optuna", "Only study.space imports optuna BROKEN"),
    ("models/skip.py", "from study import config", "noise and models import nothing of study BROKEN"),
    ("study/engine/metrics.py", "from study.tracking import records",
     "The engine (one trial) imports none of the service's rooms BROKEN"),
    ("study/engine/images.py", "def g():\n    from study.engine import trial", "No import circles"),
])
def test_a_change_that_breaks_a_contract_fails(tree, file, line, broken):
    with open(tree / file, "a") as f:
        f.write(f"\n\n{line}\n")
    r = _lint(tree)
    assert r.returncode == 1 and broken in r.stdout, r.stdout + r.stderr
