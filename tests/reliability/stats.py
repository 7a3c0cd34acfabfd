"""Counters of what the reliability tests tried, written out for docs/RELIABILITY.md.

Each fuzz property counts the examples it ran with `fuzz_count(name)`; other tests may
note figures with `stat_set(name, value)`. When KB_RELIABILITY_STATS names a file
(benchmarks/reliability_report.py sets it), conftest writes them there as JSON when the
session ends.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

FUZZ_COUNTS: dict[str, Counter[str]] = {}
FIGURES: dict[str, Any] = {}


def fuzz_count(name: str, outcome: str = "tried") -> None:
    """Count one example of the fuzz property `name` with its outcome (parsed, rejected...)."""
    FUZZ_COUNTS.setdefault(name, Counter())[outcome] += 1


def stat_set(name: str, value: Any) -> None:
    """Note a figure (JSON-serialisable) measured by a test."""
    FIGURES[name] = value


def stats_write() -> None:
    """Merge the counters into the KB_RELIABILITY_STATS file, if one is named."""
    target = os.environ.get("KB_RELIABILITY_STATS")
    if not target or not (FUZZ_COUNTS or FIGURES):
        return
    path = Path(target)
    existing: dict[str, Any] = {}
    if path.exists():
        try:
            existing = json.loads(path.read_text())
        except ValueError:
            existing = {}
    fuzz = existing.setdefault("fuzz", {})
    for name, outcomes in FUZZ_COUNTS.items():
        merged = Counter(fuzz.get(name, {}))
        merged.update(outcomes)
        fuzz[name] = dict(merged)
    existing.setdefault("figures", {}).update(FIGURES)
    path.write_text(json.dumps(existing, indent=2, sort_keys=True, default=str))
