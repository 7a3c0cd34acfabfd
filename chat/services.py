"""The chat pipeline: one question in, a stream of typed events out.

    budget → (rewrite a follow-up) → cache → retrieval → prompt → model cascade
           → citation check → usage ledger, message, cache

The question's rows are written while the model is asked (off the path to the first
token); their ids are made up front, so the first event can already name them.

`answer_stream` is an async generator of events (dataclasses below); the views turn
them into SSE or JSON. Everything blocking (ORM, the embedding model inside search) runs
in Django's per-request sync thread through sync_to_async, bounded by a timeout, so the
event loop never blocks and a stuck database ends the answer with an error event
instead of a hang. The thread-sensitive executor is used on purpose: each request gets
its own thread (ThreadSensitiveContext), its connection is closed with the request, and
tests see the rows of their own transaction.

Whatever happens (completion, upstream failure, client disconnect, generator closed),
the `finally:` of answer_stream closes the upstream stream first, so no tokens are
generated for nobody, then records one UsageRecord per model call and persists the
assistant message with its status and the text produced so far.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TypeVar

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import DatabaseError, transaction
from django.utils import timezone

from chat import caches, circuit, prompts, selectors
from chat.answerability import Answerability, answerability_assess
from chat.budgets import BudgetExceeded, budget_check
from chat.models import Conversation, Message
from kb.log_privacy import loggable_text
from kb.models import Collection, UsageRecord
from kb.providers import registry
from kb.providers.base import ChatBackend, ChatDelta, ChatMessage, ChatUsage, ProviderError
from kb.providers.retrying import FailedAttempt, failed_attempts_sink
from kb.usage import UsageBuffer, model_cost, retried_attempts_record_usage, usage_record_create
from search import selectors as search_selectors
from search.query_embedding import query_vector
from search.services import QueryEmbedding, SearchParams, SearchResult, search

logger = logging.getLogger(__name__)

T = TypeVar("T")

__all__ = [
    "AnswerResult",
    "BudgetExceeded",
    "ChatError",
    "ChatEvent",
    "ChatInputError",
    "ChatUnavailable",
    "Citations",
    "ConversationNotFound",
    "Delta",
    "Done",
    "Error",
    "Heartbeat",
    "Meta",
    "Started",
    "answer_complete",
    "answer_stream",
]

NOTICE_MODEL_DOWN = (
    "The language model is unavailable, so this answer quotes the most relevant passages "
    "of your documents instead of generating one."
)
NOTICE_FALLBACK = "The primary model is unavailable; this answer comes from a fallback model."
NOTICE_CACHE_EXACT = "This answer was given before to the same question over the same documents."
# Never the earlier question itself: it may be another user's words.
NOTICE_CACHE_SEMANTIC = (
    "This answer was given before to a very similar question over the same documents."
)
NOTICE_NO_PASSAGES = "No passage in the selected documents matches this question."
# Said when nothing was found, and when what was found is too weak to answer from
# (chat.answerability): vector search always finds neighbours, related or not.
NOT_COVERED_ANSWER = (
    "Your documents do not cover this question. Try other words, or another collection."
)
NOT_COVERED_RELATED = (
    "Your documents do not cover this question. The closest passages are listed below as "
    "related sources; they do not answer it."
)
# How many of the closest passages a not-covered answer shows as related.
RELATED_COUNT = 3


# --- Events --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Started:
    """First event, internal: the request was accepted and the messages exist."""

    conversation_id: str
    message_id: str


@dataclass(frozen=True)
class Heartbeat:
    """Nothing new yet; the view sends an SSE comment so proxies keep the connection."""


@dataclass(frozen=True)
class Meta:
    conversation_id: str
    message_id: str
    mode: str
    notice: str | None
    # False: the documents do not cover the question; the answer says so, cites nothing
    # and no model was asked.
    answerable: bool = True


@dataclass(frozen=True)
class Citations:
    citations: list[dict]
    # The closest passages of a not-covered answer: shown as related, never cited.
    related: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Done:
    message_id: str
    status: str
    usage: dict
    cited: list[int]
    invalid_citations: list[int]
    # The persisted answer, invented citations removed; not part of the SSE event.
    text: str = ""
    answerable: bool = True


@dataclass(frozen=True)
class Error:
    code: str
    message: str


ChatEvent = Started | Heartbeat | Meta | Citations | Delta | Done | Error


# --- Errors raised before the first event ----------------------------------------------------


class ChatError(Exception):
    """A request refused before anything was streamed; the view answers with `status`."""

    code = "error"
    status = 400

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.field = field


class ChatInputError(ChatError):
    code = "invalid"
    status = 400


class ConversationNotFound(ChatError):
    code = "not_found"
    status = 404


class ChatUnavailable(ChatError):
    """The database failed or did not answer in time."""

    code = "database_unavailable"
    status = 503


# --- The non-streaming result ----------------------------------------------------------------


@dataclass
class AnswerResult:
    conversation_id: str
    message_id: str
    answer: str
    mode: str
    notice: str | None
    citations: list[dict]
    cited: list[int]
    invalid_citations: list[int]
    usage: dict
    status: str
    error: Error | None = None
    answerable: bool = True
    related: list[dict] = field(default_factory=list)


# --- Internal state of one answer ------------------------------------------------------------


_HEARTBEAT = object()


@dataclass
class _Call:
    """One model call, written to the usage ledger when the answer ends."""

    provider: str
    model: str
    counted_input_tokens: int
    count_tokens: Callable[[str], int]
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    ended: float | None = None
    parts: list[str] = field(default_factory=list)
    usage: ChatUsage | None = None
    status: str = UsageRecord.Status.OK
    error: str = ""
    cache_hit: bool = False
    saved_cost_usd: Decimal = Decimal(0)
    # Requests the backend sent and retried before this call's outcome: one row each.
    retried: list[FailedAttempt] = field(default_factory=list)

    @property
    def input_tokens(self) -> int:
        if self.cache_hit:
            return 0
        if self.usage is not None and self.usage.input_tokens is not None:
            return self.usage.input_tokens
        return self.counted_input_tokens

    @property
    def output_tokens(self) -> int:
        if self.cache_hit:
            return 0
        if self.usage is not None and self.usage.output_tokens is not None:
            return self.usage.output_tokens
        return self.count_tokens("".join(self.parts))

    @property
    def cost(self) -> Decimal:
        if self.cache_hit:
            return Decimal(0)
        return model_cost(model=self.model, input_tokens=self.input_tokens,
                          output_tokens=self.output_tokens)


@dataclass
class _Turn:
    question: str
    user: Any
    api_key: Any
    request_id: str
    conversation: Conversation
    assistant: Message
    collection: Collection | None
    history: list[ChatMessage]
    kb_version: str
    query: str = ""
    cacheable: bool = True
    embedded: QueryEmbedding | None = None
    status: str = Message.Status.STREAMING
    mode: str = ""
    notices: list[str] = field(default_factory=list)
    passages: list[prompts.Passage] = field(default_factory=list)
    citations: list[dict] = field(default_factory=list)
    parts: list[str] = field(default_factory=list)
    calls: list[_Call] = field(default_factory=list)
    answer_call: _Call | None = None
    error_code: str = ""
    error: str = ""
    check: prompts.CitationCheck | None = None
    finish_task: asyncio.Future | None = None
    record_task: asyncio.Future | None = None
    # Set after retrieval (None: not decided, e.g. a cached answer).
    answerability: Answerability | None = None
    answerable: bool | None = None
    related: list[dict] = field(default_factory=list)
    # The query embedding's and the search's ledger rows, written off the path to the
    # first token (_turn_record) and tagged with the conversation.
    usage: UsageBuffer = field(default_factory=UsageBuffer)
    # What _turn_open retrieved (cached answer, or search result), or the error it met.
    retrieved: tuple[caches.CacheHit | None, SearchResult | None] | None = None
    retrieval_error: Exception | None = None

    @property
    def ids(self) -> tuple[str, str]:
        return str(self.conversation.pk), str(self.assistant.pk)

    @property
    def notice(self) -> str | None:
        return " ".join(self.notices) or None


# --- Public API ------------------------------------------------------------------------------


async def answer_stream(
    *,
    question: str,
    conversation_id: uuid.UUID | str | None,
    collection_slug: str | None,
    user,
    api_key,
    request_id: str = "",
    history: Sequence[ChatMessage] | None = None,
) -> AsyncGenerator[ChatEvent, None]:
    """Answer a question with cited passages, as events: Started, Meta, Citations, Delta…, Done.

    Raises ChatError or BudgetExceeded before the first event: bad input, a budget used
    up, or (for a question without history, whose retrieval runs before that event) a
    database that fails or does not answer in time. After it, failures are reported as
    an Error event. `history` replaces the stored conversation's history
    (the OpenAI-compatible API sends its own).
    """
    turn = await _db(
        _turn_open, question=question, conversation_id=conversation_id,
        collection_slug=collection_slug, user=user, api_key=api_key, request_id=request_id,
        history=history,
    )
    try:
        yield Started(*turn.ids)
        try:
            async with aclosing(_answer(turn)) as events:
                async for event in events:
                    yield event
        except ChatUnavailable as exc:
            turn.status, turn.error_code, turn.error = Message.Status.ERROR, exc.code, str(exc)
        except Exception as exc:
            logger.exception("Answering failed (request %s)", request_id)
            turn.status, turn.error_code = Message.Status.ERROR, "internal_error"
            turn.error = f"Something went wrong while answering ({exc.__class__.__name__})."
        await _finish_once(turn)
        if turn.status == Message.Status.COMPLETE:
            yield _done_event(turn)
        else:
            yield Error(code=turn.error_code or "error", message=turn.error or "No answer.")
    finally:
        if turn.status == Message.Status.STREAMING:
            # The client went away (CancelledError) or closed the generator (GeneratorExit).
            turn.status = Message.Status.INTERRUPTED
            turn.error_code, turn.error = "interrupted", "The answer was stopped before it ended."
            for call in turn.calls:
                if call.status == UsageRecord.Status.OK and call.ended is None:
                    call.status = UsageRecord.Status.INTERRUPTED
        await _finish_once(turn)


async def answer_complete(
    *,
    question: str,
    conversation_id: uuid.UUID | str | None,
    collection_slug: str | None,
    user,
    api_key,
    request_id: str = "",
    history: Sequence[ChatMessage] | None = None,
) -> AnswerResult:
    """The whole answer at once, built on answer_stream; raises as it does before starting."""
    result: AnswerResult | None = None
    events = answer_stream(
        question=question, conversation_id=conversation_id, collection_slug=collection_slug,
        user=user, api_key=api_key, request_id=request_id, history=history,
    )
    async with aclosing(events):
        async for event in events:
            if isinstance(event, Started):
                result = AnswerResult(
                    conversation_id=event.conversation_id, message_id=event.message_id,
                    answer="", mode="", notice=None, citations=[], cited=[],
                    invalid_citations=[], usage={}, status=Message.Status.STREAMING,
                )
                continue
            assert result is not None
            if isinstance(event, Meta):
                result.mode, result.notice = event.mode, event.notice
                result.answerable = event.answerable
            elif isinstance(event, Citations):
                result.citations, result.related = event.citations, event.related
            elif isinstance(event, Delta):
                result.answer += event.text
            elif isinstance(event, Done):
                result.answer = event.text
                result.cited, result.invalid_citations = event.cited, event.invalid_citations
                result.usage, result.status = event.usage, event.status
            elif isinstance(event, Error):
                result.error = event
                result.status = (Message.Status.INTERRUPTED if event.code == "upstream_interrupted"
                                 else Message.Status.ERROR)
    assert result is not None
    return result


# --- Steps -----------------------------------------------------------------------------------


async def _db(fn: Callable[..., T], *args: Any, timeout: float | None = None, **kwargs: Any) -> T:
    """Run blocking work in the request's sync thread, within a timeout."""
    timeout = settings.KB_CHAT_DB_TIMEOUT_SECONDS if timeout is None else timeout
    try:
        return await asyncio.wait_for(sync_to_async(fn)(*args, **kwargs), timeout)
    except TimeoutError:
        logger.error("%s did not finish within %ss", fn.__name__, timeout)
        raise ChatUnavailable(
            "The database did not answer in time. Please try again in a moment."
        ) from None
    except DatabaseError as exc:
        raise _database_unavailable(fn.__name__, exc) from exc


