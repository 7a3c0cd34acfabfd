"""The shared retry policy, driven by real HTTP errors from a local fake server."""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from kb.providers.base import ProviderError
from kb.providers.retrying import (
    RetryPolicy,
    acall_with_retries,
    call_with_retries,
    parse_retry_after,
)
from tests.fakes.openai_server import FakeOpenAIServer, Fault

POLICY = RetryPolicy(max_attempts=4, base_delay=0.01, max_delay=20.0, timeout=1.0)


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as fake:
        yield fake


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=0.2) as http:
        yield http


class SleepRecorder:
    """Stands in for time.sleep so tests see the chosen delays without waiting."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def get_models(client: httpx.Client, server: FakeOpenAIServer) -> dict[str, Any]:
    response = client.get(server.base_url + "/models")
    response.raise_for_status()
    return response.json()


def test_retry_after_seconds_is_used_as_the_delay(server, client):
    """A 429 with Retry-After: 7 sleeps exactly 7 s, not a jittered backoff."""
    server.enqueue(Fault(status=429, retry_after=7))
    sleep = SleepRecorder()

    body = call_with_retries(
        lambda: get_models(client, server), policy=POLICY, describe="test", sleep=sleep
    )

    assert body["object"] == "list"
    assert sleep.calls == [7.0]
    assert len(server.requests) == 2


def test_retry_after_ms_wins_over_retry_after(server, client):
    """OpenAI's retry-after-ms is more precise than Retry-After, so it is preferred."""
    server.enqueue(Fault(status=429, retry_after=7, retry_after_ms=1500))
    sleep = SleepRecorder()

    call_with_retries(lambda: get_models(client, server), policy=POLICY, describe="t", sleep=sleep)

    assert sleep.calls == [1.5]


def test_retry_after_http_date_is_honoured(server, client):
    """Retry-After may be an HTTP date; the delay is the time until then."""
    when = email.utils.formatdate(time.time() + 5, usegmt=True)
    server.enqueue(Fault(status=503, retry_after=when))
    sleep = SleepRecorder()

    call_with_retries(lambda: get_models(client, server), policy=POLICY, describe="t", sleep=sleep)

    assert len(sleep.calls) == 1
    assert 3.0 <= sleep.calls[0] <= 5.0


def test_retry_after_is_capped_at_max_delay(server, client):
    """A server asking for ten minutes does not stall a worker for ten minutes."""
    server.enqueue(Fault(status=429, retry_after=600))
    sleep = SleepRecorder()

    call_with_retries(lambda: get_models(client, server), policy=POLICY, describe="t", sleep=sleep)

    assert sleep.calls == [POLICY.max_delay]


def test_real_sleep_waits_for_a_small_retry_after(server, client):
    """With the default sleep, the retry really waits the Retry-After interval."""
    server.enqueue(Fault(status=429, retry_after=0.2))
    started = time.monotonic()

    call_with_retries(lambda: get_models(client, server), policy=POLICY, describe="t")

    assert 0.2 <= time.monotonic() - started < 2.0


def test_server_error_then_success_backs_off_with_jitter(server, client):
    """A 500 is retried after a delay between 0 and base_delay."""
    server.enqueue(Fault(status=500))
    sleep = SleepRecorder()

    call_with_retries(lambda: get_models(client, server), policy=POLICY, describe="t", sleep=sleep)

    assert len(sleep.calls) == 1
    assert 0.0 <= sleep.calls[0] <= POLICY.base_delay


@pytest.mark.parametrize("status", [408, 409, 502, 503, 504])
def test_transient_statuses_are_retried(server, client, status):
    """408, 409 and 5xx are transient."""
    server.enqueue(Fault(status=status))

    call_with_retries(
        lambda: get_models(client, server), policy=POLICY, describe="t", sleep=SleepRecorder()
    )

    assert len(server.requests) == 2


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_client_errors_are_not_retried(server, client, status):
    """Other 4xx mean the request is wrong: one attempt, and a non-retryable error."""
    server.enqueue(Fault(status=status, message="bad key"))

    with pytest.raises(ProviderError) as caught:
        call_with_retries(
            lambda: get_models(client, server),
            policy=POLICY,
            describe="openai chat 'gpt-x'",
            sleep=SleepRecorder(),
        )

    error = caught.value
    assert len(server.requests) == 1
    assert error.retryable is False
    assert error.status_code == status
    assert str(error).startswith(f"openai chat 'gpt-x': HTTP {status} after 1 attempt")


