"""OpenAIChat streaming against a real local server speaking OpenAI's SSE protocol."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest

from kb.providers.base import ChatDelta, ChatMessage, ChatUsage, Prompt, ProviderError
from kb.providers.openai import OpenAIChat
from tests.fakes.openai_server import DEFAULT_REPLY, FakeOpenAIServer, Fault, split_tokens

MESSAGES = [
    ChatMessage(role="system", content="Answer from the context."),
    ChatMessage(role="user", content="What does the fox do?"),
]
PROMPT = Prompt(messages=MESSAGES)
LONG_REPLY = " ".join(f"word{i}" for i in range(60))


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as fake:
        yield fake


def make_chat(server: FakeOpenAIServer, **options) -> OpenAIChat:
    options.setdefault("timeout", 5.0)
    options.setdefault("first_token_timeout", 1.0)
    return OpenAIChat(model="fake-chat", base_url=server.base_url, **options)


async def collect(chat: OpenAIChat, **kwargs) -> list[ChatDelta | ChatUsage]:
    """Every item of one stream; closes the client so the loop ends cleanly."""
    try:
        return [item async for item in chat.stream(PROMPT, **kwargs)]
    finally:
        await chat.aclose()


async def collect_until_error(chat: OpenAIChat) -> tuple[list[ChatDelta | ChatUsage], Exception]:
    """The items yielded before the stream raised, and the exception."""
    items: list[ChatDelta | ChatUsage] = []
    try:
        async for item in chat.stream(PROMPT):
            items.append(item)
    except Exception as exc:
        return items, exc
    finally:
        await chat.aclose()
    raise AssertionError("the stream did not fail")


def texts(items: list[ChatDelta | ChatUsage]) -> list[str]:
    return [item.text for item in items if isinstance(item, ChatDelta)]


def test_deltas_arrive_in_order_then_one_usage(server):
    """Each content chunk becomes a ChatDelta; the last item is the provider's usage."""
    items = asyncio.run(collect(make_chat(server)))

    assert texts(items) == split_tokens(DEFAULT_REPLY)
    assert "".join(texts(items)) == DEFAULT_REPLY
    assert items[-1] == ChatUsage(
        input_tokens=9,  # the server's whitespace count of both messages
        output_tokens=len(split_tokens(DEFAULT_REPLY)),
        model="fake-chat",
        finish_reason="stop",
    )
    assert sum(isinstance(item, ChatUsage) for item in items) == 1


def test_request_asks_for_a_stream_with_usage(server):
    """The request is a streamed chat completion with include_usage and our options."""
    chat = make_chat(server, api_key="sk-test", extra_body={"top_k": 5})

    asyncio.run(collect(chat, max_tokens=3, temperature=0.2))

    (request,) = server.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer sk-test"
    body = request.body
    assert body["model"] == "fake-chat"
    assert body["messages"] == [
        {"role": "system", "content": "Answer from the context."},
        {"role": "user", "content": "What does the fox do?"},
    ]
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert (body["max_tokens"], body["temperature"], body["top_k"]) == (3, 0.2, 5)


def test_finish_reason_length_is_reported(server):
    """A max_tokens cut is visible in the usage item, so the UI can say so."""
    items = asyncio.run(collect(make_chat(server), max_tokens=3))

    assert texts(items) == split_tokens(DEFAULT_REPLY)[:3]
    assert isinstance(items[-1], ChatUsage)
    assert items[-1].finish_reason == "length"


def test_usage_is_none_when_the_server_sends_none(server):
    """A server that ignores include_usage still ends with a ChatUsage, with None counts."""
    server.stream_usage = False

    items = asyncio.run(collect(make_chat(server)))

    assert items[-1] == ChatUsage(
        input_tokens=None, output_tokens=None, model="fake-chat", finish_reason="stop"
    )


def test_reply_can_depend_on_the_messages(server):
    """A callable chat_reply sees the request's messages."""
    server.chat_reply = lambda messages: f"You said: {messages[-1]['content']}"

    items = asyncio.run(collect(make_chat(server)))

    assert "".join(texts(items)) == "You said: What does the fox do?"


@pytest.mark.parametrize(
    "fault",
    [Fault(status=500), Fault(status=429, retry_after=0.05), Fault(disconnect=True)],
    ids=["500", "429", "disconnect"],
)
def test_failures_before_the_first_token_are_retried(server, fault):
    """Until text has been yielded a retry is invisible: the answer appears once."""
    server.enqueue(fault)

    items = asyncio.run(collect(make_chat(server)))

    assert "".join(texts(items)) == DEFAULT_REPLY
    assert len(server.requests) == 2


def test_slow_first_token_times_out_and_is_retried(server):
    """An attempt with no first token within first_token_timeout is dropped and retried."""
    server.enqueue(Fault(first_token_delay=3.0))
    started = time.monotonic()

    items = asyncio.run(collect(make_chat(server, first_token_timeout=0.3)))

    assert "".join(texts(items)) == DEFAULT_REPLY
    assert len(server.requests) == 2
    assert time.monotonic() - started < 2.0
    assert server.wait_for_stream(0).closed_early  # the abandoned attempt was hung up on


def test_giving_up_before_the_first_token_yields_nothing(server):
    """When every attempt fails the stream raises ProviderError before any delta."""
    server.enqueue(*[Fault(status=503, retry_after=0.01)] * 2)

    items, error = asyncio.run(collect_until_error(make_chat(server, max_attempts=2)))

    assert items == []
    assert isinstance(error, ProviderError)
    assert "openai chat 'fake-chat'" in str(error)
    assert "HTTP 503 after 2 attempts" in str(error)
    assert error.retryable is True