def _database_unavailable(step: str, exc: DatabaseError) -> ChatUnavailable:
    logger.error("Database error in %s", step, exc_info=exc)
    return ChatUnavailable("The database is unavailable. Please try again in a moment.")


def _turn_open(**arguments: Any) -> _Turn:
    """_turn_check, and for a question without history (nothing to rewrite) the retrieval
    too: one trip to the request's sync thread before the first token instead of two.

    A retrieval failure is kept for _answer to raise, so it is reported inside the
    stream, as it is when retrieval runs on its own.
    """
    turn = _turn_check(**arguments)
    if not turn.history:
        turn.query = turn.question
        try:
            turn.retrieved = _retrieve(turn)
        except Exception as exc:
            turn.retrieval_error = exc
    return turn


def _turn_check(
    *, question: str, conversation_id, collection_slug: str | None, user, api_key,
    request_id: str, history: Sequence[ChatMessage] | None,
) -> _Turn:
    """Validate and check budgets; the turn's rows are built (ids included) but not written.

    Only reads: the writes (_turn_record) wait for a moment when the sync thread would
    otherwise be idle, so they cost no time before the first token.
    """
    question = question.strip()
    if not question:
        raise ChatInputError("Ask a question.", field="message")
    collection = None
    if collection_slug:
        collection = (
            Collection.objects.filter(
                search_selectors.collections_visible_to(user=user, api_key=api_key)
            )
            .filter(slug=collection_slug)
            .first()
        )
        if collection is None:
            raise ChatInputError(f"There is no collection “{collection_slug}”.", field="collection")
    conversation = None
    if conversation_id:
        conversation = selectors.conversation_get(user=user, pk=conversation_id, api_key=api_key)
        if conversation is None:
            raise ConversationNotFound("There is no such conversation.")
    budget_check(user=user, api_key=api_key)
    if history is None:
        history = (
            selectors.conversation_history(conversation=conversation,
                                           turns=settings.KB_CHAT_HISTORY_TURNS)
            if conversation is not None else []
        )
    if conversation is None:
        # Unsaved, but its id is already the one the client is told (uuid default).
        conversation = Conversation(
            user=user if getattr(user, "is_authenticated", False) else None,
            api_key=api_key,
            collection=collection,
            title=" ".join(question.split())[:120],
        )
    assistant = Message(
        conversation=conversation, role=Message.Role.ASSISTANT, status=Message.Status.STREAMING
    )
    return _Turn(
        question=question, user=user, api_key=api_key, request_id=request_id,
        conversation=conversation, assistant=assistant, collection=collection,
        history=list(history),
        kb_version=(caches.collection_version(collection) if collection is not None
                    else caches.kb_version(collection=None, user=user, api_key=api_key)),
    )


