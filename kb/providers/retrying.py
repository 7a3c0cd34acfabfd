"""One retry policy for every remote backend: backoff with full jitter, Retry-After honoured.

Backends wrap each remote call in `call_with_retries` (or `acall_with_retries`) and
build their SDK/HTTP clients with retries disabled, so this is the only retry loop and
the number of attempts in an error message is the number of requests actually sent.

Each attempt that failed and was retried is appended to the list installed by
`failed_attempts_recorded()` (a context variable, so backends need no extra argument):
the usage ledger writes a row for every request sent, not only for the last one.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx

from kb.providers.base import ProviderError

logger = logging.getLogger(__name__)


# 408 Request Timeout and 409 Conflict (OpenAI uses it for lock contention) are transient;
# every other 4xx means the request itself is wrong and will fail again.
_RETRYABLE_4XX = frozenset({408, 409, 429})


@dataclass(frozen=True)
class FailedAttempt:
    """A request that failed and was retried: it was sent, so the ledger records it."""

    error: str
    latency_ms: float


failed_attempts_sink: ContextVar[list[FailedAttempt] | None] = ContextVar(
    "failed_attempts_sink", default=None
)


@contextmanager
def failed_attempts_recorded() -> Iterator[list[FailedAttempt]]:
    """Collect the retried attempts of the remote calls made inside the block."""
    attempts: list[FailedAttempt] = []
    token = failed_attempts_sink.set(attempts)
    try:
        yield attempts
    finally:
        failed_attempts_sink.reset(token)


def _note_failed_attempt(exc: Exception, started: float) -> None:
    sink = failed_attempts_sink.get()
    if sink is not None:
        failure = classify(exc)
        reason = failure.reason if failure else exc.__class__.__name__
        sink.append(FailedAttempt(error=f"retried: {reason}",
                                  latency_ms=(time.perf_counter() - started) * 1000))


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry one remote call."""

    max_attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 20.0
    # Per-attempt HTTP timeout in seconds; backends hand it to their client.
    timeout: float = 30.0

    def delay(self, attempt: int, *, retry_after: float | None = None) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        if retry_after is not None:
            return max(0.0, min(retry_after, self.max_delay))
        # "Full jitter" (AWS Architecture Blog, "Exponential Backoff and Jitter", 2015):
        # a uniform draw below the exponential cap spreads out clients that failed together.
        cap = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        return random.uniform(0.0, cap)


@dataclass(frozen=True)
class Failure:
    """What went wrong with one attempt, reduced to what the retry decision needs."""

    reason: str
    retryable: bool
    status_code: int | None = None
    retry_after: float | None = None
    detail: str = ""

    def to_error(self, *, describe: str, attempts: int) -> ProviderError:
        """Build the operator-facing error raised when we stop trying."""
        tries = f"{attempts} attempt" + ("" if attempts == 1 else "s")
        message = f"{describe}: {self.reason} after {tries}"
        if self.detail:
            message += f": {self.detail}"
        return ProviderError(message, retryable=self.retryable, status_code=self.status_code)


def parse_retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds the server asked us to wait, from retry-after-ms or Retry-After (secs or date)."""
    if not headers:
        return None
    # OpenAI and Azure send the millisecond variant; it is more precise, so it wins.
    raw_ms = headers.get("retry-after-ms")
    if raw_ms is not None:
        try:
            return max(0.0, float(raw_ms) / 1000.0)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def classify(exc: BaseException) -> Failure | None:
    """Describe a failed remote call, or return None for errors that are not the provider's."""
    if isinstance(exc, ProviderError):
        return Failure(reason=str(exc), retryable=exc.retryable, status_code=exc.status_code)

    status, response = _status_and_response(exc)
    if status is not None:
        retryable = status in _RETRYABLE_4XX or status >= 500
        headers = getattr(response, "headers", None)
        return Failure(
            reason=f"HTTP {status}",
            retryable=retryable,
            status_code=status,
            retry_after=parse_retry_after(headers) if retryable else None,
            detail=_error_detail(exc, response),
        )

    timeouts, connection_errors, other_api_errors = _exception_types()
    if isinstance(exc, timeouts):
        return Failure(reason="timed out", retryable=True)
    if isinstance(exc, httpx.UnsupportedProtocol):
        # A misconfigured URL ("localhost:8080/v1" without a scheme) never starts working.
        return Failure(reason="invalid URL", retryable=False, detail=str(exc))
    if isinstance(exc, connection_errors):
        return Failure(reason="connection failed", retryable=True, detail=_with_cause(exc))
    if isinstance(exc, json.JSONDecodeError):
        # A 200 with a body that is not JSON is a misconfigured endpoint (an HTML page,
        # a proxy's login form), not a blip: retrying only delays the error.
        return Failure(reason="malformed JSON response", retryable=False, detail=_short(str(exc)))
    if isinstance(exc, other_api_errors):
        # An SDK error without a status, e.g. an `error` event inside a stream.
        return Failure(reason="provider error", retryable=True, detail=_short(str(exc)))
    return None


