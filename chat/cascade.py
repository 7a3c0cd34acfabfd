"""The model cascade: try each chat backend in order until one starts answering.

A backend is skipped while its circuit is open, and abandoned if it fails (or says
nothing within KB_CHAT_FIRST_TOKEN_TIMEOUT) before its first token; the next one is
asked with its own prompt (context sizes and tokenizers differ). Once one has answered,
its text streams to the end: another backend would start over, so a failure midway
ends the answer as interrupted. The extractive answerer, always last, cannot fail.

Every call is recorded on the AnswerDraft for the usage ledger; the services write it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing
from typing import Any

from django.conf import settings

from chat import circuit, prompts
from chat.circuit import CircuitBreaker
from chat.events import ChatEvent, Citations, Delta, Heartbeat, Meta
from chat.models import Message
from chat.turn import AnswerDraft, ModelCall
from kb.models import UsageRecord
from kb.providers.base import ChatBackend, ChatDelta, ChatUsage, ProviderError
from kb.providers.retrying import FailedAttempt, failed_attempts_sink

logger = logging.getLogger(__name__)


NOTICE_MODEL_DOWN = (
    "The language model is unavailable, so this answer quotes the most relevant passages "
    "of your documents instead of generating one."
)
NOTICE_FALLBACK = "The primary model is unavailable; this answer comes from a fallback model."

_HEARTBEAT = object()


async def cascade_stream(
    *, answer: AnswerDraft, ids: tuple[str, str], query: str,
    passages: list[prompts.Passage], backends: Sequence[ChatBackend],
) -> AsyncGenerator[ChatEvent, None]:
    """Try each backend in order until one starts answering; stream that one's answer.

    `ids` are the (conversation, message) ids the Meta event names.
    """
    failed: list[str] = []
    for backend in backends:
        breaker = circuit.breaker_for(backend) if backend.remote else None
        if breaker is not None and not breaker.allow():
            failed.append(f"{backend.model}: circuit open")
            continue
        attempt = _backend_answer(answer, backend, breaker, failed=failed, ids=ids,
                                  query=query, passages=passages)
        async with aclosing(attempt) as events:
            async for event in events:
                yield event
        if answer.answer_call is not None:
            return  # this backend answered (to the end, or until it failed midway)
    answer.status = Message.Status.ERROR
    answer.error_code = "no_backend"
    answer.error = "No model could answer right now: " + "; ".join(failed)


async def _backend_answer(
    answer: AnswerDraft, backend: ChatBackend, breaker: CircuitBreaker | None, *,
    failed: list[str], ids: tuple[str, str], query: str, passages: list[prompts.Passage],
) -> AsyncGenerator[ChatEvent, None]:
    """One backend's answer, or (before its first token) its failure added to `failed`."""
    built = prompts.prompt_build(
        question=query, passages=passages, count_tokens=backend.count_tokens,
        context_tokens=settings.KB_CHAT_CONTEXT_TOKENS,
    )
    call = ModelCall(provider=backend.provider_name, model=backend.model,
                     counted_input_tokens=built.tokens, count_tokens=backend.count_tokens)
    answer.calls.append(call)
    upstream = _Upstream(backend.stream(
        built.prompt,
        max_tokens=settings.KB_CHAT_MAX_OUTPUT_TOKENS,
        temperature=settings.KB_CHAT_TEMPERATURE if backend.generative else None,
    ), retried=call.retried)
    settled = False  # the breaker has been told success or failure
    try:
        # Wait for the first piece of text, with heartbeats and an overall deadline.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.KB_CHAT_FIRST_TOKEN_TIMEOUT
        first: Any = _HEARTBEAT
        try:
            while first is _HEARTBEAT:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise ProviderError(
                        f"no answer within {settings.KB_CHAT_FIRST_TOKEN_TIMEOUT:g}s",
                        retryable=True,
                    )
                first = await upstream.next(min(settings.KB_CHAT_HEARTBEAT_SECONDS, remaining))
                if first is _HEARTBEAT:
                    yield Heartbeat()
        except Exception as exc:
            _failed_before_answering(call, exc, backend=backend, breaker=breaker, failed=failed)
            settled = True
            return
        if breaker is not None:
            breaker.record_success()
        settled = True
        whole = await _answer_begin(answer, call, upstream, first, backend=backend,
                                    built=built, fallback=bool(failed))
        yield Meta(*ids, mode=answer.mode, notice=answer.notice)
        yield Citations(citations=answer.citations)
        rest = (_replay(answer, call, whole) if whole is not None
                else _relay(answer, call, upstream, first, backend=backend, breaker=breaker))
        async with aclosing(rest) as events:
            async for event in events:
                yield event
    finally:
        # Closing first, before any bookkeeping: a consumer that left must not keep
        # the upstream generating tokens nobody reads.
        await upstream.aclose()
        if breaker is not None and not settled:
            breaker.release()


def _failed_before_answering(
    call: ModelCall, exc: BaseException, *, backend: ChatBackend,
    breaker: CircuitBreaker | None, failed: list[str],
) -> None:
    call.ended = time.perf_counter()
    call.status = UsageRecord.Status.ERROR
    call.error = (describe_error(exc) if not isinstance(exc, StopAsyncIteration)
                  else "the stream ended without an answer")
    if breaker is not None:
        breaker.record_failure()
    logger.warning("Chat backend %s failed before answering: %s", backend.model, call.error)
    failed.append(f"{backend.model}: {call.error}")