def _turn_record(turn: _Turn) -> None:
    """Write the question and an empty (streaming) answer, and touch the conversation."""
    with transaction.atomic():
        if turn.conversation._state.adding:
            turn.conversation.save(force_insert=True)
        Message.objects.create(conversation=turn.conversation, role=Message.Role.USER,
                               content=turn.question)
        turn.assistant.save(force_insert=True)
        Conversation.objects.filter(pk=turn.conversation.pk).update(updated_at=timezone.now())
        turn.usage.flush(conversation_id=turn.conversation.pk)


def _record_start(turn: _Turn) -> asyncio.Future:
    """Start writing the turn's rows (once) in the sync thread, without waiting for them.

    Called when the thread has nothing else to do before the first token (while a model
    is asked); _finish waits for it, so the outcome is never written before the question.
    """
    if turn.record_task is None:
        turn.record_task = asyncio.ensure_future(_db(_turn_record, turn))
    return turn.record_task


async def _answer(turn: _Turn) -> AsyncGenerator[ChatEvent, None]:
    backends = registry.chat_backends()
    if turn.retrieval_error is not None:
        error, turn.retrieval_error = turn.retrieval_error, None
        if isinstance(error, DatabaseError):
            raise _database_unavailable("_retrieve", error) from error
        raise error
    if turn.retrieved is not None:
        hit, result = turn.retrieved  # retrieved in _turn_open
    else:
        turn.query = turn.question
        if turn.history:
            rewritten = await _rewrite(turn, backends)
            if rewritten is not None:
                turn.query = rewritten
            else:
                # Not a real question, so not worth caching under this text.
                turn.query = prompts.follow_up_query(history=turn.history, question=turn.question)
                turn.cacheable = False
        # One trip to the request's sync thread for the caches and retrieval: each trip
        # costs time before the first token.
        hit, result = await _db(_retrieve, turn)
    if hit is not None:
        async with aclosing(_serve_cached(turn, hit)) as events:
            async for event in _recording_after_first_delta(turn, events):
                yield event
        return
    assert result is not None
    turn.notices.extend(result.notices)
    passages = [
        prompts.Passage(
            chunk_id=hit.chunk_id, document_id=hit.document_id, document_title=hit.document_title,
            text=hit.text, heading_path=tuple(hit.heading_path or ()), page_start=hit.page_start,
            page_end=hit.page_end,
        )
        for hit in result.hits
    ]
    if not passages or not (turn.answerability and turn.answerability.answerable):
        # Nothing, or nothing close enough, to answer from: a model could only guess, so
        # none is asked (and none is paid for).
        async with aclosing(_not_covered(turn, passages)) as events:
            async for event in _recording_after_first_delta(turn, events):
                yield event
        return

    turn.answerable = True
    async with aclosing(_cascade(turn, backends, passages)) as events:
        async for event in _recording_after_first_delta(turn, events):
            yield event