def call_with_retries[T](
    fn: Callable[[], T],
    *,
    policy: RetryPolicy,
    describe: str,
    sleep: Callable[[float], object] = time.sleep,
) -> T:
    """Call fn until it succeeds, retrying transient provider failures; raise ProviderError."""
    attempt = 1
    while True:
        started = time.perf_counter()
        try:
            return fn()
        except Exception as exc:
            delay = _delay_or_raise(exc, attempt=attempt, policy=policy, describe=describe)
            _note_failed_attempt(exc, started)
        sleep(delay)
        attempt += 1


async def acall_with_retries[T](
    fn: Callable[[], Awaitable[T]],
    *,
    policy: RetryPolicy,
    describe: str,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
) -> T:
    """Await fn() until it succeeds, retrying transient provider failures; raise ProviderError."""
    attempt = 1
    while True:
        started = time.perf_counter()
        try:
            return await fn()
        except Exception as exc:
            delay = _delay_or_raise(exc, attempt=attempt, policy=policy, describe=describe)
            _note_failed_attempt(exc, started)
        await sleep(delay)
        attempt += 1


def _delay_or_raise(exc: Exception, *, attempt: int, policy: RetryPolicy, describe: str) -> float:
    """Return how long to sleep before the next attempt, or raise if we should stop."""
    if isinstance(exc, ProviderError):
        # The callee already decided this is final (e.g. a response of the wrong shape).
        raise exc
    failure = classify(exc)
    if failure is None:
        # Our own bug (TypeError, KeyError...): retrying would hide it.
        raise exc
    if not failure.retryable or attempt >= policy.max_attempts:
        raise failure.to_error(describe=describe, attempts=attempt) from exc
    delay = policy.delay(attempt, retry_after=failure.retry_after)
    logger.warning(
        "%s: %s (attempt %d of %d), retrying in %.2fs",
        describe,
        failure.reason,
        attempt,
        policy.max_attempts,
        delay,
    )
    return delay


def _status_and_response(exc: BaseException) -> tuple[int | None, Any]:
    """The HTTP status of a status error from the openai SDK, httpx or httpx2, if any."""
    # Duck-typed on purpose: openai.APIStatusError carries .status_code and an httpx2
    # response, httpx.HTTPStatusError carries an httpx response; both expose .headers.
    response = getattr(exc, "response", None)
    status = getattr(exc, "status_code", None)
    if not isinstance(status, int):
        status = getattr(response, "status_code", None)
    # 3xx counts too: an unfollowed redirect means a wrong URL, which no retry fixes.
    if not isinstance(status, int) or status < 300:
        return None, None
    return status, response


def _exception_types() -> tuple[tuple[type[BaseException], ...], ...]:
    """(timeouts, connection errors, other SDK errors) from the HTTP libraries in use."""
    timeouts: list[type[BaseException]] = [TimeoutError, httpx.TimeoutException]
    connection: list[type[BaseException]] = [ConnectionError, httpx.TransportError]
    other: list[type[BaseException]] = []
    # Look the SDKs up in sys.modules rather than importing them: importing openai costs
    # about two seconds, and an exception type whose module was never imported cannot
    # have been raised.
    openai = sys.modules.get("openai")
    if openai is not None:
        timeouts.append(openai.APITimeoutError)
        connection.append(openai.APIConnectionError)
        other.append(openai.APIError)
    # The openai SDK talks through httpx2, a fork of httpx with its own exception classes.
    httpx2 = sys.modules.get("httpx2")
    if httpx2 is not None:
        timeouts.append(httpx2.TimeoutException)
        connection.append(httpx2.TransportError)
    return tuple(timeouts), tuple(connection), tuple(other)


def _error_detail(exc: BaseException, response: Any) -> str:
    """A short, human-readable reason the server gave, for the error message."""
    # openai.APIStatusError keeps the parsed `error` object as .body; its .message is a
    # noisier "Error code: 429 - {...}" rendering of the same thing.
    body = getattr(exc, "body", None)
    if isinstance(body, Mapping) and isinstance(body.get("message"), str):
        return _short(body["message"])
    message = getattr(exc, "message", None)
    if isinstance(message, str) and message:
        return _short(message)
    try:
        text = response.text
    except Exception:  # an unread streaming response has no text; the status will do
        return ""
    return _short(text) if isinstance(text, str) else ""


def _with_cause(exc: BaseException) -> str:
    """str(exc), plus its cause: the SDK's "Connection error." alone hides what happened."""
    text = str(exc)
    cause = exc.__cause__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text} ({cause})" if text else str(cause)
    return _short(text)


def _short(text: str, limit: int = 200) -> str:
    """Collapse whitespace and truncate, so a whole HTML error page never lands in a log."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
