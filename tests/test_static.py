"""Static checks over vrfs/: ruff with the rules pyproject.toml names
(pyflakes, pycodestyle, bugbear, and the async rules that catch trio
pitfalls such as busy waits and blocking calls in async functions)."""

from __future__ import annotations

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