async def _recording_after_first_delta(
    turn: _Turn, events: AsyncIterator[ChatEvent]
) -> AsyncGenerator[ChatEvent, None]:
    """The events, with the turn's rows started once the first text is out.

    The writes take the sync thread about 10 ms, much of it holding the GIL: started
    earlier, they slowed the prompt and the request to the model on the event loop.
    After the first delta they overlap the rest of the stream instead.
    """
    async for event in events:
        yield event
        if isinstance(event, Delta):
            _record_start(turn)


def _one_per_document(passages: list[prompts.Passage]) -> list[prompts.Passage]:
    """The best passage of each document, best first: related chips name documents, and two
    chips with the same title look like a bug."""
    seen: set[int] = set()
    result = []
    for passage in passages:
        if passage.document_id not in seen:
            seen.add(passage.document_id)
            result.append(passage)
    return result


async def _not_covered(turn: _Turn, passages: list[prompts.Passage]) -> AsyncGenerator[ChatEvent, None]:
    """The answer that says the documents do not cover the question, with the closest
    passages as related sources (not citations)."""
    turn.mode = Message.Mode.EXTRACTED
    turn.answerable = False
    turn.cacheable = False
    if not passages:
        turn.notices.append(NOTICE_NO_PASSAGES)
        text = NOT_COVERED_ANSWER
    else:
        text = NOT_COVERED_RELATED
        turn.related = prompts.citations_for(_one_per_document(passages)[:RELATED_COUNT])
        logger.info("Message %s not answerable, no model asked: %s", turn.assistant.pk,
                    turn.answerability.describe() if turn.answerability else "no evidence")
    yield Meta(*turn.ids, mode=turn.mode, notice=turn.notice, answerable=False)
    yield Citations(citations=[], related=turn.related)
    turn.parts.append(text)
    yield Delta(text=text)
    turn.status = Message.Status.COMPLETE