def test_giving_up_raises_a_readable_retryable_error(server, client):
    """After max_attempts failures the error names the provider, status and attempts."""
    server.enqueue(*[Fault(status=503, message="overloaded")] * 4)
    sleep = SleepRecorder()

    with pytest.raises(ProviderError) as caught:
        call_with_retries(
            lambda: get_models(client, server),
            policy=POLICY,
            describe="openai embeddings 'text-embedding-3-small'",
            sleep=sleep,
        )

    error = caught.value
    assert str(error) == (
        "openai embeddings 'text-embedding-3-small': HTTP 503 after 4 attempts: "
        '{"error": {"message": "overloaded", "type": "server_error", "param": null, "code": null}}'
    )
    assert error.retryable is True
    assert error.status_code == 503
    assert isinstance(error.__cause__, httpx.HTTPStatusError)
    assert len(sleep.calls) == 3
    assert len(server.requests) == 4


def test_timeout_then_success(server, client):
    """A request that outlives the client timeout is retried."""
    server.enqueue(Fault(delay=1.0))
    sleep = SleepRecorder()

    body = call_with_retries(
        lambda: get_models(client, server), policy=POLICY, describe="t", sleep=sleep
    )

    assert body["data"]
    assert len(sleep.calls) == 1


def test_dropped_connection_then_success(server, client):
    """A server that hangs up without answering is a connection error, and retried."""
    server.enqueue(Fault(disconnect=True))

    body = call_with_retries(
        lambda: get_models(client, server), policy=POLICY, describe="t", sleep=SleepRecorder()
    )

    assert body["data"]
    assert len(server.requests) == 2


def test_refused_connection_gives_up_as_connection_failed():
    """Nothing listening: retried, then a ProviderError that says so."""
    with FakeOpenAIServer() as gone:
        url = gone.base_url + "/models"
    with httpx.Client(timeout=0.5) as http, pytest.raises(ProviderError) as caught:
        call_with_retries(lambda: http.get(url), policy=POLICY, describe="t", sleep=SleepRecorder())

    assert "connection failed after 4 attempts" in str(caught.value)
    assert caught.value.retryable is True


def test_malformed_json_is_a_provider_error_not_retried(server, client):
    """A 200 whose body is not JSON fails at once with a ProviderError."""
    server.enqueue(Fault(malformed_json=True))

    def post_embeddings() -> Any:
        response = client.post(server.base_url + "/embeddings", json={"input": "x"})
        response.raise_for_status()
        return response.json()

    with pytest.raises(ProviderError) as caught:
        call_with_retries(post_embeddings, policy=POLICY, describe="t", sleep=SleepRecorder())

    assert "malformed JSON response after 1 attempt" in str(caught.value)
    assert len(server.requests) == 1


def test_programming_errors_propagate_unchanged():
    """A bug in the callee is not dressed up as a provider failure, nor retried."""
    calls = []

    def broken() -> None:
        calls.append(1)
        raise KeyError("results")

    with pytest.raises(KeyError):
        call_with_retries(broken, policy=POLICY, describe="t", sleep=SleepRecorder())
    assert calls == [1]


def test_provider_error_from_the_callee_is_final():
    """A ProviderError raised inside fn is the callee's verdict: it is not retried."""
    calls = []

    def fails() -> None:
        calls.append(1)
        raise ProviderError("wrong shape", retryable=True)

    with pytest.raises(ProviderError, match="wrong shape"):
        call_with_retries(fails, policy=POLICY, describe="t", sleep=SleepRecorder())
    assert calls == [1]


