"""The per-backend circuit breaker: closed, open after N failures, half-open probe."""

from __future__ import annotations

import pytest

from chat.circuit import CLOSED, HALF_OPEN, OPEN, CircuitBreaker


@pytest.fixture(autouse=True)
def _isolated_settings():
    """Override the Django settings fixture: these tests need no database."""


@pytest.fixture(autouse=True)
def _fresh_breakers():
    """Override the chat conftest's fixture: nothing here touches settings."""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_consecutive_failures_only():
    """A success in between resets the count."""
    breaker = CircuitBreaker(failures=3, cooldown=30, clock=Clock())
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state == CLOSED and breaker.allow()

    breaker.record_failure()

    assert breaker.state == OPEN and not breaker.allow()


def test_half_open_lets_one_probe_through_after_the_cooldown():
    """After the cooldown exactly one caller probes; its success closes the circuit."""
    clock = Clock()
    breaker = CircuitBreaker(failures=1, cooldown=30, clock=clock)
    breaker.record_failure()
    clock.now += 29
    assert not breaker.allow()

    clock.now += 2
    assert breaker.allow()
    assert breaker.state == HALF_OPEN
    assert not breaker.allow()  # a second caller waits for the probe

    breaker.record_success()
    assert breaker.state == CLOSED and breaker.allow() and breaker.allow()


def test_a_failed_probe_reopens_for_another_cooldown():
    clock = Clock()
    breaker = CircuitBreaker(failures=5, cooldown=10, clock=clock)
    for _ in range(5):
        breaker.record_failure()
    clock.now += 11
    assert breaker.allow()

    breaker.record_failure()

    assert breaker.state == OPEN and not breaker.allow()
    clock.now += 11
    assert breaker.allow()


def test_an_abandoned_probe_frees_the_slot():
    """A probe whose client left tells nothing; the next caller may probe."""
    clock = Clock()
    breaker = CircuitBreaker(failures=1, cooldown=1, clock=clock)
    breaker.record_failure()
    clock.now += 2
    assert breaker.allow()

    breaker.release()

    assert breaker.allow()