async def _rewrite(turn: _Turn, backends: Sequence[ChatBackend]) -> str | None:
    """A follow-up rewritten as a standalone question by the first generative backend up."""
    messages = prompts.rewrite_messages(history=turn.history, question=turn.question)
    for backend in backends:
        if not backend.generative:
            continue
        breaker = circuit.breaker_for(backend)
        if not breaker.allow():
            continue
        call = _Call(
            provider=backend.provider_name, model=backend.model,
            counted_input_tokens=sum(backend.count_tokens(m.content) for m in messages),
            count_tokens=backend.count_tokens,
        )
        turn.calls.append(call)
        # The rewrite waits on a model, not on the sync thread: the writes fit in meanwhile.
        _record_start(turn)
        try:
            await asyncio.wait_for(
                _collect(backend.stream(messages, max_tokens=120, temperature=0.0), call),
                settings.KB_CHAT_FIRST_TOKEN_TIMEOUT,
            )
        except Exception as exc:
            call.ended = time.perf_counter()
            call.status, call.error = UsageRecord.Status.ERROR, _describe_error(exc)
            breaker.record_failure()
            logger.warning("Query rewrite with %s failed: %s", backend.model, exc)
            continue
        except BaseException:
            breaker.release()
            raise
        breaker.record_success()
        return prompts.rewrite_clean("".join(call.parts), fallback=turn.question)
    return None


async def _collect(stream: AsyncIterator[ChatDelta | ChatUsage], call: _Call) -> None:
    async with aclosing(stream):  # type: ignore[type-var]
        async for item in stream:
            if isinstance(item, ChatDelta):
                if call.first_token_at is None:
                    call.first_token_at = time.perf_counter()
                call.parts.append(item.text)
            elif isinstance(item, ChatUsage):
                call.usage = item
    call.ended = time.perf_counter()


