"""Static checks over vrfs/: ruff with the rules pyproject.toml names
(pyflakes, pycodestyle, bugbear, and the async rules that catch trio
pitfalls such as busy waits and blocking calls in async functions), and
mypy with the settings of its [tool.mypy] section (a wrong type on a
rarely taken error path is what the other tests miss)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(120)
def test_ruff_is_clean_over_vrfs() -> None:
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is a test dependency (pyproject.toml [test])"
    result = subprocess.run([ruff, "check", "vrfs"], cwd=REPO, capture_output=True, text=True, timeout=100)
    assert result.returncode == 0, result.stdout + result.stderr


# A cold run (no cache) takes a minute or more on a slow, shared machine; the
# cache in the repository (.mypy_cache/, ignored by git) makes later runs quick.
@pytest.mark.timeout(300)
def test_mypy_is_clean_over_vrfs() -> None:
    assert importlib.util.find_spec("mypy"), "mypy is a test dependency (pyproject.toml [test])"
    result = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(REPO / ".mypy_cache")],
                            cwd=REPO, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stdout + result.stderr