def test_bad_request_is_not_retried(server):
    """A 400 (say, context too long) fails at once."""
    server.enqueue(Fault(status=400, message="maximum context length exceeded"))

    items, error = asyncio.run(collect_until_error(make_chat(server)))

    assert items == []
    assert isinstance(error, ProviderError)
    assert error.retryable is False
    assert "maximum context length exceeded" in str(error)
    assert len(server.requests) == 1


def test_cut_mid_stream_raises_after_the_delivered_deltas(server):
    """A connection lost after text was yielded raises ProviderError and is not retried."""
    server.enqueue(Fault(cut_after_tokens=3))

    items, error = asyncio.run(collect_until_error(make_chat(server)))

    assert texts(items) == split_tokens(DEFAULT_REPLY)[:3]
    assert isinstance(error, ProviderError)
    assert "after 3 chunks of the answer were delivered; not retried" in str(error)
    assert len(server.requests) == 1


def test_total_timeout_stops_a_slow_stream(server):
    """The whole answer must arrive within `timeout`; after that the stream fails."""
    server.chat_reply = LONG_REPLY
    server.token_delay = 0.05

    items, error = asyncio.run(collect_until_error(make_chat(server, timeout=0.4)))

    assert 0 < len(texts(items)) < 60
    assert isinstance(error, ProviderError)
    assert "timed out" in str(error)
    assert server.wait_for_stream().closed_early


def test_malformed_chunk_is_a_provider_error(server):
    """A data: line that is not JSON fails with ProviderError, without a retry."""
    server.enqueue(Fault(malformed_json=True))

    items, error = asyncio.run(collect_until_error(make_chat(server)))

    assert items == []
    assert isinstance(error, ProviderError)
    assert "malformed JSON response" in str(error)
    assert len(server.requests) == 1


def test_consumer_aclose_closes_the_upstream(server):
    """Stopping after three deltas hangs up on the server before it sent everything."""
    server.chat_reply = LONG_REPLY
    server.token_delay = 0.02

    async def read_three_then_stop() -> list[str]:
        chat = make_chat(server)
        stream = chat.stream(PROMPT)
        seen = []
        async for item in stream:
            assert isinstance(item, ChatDelta)
            seen.append(item.text)
            if len(seen) == 3:
                break
        await stream.aclose()
        await chat.aclose()
        return seen

    started = time.monotonic()
    seen = asyncio.run(read_three_then_stop())
    record = server.wait_for_stream(timeout=2.0)

    assert seen == split_tokens(LONG_REPLY)[:3]
    assert record.closed_early
    assert not record.completed
    assert record.chunks_written < 10  # of 60: the server stopped soon after the client left
    assert time.monotonic() - started < 1.0


def test_task_cancellation_closes_the_upstream(server):
    """Cancelling the consuming task (a client that went away) also stops the upstream."""
    server.chat_reply = LONG_REPLY
    server.token_delay = 0.02

    async def main() -> int:
        chat = make_chat(server)
        seen = 0
        three = asyncio.Event()

        async def consume() -> None:
            nonlocal seen
            async for _ in chat.stream(PROMPT):
                seen += 1
                if seen == 3:
                    three.set()

        task = asyncio.create_task(consume())
        await three.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await chat.aclose()
        return seen

    seen = asyncio.run(main())
    record = server.wait_for_stream(timeout=2.0)

    assert 3 <= seen < 60
    assert record.closed_early
    assert record.chunks_written < 10


def test_complete_returns_the_text_and_usage(server):
    """complete() is the whole stream, joined."""
    chat = make_chat(server)

    async def main() -> tuple[str, ChatUsage]:
        try:
            return await chat.complete(PROMPT)
        finally:
            await chat.aclose()

    text, usage = asyncio.run(main())

    assert text == DEFAULT_REPLY
    assert usage.finish_reason == "stop"
    assert usage.output_tokens == len(split_tokens(DEFAULT_REPLY))


def test_one_backend_serves_several_event_loops(server):
    """Each asyncio.run gets its own client: a pool bound to a dead loop is never reused."""
    chat = make_chat(server)

    async def answer() -> str:
        try:
            return "".join(texts([item async for item in chat.stream(PROMPT)]))
        finally:
            await chat.aclose()

    assert asyncio.run(answer()) == DEFAULT_REPLY
    assert asyncio.run(answer()) == DEFAULT_REPLY


def test_count_tokens_is_positive_and_offline(server):
    """count_tokens works without network access (tiktoken if cached, else an estimate)."""
    chat = make_chat(server)

    assert chat.count_tokens("") == 0
    assert 1 <= chat.count_tokens("The quick brown fox.") <= 20
    assert server.requests == []


def test_fake_server_speaks_openai_sse(server):
    """The fake's wire format: role chunk, content chunks, finish, usage, [DONE]."""
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with (
        httpx.Client() as http,
        http.stream("POST", server.base_url + "/chat/completions", json=body) as response,
    ):
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]

    assert events[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in events)
    assert '"delta": {"role": "assistant", "content": ""}' in events[0]
    assert '"finish_reason": "stop"' in events[-3]
    assert '"choices": [], "usage": {"prompt_tokens": 1' in events[-2]
