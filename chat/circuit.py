"""A small circuit breaker per chat backend, shared by every request in the process.

closed --(N consecutive failures)--> open --(cooldown elapsed)--> half-open
half-open lets exactly one request through as a probe: success closes the circuit, failure
opens it for another cooldown. While open, the cascade skips the backend at once instead
of making every user wait for its timeouts and retries.

State is per process: with several web processes each learns on its own, which costs at
most N failed calls per process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from django.conf import settings

from kb.providers.base import ChatBackend

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"


class CircuitBreaker:
    """Counts consecutive failures of one backend and decides whether to try it."""

    def __init__(
        self, *, failures: int, cooldown: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.failure_threshold = max(1, failures)
        self.cooldown = cooldown
        self.clock = clock
        self.state = CLOSED
        self.consecutive_failures = 0
        self.opened_at = 0.0
        self._probe_in_flight = False
        self._lock = threading.Lock()

    def allow(self) -> bool:
        """Whether a call may go ahead now; in half-open, only the first caller gets True."""
        with self._lock:
            if self.state == CLOSED:
                return True
            if self.state == OPEN:
                if self.clock() - self.opened_at < self.cooldown:
                    return False
                self.state = HALF_OPEN
                self._probe_in_flight = False
            if self._probe_in_flight:
                return False
            self._probe_in_flight = True
            return True

    def record_success(self) -> None:
        """The backend answered: close the circuit."""
        with self._lock:
            self.state = CLOSED
            self.consecutive_failures = 0
            self._probe_in_flight = False

    def record_failure(self) -> None:
        """The backend failed: count it, and open the circuit at the threshold."""
        with self._lock:
            self.consecutive_failures += 1
            self._probe_in_flight = False
            if self.state == HALF_OPEN or self.consecutive_failures >= self.failure_threshold:
                self.state = OPEN
                self.opened_at = self.clock()

    def release(self) -> None:
        """A call ended without telling success from failure (the client left): free the probe."""
        with self._lock:
            self._probe_in_flight = False


_breakers: dict[str, CircuitBreaker] = {}
_lock = threading.Lock()


def backend_key(backend: ChatBackend) -> str:
    """What identifies one upstream: class, model and endpoint."""
    base_url = getattr(backend, "base_url", "")
    return f"{type(backend).__module__}.{type(backend).__qualname__}:{backend.model}@{base_url}"


def breaker_for(backend: ChatBackend) -> CircuitBreaker:
    """The process-wide breaker of a backend, created closed on first use."""
    key = backend_key(backend)
    with _lock:
        breaker = _breakers.get(key)
        if breaker is None:
            breaker = _breakers[key] = CircuitBreaker(
                failures=settings.KB_CIRCUIT_FAILURES,
                cooldown=settings.KB_CIRCUIT_COOLDOWN_SECONDS,
            )
        return breaker


def breakers_reset() -> None:
    """Forget every breaker's state (tests, and after a configuration change)."""
    with _lock:
        _breakers.clear()