def _retrieve(turn: _Turn) -> tuple[caches.CacheHit | None, SearchResult | None]:
    """A cached answer if there is one, else the passages to answer from."""
    hit = _cache_lookup(turn) if turn.cacheable else None
    if hit is not None:
        return hit, None
    result = search(
        params=SearchParams(
            query=turn.query,
            k=settings.KB_CHAT_TOP_K,
            mode="hybrid",
            rerank=None,
            collections=(turn.collection.slug,) if turn.collection else (),
        ),
        user=turn.user,
        api_key=turn.api_key,
        embedded=turn.embedded,
        # _turn_check found the collection among those the caller may read.
        collection_ids=(turn.collection.pk,) if turn.collection else None,
        usage=turn.usage,
    )
    if result.hits:
        # In the same trip to the sync thread: one small indexed query.
        turn.answerability = answerability_assess(
            result=result, follow_up=turn.question if turn.query != turn.question else None)
    return None, result


def _cache_lookup(turn: _Turn) -> caches.CacheHit | None:
    """Exact, then semantic; keeps the question's vector for search and the cache entry."""
    model = search_selectors.embedding_model_for_search()
    if model is not None:
        try:
            vector = query_vector(model=model, text=turn.query, user=turn.user,
                                  api_key=turn.api_key, usage=turn.usage)
            turn.embedded = QueryEmbedding(model=model, vector=vector)
        except ProviderError as exc:
            # Search tries again, and falls back to BM25 with a notice if it fails too.
            logger.warning("Embedding the question for the semantic cache failed: %s", exc)
    hit = caches.cache_lookup(
        question=turn.query, kb_version=turn.kb_version,
        vector=turn.embedded.vector if turn.embedded is not None else None,
        embedding_model=turn.embedded.model.key if turn.embedded is not None else "",
    )
    if hit is not None:
        caches.cache_hit_record(entry=hit.entry)
    return hit


async def _serve_cached(turn: _Turn, hit: caches.CacheHit) -> AsyncGenerator[ChatEvent, None]:
    entry = hit.entry
    call = _Call(provider=entry.provider or "cache", model=entry.model,
                 counted_input_tokens=0, count_tokens=lambda text: 0, cache_hit=True,
                 saved_cost_usd=entry.cost_usd)
    turn.calls.append(call)
    turn.answer_call = call
    turn.cacheable = False
    turn.answerable = True
    turn.mode = entry.mode
    turn.citations = list(entry.citations)
    turn.notices.append(
        NOTICE_CACHE_EXACT if hit.kind == "exact" else NOTICE_CACHE_SEMANTIC
    )
    yield Meta(*turn.ids, mode=turn.mode, notice=turn.notice)
    yield Citations(citations=turn.citations)
    call.first_token_at = time.perf_counter()
    for piece in _words(entry.answer):
        turn.parts.append(piece)
        call.parts.append(piece)
        yield Delta(text=piece)
    call.ended = time.perf_counter()
    turn.status = Message.Status.COMPLETE


