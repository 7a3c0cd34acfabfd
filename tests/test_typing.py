"""mypy over kb/, search/ and chat/ ([tool.mypy] in pyproject.toml) finds nothing.

The dev extra installs mypy and the stubs, so CI runs this; without mypy it is skipped.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None,
                    reason="mypy is not installed (pip install -e '.[dev]' installs it)")
def test_mypy_finds_no_errors() -> None:
    # A cold run (no .mypy_cache) reads torch's and Django's sources: about 3 minutes here.
    result = subprocess.run(
        [sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, f"mypy found errors:\n{result.stdout}\n{result.stderr}"