def test_openai_sdk_rate_limit_uses_its_retry_after(server):
    """openai.RateLimitError's response headers feed the delay."""
    server.enqueue(Fault(status=429, retry_after=3))
    sleep = SleepRecorder()
    sdk = openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0, timeout=1.0)

    models = call_with_retries(lambda: sdk.models.list(), policy=POLICY, describe="t", sleep=sleep)

    assert [model.id for model in models] == ["fake-embedding", "fake-chat"]
    assert sleep.calls == [3.0]
    sdk.close()


def test_openai_sdk_timeout_and_status_errors_are_classified(server):
    """APITimeoutError is retried; a final InternalServerError keeps its status."""
    server.enqueue(Fault(delay=1.0), Fault(status=500), Fault(status=500))
    sdk = openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0, timeout=0.2)
    policy = RetryPolicy(max_attempts=3, base_delay=0.01)

    with pytest.raises(ProviderError) as caught:
        call_with_retries(
            lambda: sdk.models.list(), policy=policy, describe="t", sleep=SleepRecorder()
        )

    assert isinstance(caught.value.__cause__, openai.InternalServerError)
    assert caught.value.status_code == 500
    assert str(caught.value) == "t: HTTP 500 after 3 attempts: fake server scripted a 500"
    sdk.close()


def test_async_twin_retries_with_its_own_sleep(server):
    """acall_with_retries honours Retry-After with an awaitable sleep."""
    server.enqueue(Fault(status=429, retry_after=4), Fault(status=502))
    delays: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        delays.append(seconds)

    async def main() -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=1.0) as http:

            async def fetch() -> dict[str, Any]:
                response = await http.get(server.base_url + "/models")
                response.raise_for_status()
                return response.json()

            return await acall_with_retries(fetch, policy=POLICY, describe="t", sleep=fake_sleep)

    body = asyncio.run(main())

    assert body["object"] == "list"
    assert delays[0] == 4.0
    assert 0.0 <= delays[1] <= 2 * POLICY.base_delay
    assert len(server.requests) == 3


def test_async_twin_gives_up_with_provider_error(server):
    """The async loop raises the same ProviderError as the sync one."""
    server.enqueue(*[Fault(status=500)] * 2)
    policy = RetryPolicy(max_attempts=2, base_delay=0.01)

    async def main() -> None:
        async with httpx.AsyncClient(timeout=1.0) as http:

            async def fetch() -> None:
                (await http.get(server.base_url + "/models")).raise_for_status()

            await acall_with_retries(fetch, policy=policy, describe="t")

    with pytest.raises(ProviderError, match="HTTP 500 after 2 attempts"):
        asyncio.run(main())


def test_backoff_is_full_jitter_under_an_exponential_cap():
    """Delay n is uniform in [0, min(max_delay, base * 2**(n-1))]."""
    random.seed(1234)
    policy = RetryPolicy(base_delay=0.5, max_delay=4.0)
    for attempt, cap in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (8, 4.0)]:
        delays = [policy.delay(attempt) for _ in range(200)]
        assert all(0.0 <= delay <= cap for delay in delays)
        assert max(delays) > cap * 0.8  # spread out, not pinned at a fixed value
        assert min(delays) < cap * 0.2


def test_parse_retry_after_accepts_all_forms_and_ignores_garbage():
    """Seconds, milliseconds and dates parse; nonsense and past dates do no harm."""
    past = email.utils.formatdate(time.time() - 60, usegmt=True)
    assert parse_retry_after(httpx.Headers({"Retry-After": "2.5"})) == 2.5
    assert parse_retry_after(httpx.Headers({"retry-after-ms": "250"})) == 0.25
    assert parse_retry_after(httpx.Headers({"Retry-After": past})) == 0.0
    assert parse_retry_after(httpx.Headers({"Retry-After": "soon"})) is None
    assert parse_retry_after(httpx.Headers({})) is None
    assert parse_retry_after(None) is None