async def _cascade(
    turn: _Turn, backends: Sequence[ChatBackend], passages: list[prompts.Passage]
) -> AsyncGenerator[ChatEvent, None]:
    """Try each backend in order until one starts answering; stream that one's answer."""
    failed: list[str] = []
    loop = asyncio.get_running_loop()
    heartbeat = settings.KB_CHAT_HEARTBEAT_SECONDS
    for backend in backends:
        breaker = circuit.breaker_for(backend) if backend.remote else None
        if breaker is not None and not breaker.allow():
            failed.append(f"{backend.model}: circuit open")
            continue
        prompt = prompts.prompt_build(
            question=turn.query, passages=passages, count_tokens=backend.count_tokens,
            context_tokens=settings.KB_CHAT_CONTEXT_TOKENS,
        )
        call = _Call(provider=backend.provider_name, model=backend.model,
                     counted_input_tokens=prompt.tokens, count_tokens=backend.count_tokens)
        turn.calls.append(call)
        upstream = _Upstream(backend.stream(
            prompt.messages,
            max_tokens=settings.KB_CHAT_MAX_OUTPUT_TOKENS,
            temperature=settings.KB_CHAT_TEMPERATURE if backend.generative else None,
        ), retried=call.retried)
        settled = False  # the breaker has been told success or failure
        try:
            # Wait for the first piece of text, with heartbeats and an overall deadline.
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
                    first = await upstream.next(min(heartbeat, remaining))
                    if first is _HEARTBEAT:
                        yield Heartbeat()
            except Exception as exc:
                call.ended = time.perf_counter()
                call.status = UsageRecord.Status.ERROR
                call.error = (_describe_error(exc) if not isinstance(exc, StopAsyncIteration)
                              else "the stream ended without an answer")
                if breaker is not None:
                    breaker.record_failure()
                settled = True
                logger.warning("Chat backend %s failed before answering: %s", backend.model,
                               call.error)
                failed.append(f"{backend.model}: {call.error}")
                continue

            if breaker is not None:
                breaker.record_success()
            settled = True
            call.first_token_at = time.perf_counter()
            turn.answer_call = call
            turn.mode = Message.Mode.GENERATED if backend.generative else Message.Mode.EXTRACTED
            passages_shown = prompt.passages
            buffered: list[Any] | None = None
            if not backend.generative:
                # A local answerer is done in an instant: read it whole, so its citations
                # can be numbered 1..n in the order they appear (passages reordered to match).
                buffered = [first]
                with contextlib.suppress(StopAsyncIteration):
                    while True:
                        buffered.append(await upstream.next(heartbeat))
                text = "".join(i.text for i in buffered if isinstance(i, ChatDelta))
                text, order = prompts.citations_renumber(text, passage_count=len(prompt.passages))
                passages_shown = [prompt.passages[n - 1] for n in order]
                buffered = [*(ChatDelta(text=piece) for piece in _words(text)),
                            *(i for i in buffered if isinstance(i, ChatUsage))]
            turn.passages = passages_shown
            turn.citations = prompts.citations_for(passages_shown)
            if failed:
                turn.notices.append(NOTICE_FALLBACK if backend.generative else NOTICE_MODEL_DOWN)
            yield Meta(*turn.ids, mode=turn.mode, notice=turn.notice)
            yield Citations(citations=turn.citations)

            if buffered is not None:
                for item in buffered:
                    if isinstance(item, ChatDelta) and item.text:
                        call.parts.append(item.text)
                        turn.parts.append(item.text)
                        yield Delta(text=item.text)
                    elif isinstance(item, ChatUsage):
                        call.usage = item
                call.ended = time.perf_counter()
                turn.status = Message.Status.COMPLETE
                return

            item = first
            while True:
                if isinstance(item, ChatDelta):
                    if item.text:
                        call.parts.append(item.text)
                        turn.parts.append(item.text)
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
                    call.status, call.error = UsageRecord.Status.ERROR, _describe_error(exc)
                    if breaker is not None:
                        breaker.record_failure()
                    logger.warning("Chat backend %s failed mid-answer: %s", backend.model, exc)
                    turn.status = Message.Status.INTERRUPTED
                    turn.error_code = "upstream_interrupted"
                    turn.error = ("The model stopped answering midway; the partial answer was "
                                  "kept. Please ask again.")
                    return
            call.ended = time.perf_counter()
            turn.status = Message.Status.COMPLETE
            return
        finally:
            # Closing first, before any bookkeeping: a consumer that left must not keep
            # the upstream generating tokens nobody reads.
            await upstream.aclose()
            if breaker is not None and not settled:
                breaker.release()
    turn.status = Message.Status.ERROR
    turn.error_code = "no_backend"
    turn.error = "No model could answer right now: " + "; ".join(failed)


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
        """The next item, _HEARTBEAT if none arrived within timeout; StopAsyncIteration at the end."""
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


async def _anext(stream: AsyncIterator[T]) -> T:
    return await anext(stream)


async def _finish_once(turn: _Turn) -> None:
    """Persist the outcome exactly once, even if the request is cancelled meanwhile."""
    if turn.finish_task is None:
        turn.finish_task = asyncio.ensure_future(_finish(turn))
    await asyncio.shield(turn.finish_task)


async def _finish(turn: _Turn) -> None:
    try:
        # The question's rows first (started now if the answer ended before they were).
        await _record_start(turn)
        await _db(_turn_finish, turn)
    except ChatUnavailable:
        logger.error("Could not persist message %s (status %s)", turn.assistant.pk, turn.status)
        if turn.status == Message.Status.COMPLETE:
            turn.status = Message.Status.ERROR
            turn.error_code, turn.error = "database_unavailable", "The answer could not be saved."
    # The question and answer by fingerprint (the text too only with KB_LOG_CONTENT), so
    # a log reader can correlate requests without reading what users asked.
    logger.info(
        "Answered message %s: %s, %s, %d passages, question %s, answer %s",
        turn.assistant.pk, turn.status, turn.mode or "-", len(turn.citations),
        loggable_text(turn.question), loggable_text("".join(turn.parts)),
    )