async def _answer_begin(
    answer: AnswerDraft, call: ModelCall, upstream: _Upstream, first: Any, *,
    backend: ChatBackend, built: prompts.BuiltPrompt, fallback: bool,
) -> list[Any] | None:
    """Record who answers and with which passages; for a local answerer, its whole answer
    (None for a generative one, whose answer streams)."""
    call.first_token_at = time.perf_counter()
    answer.answer_call = call
    answer.mode = Message.Mode.GENERATED if backend.generative else Message.Mode.EXTRACTED
    passages_shown = built.passages
    whole: list[Any] | None = None
    if not backend.generative:
        # A local answerer is done in an instant: read it whole, so its citations
        # can be numbered 1..n in the order they appear (passages reordered to match).
        whole = [first]
        with contextlib.suppress(StopAsyncIteration):
            while True:
                whole.append(await upstream.next(settings.KB_CHAT_HEARTBEAT_SECONDS))
        text = "".join(i.text for i in whole if isinstance(i, ChatDelta))
        text, order = prompts.citations_renumber(text, passage_count=len(built.passages))
        passages_shown = [built.passages[n - 1] for n in order]
        whole = [*(ChatDelta(text=piece) for piece in words(text)),
                 *(i for i in whole if isinstance(i, ChatUsage))]
    answer.passages = passages_shown
    answer.citations = prompts.citations_for(passages_shown)
    if fallback:
        answer.notices.append(NOTICE_FALLBACK if backend.generative else NOTICE_MODEL_DOWN)
    return whole


async def _replay(
    answer: AnswerDraft, call: ModelCall, items: list[Any]
) -> AsyncGenerator[ChatEvent, None]:
    """A local answerer's answer, read whole already, as deltas."""
    for item in items:
        if isinstance(item, ChatDelta) and item.text:
            call.parts.append(item.text)
            answer.parts.append(item.text)
            yield Delta(text=item.text)
        elif isinstance(item, ChatUsage):
            call.usage = item
    call.ended = time.perf_counter()
    answer.status = Message.Status.COMPLETE


async def _relay(
    answer: AnswerDraft, call: ModelCall, upstream: _Upstream, first: Any, *,
    backend: ChatBackend, breaker: CircuitBreaker | None,
) -> AsyncGenerator[ChatEvent, None]:
    """A generative backend's answer as it arrives, from its first item to its end."""
    heartbeat = settings.KB_CHAT_HEARTBEAT_SECONDS
    item = first
    while True:
        if isinstance(item, ChatDelta):
            if item.text:
                call.parts.append(item.text)
                answer.parts.append(item.text)
                yield Delta(text=item.text)
        elif isinstance(item, ChatUsage):
            call.usage = item
        elif item is _HEARTBEAT:
            yield Heartbeat()
        try:
            item = await upstream.next(heartbeat)
        except StopAsyncIteration:
            break
        except Exception as exc:
            # Text has been shown: another backend would start over, so stop here.
            call.ended = time.perf_counter()
            call.status, call.error = UsageRecord.Status.ERROR, describe_error(exc)
            if breaker is not None:
                breaker.record_failure()
            logger.warning("Chat backend %s failed mid-answer: %s", backend.model, exc)
            answer.status = Message.Status.INTERRUPTED
            answer.error_code = "upstream_interrupted"
            answer.error = ("The model stopped answering midway; the partial answer was "
                            "kept. Please ask again.")
            return
    call.ended = time.perf_counter()
    answer.status = Message.Status.COMPLETE


class _Upstream:
    """Reads a backend stream so the pipeline can wake up for heartbeats while waiting.

    Each read is a task; waiting on it with a timeout leaves it running. Closing cancels
    a pending read (which closes the HTTP response inside the backend) and then the
    stream itself.
    """

    def __init__(self, stream: AsyncIterator[ChatDelta | ChatUsage], *,
                 retried: list[FailedAttempt]):
        self._stream = stream
        self._pending: asyncio.Task | None = None
        # The reads run in a context of their own where the backend's retry loop reports
        # the attempts it retried (kb.providers.retrying); the pipeline's context is untouched.
        self._context = contextvars.copy_context()
        self._context.run(failed_attempts_sink.set, retried)

    async def next(self, timeout: float) -> Any:
        """The next item, _HEARTBEAT if none arrived within timeout; StopAsyncIteration at
        the end."""
        if self._pending is None:
            self._pending = asyncio.get_running_loop().create_task(
                _anext(self._stream), context=self._context)
        done, _ = await asyncio.wait({self._pending}, timeout=timeout)
        if not done:
            return _HEARTBEAT
        task, self._pending = self._pending, None
        return task.result()

    async def aclose(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pending
        close = getattr(self._stream, "aclose", None)
        if close is not None:
            try:
                await close()
            except Exception:
                logger.debug("closing a chat stream failed", exc_info=True)


async def _anext[T](stream: AsyncIterator[T]) -> T:
    return await anext(stream)


def describe_error(exc: BaseException) -> str:
    """A backend's failure as the ledger and the logs show it."""
    if isinstance(exc, ProviderError):
        return str(exc)
    return f"{exc.__class__.__name__}: {exc}"


def words(text: str) -> list[str]:
    """Text cut into word-sized pieces that join back to it exactly."""
    pieces = re.findall(r"\s*\S+", text)
    tail = text[sum(len(piece) for piece in pieces):]
    return [*pieces, tail] if tail else pieces
