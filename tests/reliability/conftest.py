"""Reliability suite: writes what the fuzzers tried when KB_RELIABILITY_STATS is set."""

from __future__ import annotations

from tests.reliability.stats import stats_write


def pytest_sessionfinish(session, exitstatus) -> None:
    stats_write()