def _turn_finish(turn: _Turn) -> None:
    """Write the usage ledger, the assistant message and (for new answers) the cache."""
    # Rows held after the question's were written (a follow-up's search runs after them).
    turn.usage.flush(conversation_id=turn.conversation.pk)
    for call in turn.calls:
        end = call.ended or time.perf_counter()
        retried_attempts_record_usage(
            call.retried, kind=UsageRecord.Kind.CHAT, provider=call.provider, model=call.model,
            user=turn.user, api_key=turn.api_key, conversation_id=turn.conversation.pk,
            request_id=turn.request_id[:64],
        )
        usage_record_create(
            kind=UsageRecord.Kind.CHAT,
            provider=call.provider,
            model=(call.usage.model if call.usage and call.usage.model else call.model),
            input_tokens=call.input_tokens,
            output_tokens=call.output_tokens,
            latency_ms=(end - call.started) * 1000,
            time_to_first_token_ms=(
                (call.first_token_at - call.started) * 1000 if call.first_token_at else None
            ),
            cache_hit=call.cache_hit,
            saved_cost_usd=call.saved_cost_usd if call.cache_hit else None,
            status=call.status,
            error=call.error,
            user=turn.user,
            api_key=turn.api_key,
            conversation_id=turn.conversation.pk,
            request_id=turn.request_id[:64],
        )
    text = "".join(turn.parts)
    passage_count = len(turn.citations)
    turn.check = prompts.citations_check(text, passage_count=passage_count)
    answer = turn.answer_call
    Message.objects.filter(pk=turn.assistant.pk).update(
        content=turn.check.text,
        status=turn.status,
        mode=turn.mode,
        notice=turn.notice or "",
        # A not-covered answer keeps its related passages where citations would be; the
        # API tells them apart by `answerable`.
        citations=turn.citations if turn.answerable is not False else turn.related,
        answerable=turn.answerable,
        cited=turn.check.cited,
        invalid_citations=turn.check.invalid,
        provider=answer.provider if answer else "",
        model=answer.model if answer else "",
        input_tokens=answer.input_tokens if answer else 0,
        output_tokens=answer.output_tokens if answer else 0,
        cache_hit=bool(answer and answer.cache_hit),
        error=turn.error if turn.status != Message.Status.COMPLETE else "",
        updated_at=timezone.now(),
    )
    Conversation.objects.filter(pk=turn.conversation.pk).update(updated_at=timezone.now())
    if (
        turn.status == Message.Status.COMPLETE
        and turn.cacheable
        and answer is not None
        and turn.mode == Message.Mode.GENERATED
        and turn.check.cited
    ):
        # Only generated answers that cite something: an extractive answer is free to
        # redo, and caching it would keep serving it after the model is back.
        caches.cache_store(
            question=turn.query, collection=turn.collection, kb_version=turn.kb_version,
            vector=turn.embedded.vector if turn.embedded else None,
            embedding_model=turn.embedded.model.key if turn.embedded else "",
            answer=turn.check.text,
            mode=turn.mode, citations=turn.citations, cited=turn.check.cited,
            source_document_ids=[p.document_id for p in turn.passages],
            provider=answer.provider, model=answer.model, input_tokens=answer.input_tokens,
            output_tokens=answer.output_tokens, cost_usd=answer.cost,
        )


def _done_event(turn: _Turn) -> Done:
    answer = turn.answer_call
    check = turn.check or prompts.CitationCheck(text="".join(turn.parts))
    usage = {
        "input_tokens": answer.input_tokens if answer else 0,
        "output_tokens": answer.output_tokens if answer else 0,
        "cost_usd": float(answer.cost) if answer else 0.0,
        "model": answer.model if answer else "",
        "provider": answer.provider if answer else "",
        "cache_hit": bool(answer and answer.cache_hit),
    }
    return Done(message_id=str(turn.assistant.pk), status=turn.status, usage=usage,
                cited=check.cited, invalid_citations=check.invalid, text=check.text,
                answerable=turn.answerable is not False)


def _describe_error(exc: BaseException) -> str:
    if isinstance(exc, ProviderError):
        return str(exc)
    return f"{exc.__class__.__name__}: {exc}"


def _words(text: str) -> list[str]:
    """Text cut into word-sized pieces that join back to it exactly."""
    pieces = re.findall(r"\s*\S+", text)
    tail = text[sum(len(piece) for piece in pieces):]
    return [*pieces, tail] if tail else pieces
