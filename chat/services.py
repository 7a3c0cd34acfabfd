"""The chat pipeline: one question in, a stream of typed events out.

    budget → (rewrite a follow-up) → cache → retrieval → prompt → model cascade
           → citation check → usage ledger, message, cache

The question's rows are written while the model is asked (off the path to the first
token); their ids are made up front, so the first event can already name them.

`answer_stream` is an async generator of events (chat.events); the views turn them into
SSE or JSON. The turn's state is in chat.turn; the models are tried by chat.cascade.
Everything blocking (ORM, the embedding model inside search) runs in Django's
per-request sync thread through sync_to_async, bounded by a timeout, so the event loop
never blocks and a stuck database ends the answer with an error event
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
import logging
import secrets
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import asdict, dataclass, field
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import DatabaseError, transaction
from django.utils import timezone

from chat import answer_cache, circuit, prompts, selectors
from chat.answerability import answerability_assess
from chat.budgets import budget_check
from chat.cascade import cascade_stream, describe_error, words
from chat.events import ChatEvent, Citations, Delta, Done, Error, Meta, Started
from chat.models import Conversation, Message
from chat.turn import ModelCall, Turn, TurnRequest
from kb.models import ApiKey, Collection, UsageRecord
from kb.ops.log_privacy import loggable_text
from kb.providers import registry
from kb.providers.base import ChatBackend, ChatDelta, ChatMessage, ChatUsage, Prompt, ProviderError
from kb.selectors import AnyUser, signed_in_user
from kb.usage.ledger import retried_attempts_record_usage, usage_record_create
from search import selectors as search_selectors
from search.query_embedding import query_vector
from search.services import QueryEmbedding, SearchParams, SearchResult, search

logger = logging.getLogger(__name__)


__all__ = [
    "AnswerResult",
    "ChatError",
    "ChatInputError",
    "ChatUnavailable",
    "ConversationNotFound",
    "answer_complete",
    "answer_stream",
]

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


# --- Public API ------------------------------------------------------------------------------


async def answer_stream(
    *,
    question: str,
    conversation_id: uuid.UUID | str | None,
    collection_slug: str | None,
    user: AnyUser,
    api_key: ApiKey | None,
    request_id: str = "",
    history: Sequence[ChatMessage] | None = None,
    collection_slugs: Sequence[str] = (),
) -> AsyncGenerator[ChatEvent, None]:
    """Answer a question with cited passages, as events: Started, Meta, Citations, Delta…, Done.

    Raises ChatError or BudgetExceeded before the first event: bad input, a budget used
    up, or (for a question without history, whose retrieval runs before that event) a
    database that fails or does not answer in time. After it, failures are reported as
    an Error event. `history` replaces the stored conversation's history
    (the OpenAI-compatible API sends its own).

    The question is asked of `collection_slug` and `collection_slugs` together; of every
    collection the caller can read when both are empty.
    """
    turn = await _db(
        _turn_open, question=question, conversation_id=conversation_id,
        collection_slug=collection_slug, collection_slugs=collection_slugs, user=user,
        api_key=api_key, request_id=request_id, history=history,
    )
    answer = turn.answer
    try:
        yield Started(*turn.request.ids)
        try:
            async with aclosing(_answer(turn)) as events:
                async for event in events:
                    yield event
        except ChatUnavailable as exc:
            answer.status, answer.error_code, answer.error = (
                Message.Status.ERROR, exc.code, str(exc)
            )
        except Exception as exc:
            logger.exception("Answering failed (request %s)", request_id)
            answer.status, answer.error_code = Message.Status.ERROR, "internal_error"
            answer.error = f"Something went wrong while answering ({exc.__class__.__name__})."
        await _finish_once(turn)
        if answer.status == Message.Status.COMPLETE:
            yield _done_event(turn)
        else:
            yield Error(code=answer.error_code or "error", message=answer.error or "No answer.")
    finally:
        if answer.status == Message.Status.STREAMING:
            # The client went away (CancelledError) or closed the generator (GeneratorExit).
            answer.status = Message.Status.INTERRUPTED
            answer.error_code, answer.error = (
                "interrupted", "The answer was stopped before it ended."
            )
            for call in answer.calls:
                if call.status == UsageRecord.Status.OK and call.ended is None:
                    call.status = UsageRecord.Status.INTERRUPTED
        await _finish_once(turn)


async def answer_complete(
    *,
    question: str,
    conversation_id: uuid.UUID | str | None,
    collection_slug: str | None,
    user: AnyUser,
    api_key: ApiKey | None,
    request_id: str = "",
    history: Sequence[ChatMessage] | None = None,
    collection_slugs: Sequence[str] = (),
) -> AnswerResult:
    """The whole answer at once, built on answer_stream; raises as it does before starting."""
    result: AnswerResult | None = None
    events = answer_stream(
        question=question, conversation_id=conversation_id, collection_slug=collection_slug,
        user=user, api_key=api_key, request_id=request_id, history=history,
        collection_slugs=collection_slugs,
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


async def _db[T](
    fn: Callable[..., T], *args: Any, timeout: float | None = None, **kwargs: Any
) -> T:
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


def _turn_open(**arguments: Any) -> Turn:
    """_turn_check, and for a question without history (nothing to rewrite) the retrieval
    too: one trip to the request's sync thread before the first token instead of two.

    A retrieval failure is kept for _answer to raise, so it is reported inside the
    stream, as it is when retrieval runs on its own.
    """
    turn = Turn(request=_turn_check(**arguments))
    if not turn.request.history:
        turn.retrieval.query = turn.request.question
        try:
            turn.retrieval.found = _retrieve(turn)
        except Exception as exc:
            turn.retrieval.error = exc
    return turn


def _turn_check(
    *, question: str, conversation_id: uuid.UUID | str | None, collection_slug: str | None,
    user: AnyUser, api_key: ApiKey | None,
    request_id: str, history: Sequence[ChatMessage] | None, collection_slugs: Sequence[str] = (),
) -> TurnRequest:
    """Validate and check budgets; the turn's rows are built (ids included) but not written.

    Only reads: the writes (_turn_record) wait for a moment when the sync thread would
    otherwise be idle, so they cost no time before the first token.
    """
    question = question.strip()
    if not question:
        raise ChatInputError("Ask a question.", field="message")
    chosen = _collections_chosen(
        slugs=[*([collection_slug] if collection_slug else []), *collection_slugs],
        user=user, api_key=api_key,
    )
    collection = chosen[0] if len(chosen) == 1 else None
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
            user=signed_in_user(user),
            api_key=api_key,
            collection=collection,
            title=" ".join(question.split())[:120],
        )
    assistant = Message(
        conversation=conversation, role=Message.Role.ASSISTANT, status=Message.Status.STREAMING
    )
    if collection is not None:
        version = answer_cache.collection_version(collection)
    elif chosen:
        version = answer_cache.collections_version(chosen)
    else:
        version = answer_cache.kb_version(collection=None, user=user, api_key=api_key)
    return TurnRequest(
        question=question, user=user, api_key=api_key, request_id=request_id,
        conversation=conversation, assistant=assistant, collection=collection,
        collections=tuple(chosen), history=list(history), kb_version=version,
    )


MAX_CHAT_COLLECTIONS = 50


def _collections_chosen(
    *, slugs: Sequence[str], user: AnyUser, api_key: ApiKey | None
) -> list[Collection]:
    """The named collections (each once, in slug order), all of which the caller may read."""
    wanted = sorted(set(slugs))
    if not wanted:
        return []
    field = "collection" if len(wanted) == 1 else "collections"
    if len(wanted) > MAX_CHAT_COLLECTIONS:
        raise ChatInputError(f"Choose at most {MAX_CHAT_COLLECTIONS} collections.", field=field)
    found = list(
        Collection.objects.filter(
            search_selectors.collections_visible_to(user=user, api_key=api_key)
        ).filter(slug__in=wanted).order_by("slug")
    )
    missing = [slug for slug in wanted if slug not in {c.slug for c in found}]
    if missing:
        names = ", ".join(f"“{slug}”" for slug in missing)
        noun = "collection" if len(missing) == 1 else "collections"
        raise ChatInputError(f"There is no {noun} {names}.", field=field)
    return found


def _turn_record(turn: Turn) -> None:
    """Write the question and an empty (streaming) answer, and touch the conversation."""
    request = turn.request
    with transaction.atomic():
        if request.conversation._state.adding:
            request.conversation.save(force_insert=True)
            if len(request.collections) > 1:
                request.conversation.collections.set(request.collections)
        Message.objects.create(conversation=request.conversation, role=Message.Role.USER,
                               content=request.question)
        request.assistant.save(force_insert=True)
        Conversation.objects.filter(pk=request.conversation.pk).update(updated_at=timezone.now())
        turn.retrieval.usage.flush(conversation_id=request.conversation.pk)


def _record_start(turn: Turn) -> asyncio.Future:
    """Start writing the turn's rows (once) in the sync thread, without waiting for them.

    Called when the thread has nothing else to do before the first token (while a model
    is asked); _finish waits for it, so the outcome is never written before the question.
    """
    if turn.record_task is None:
        turn.record_task = asyncio.ensure_future(_db(_turn_record, turn))
    return turn.record_task


async def _answer(turn: Turn) -> AsyncGenerator[ChatEvent, None]:
    backends = registry.chat_backends()
    hit, result = await _retrieved(turn, backends)
    if hit is not None:
        events = _serve_cached(turn, hit)
    else:
        assert result is not None
        turn.answer.notices.extend(result.notices)
        passages = [
            prompts.Passage(
                chunk_id=found.chunk_id, document_id=found.document_id,
                document_title=found.document_title, text=found.text,
                heading_path=tuple(found.heading_path or ()), page_start=found.page_start,
                page_end=found.page_end,
            )
            for found in result.hits
        ]
        answerability = turn.retrieval.answerability
        if not passages or not (answerability and answerability.answerable):
            # Nothing, or nothing close enough, to answer from: a model could only guess,
            # so none is asked (and none is paid for).
            events = _not_covered(turn, passages)
        else:
            turn.answer.answerable = True
            events = cascade_stream(answer=turn.answer, ids=turn.request.ids,
                                    query=turn.retrieval.query, passages=passages,
                                    backends=backends)
    async with aclosing(events):
        async for event in _recording_after_first_delta(turn, events):
            yield event


async def _retrieved(
    turn: Turn, backends: Sequence[ChatBackend]
) -> tuple[answer_cache.CacheHit | None, SearchResult | None]:
    """What _turn_open retrieved (or the error it met), else the follow-up's retrieval."""
    retrieval = turn.retrieval
    if retrieval.error is not None:
        error, retrieval.error = retrieval.error, None
        if isinstance(error, DatabaseError):
            raise _database_unavailable("_retrieve", error) from error
        raise error
    if retrieval.found is not None:
        return retrieval.found  # retrieved in _turn_open
    retrieval.query = turn.request.question
    if turn.request.history:
        rewritten = await _rewrite(turn, backends)
        if rewritten is not None:
            retrieval.query = rewritten
        else:
            # Not a real question, so not worth caching under this text.
            retrieval.query = prompts.follow_up_query(history=turn.request.history,
                                                      question=turn.request.question)
            retrieval.cacheable = False
    # One trip to the request's sync thread for the caches and retrieval: each trip
    # costs time before the first token.
    retrieval.found = await _db(_retrieve, turn)
    return retrieval.found


async def _recording_after_first_delta(
    turn: Turn, events: AsyncIterator[ChatEvent]
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


async def _not_covered(
    turn: Turn, passages: list[prompts.Passage]
) -> AsyncGenerator[ChatEvent, None]:
    """The answer that says the documents do not cover the question, with the closest
    passages as related sources (not citations)."""
    answer = turn.answer
    answer.mode = Message.Mode.EXTRACTED
    answer.answerable = False
    if not passages:
        answer.notices.append(NOTICE_NO_PASSAGES)
        text = NOT_COVERED_ANSWER
    else:
        text = NOT_COVERED_RELATED
        answer.related = prompts.citations_for(_one_per_document(passages)[:RELATED_COUNT])
        answerability = turn.retrieval.answerability
        logger.info("Message %s not answerable, no model asked: %s", turn.request.assistant.pk,
                    answerability.describe() if answerability else "no evidence")
    yield Meta(*turn.request.ids, mode=answer.mode, notice=answer.notice, answerable=False)
    yield Citations(citations=[], related=answer.related)
    answer.parts.append(text)
    yield Delta(text=text)
    answer.status = Message.Status.COMPLETE


async def _rewrite(turn: Turn, backends: Sequence[ChatBackend]) -> str | None:
    """A follow-up rewritten as a standalone question by the first generative backend up."""
    messages = prompts.rewrite_messages(
        history=turn.request.history, question=turn.request.question
    )
    for backend in backends:
        if not backend.generative:
            continue
        breaker = circuit.breaker_for(backend)
        if not breaker.allow():
            continue
        call = ModelCall(
            provider=backend.provider_name, model=backend.model,
            counted_input_tokens=sum(backend.count_tokens(m.content) for m in messages),
            count_tokens=backend.count_tokens,
        )
        turn.answer.calls.append(call)
        # The rewrite waits on a model, not on the sync thread: the writes fit in meanwhile.
        _record_start(turn)
        try:
            await asyncio.wait_for(
                _collect(backend.stream(Prompt(messages=messages), max_tokens=120,
                                        temperature=0.0), call),
                settings.KB_CHAT_FIRST_TOKEN_TIMEOUT,
            )
        except Exception as exc:
            call.ended = time.perf_counter()
            call.status, call.error = UsageRecord.Status.ERROR, describe_error(exc)
            breaker.record_failure()
            logger.warning("Query rewrite with %s failed: %s", backend.model, exc)
            continue
        except BaseException:
            breaker.release()
            raise
        breaker.record_success()
        return prompts.rewrite_clean("".join(call.parts), fallback=turn.request.question)
    return None


async def _collect(stream: AsyncIterator[ChatDelta | ChatUsage], call: ModelCall) -> None:
    async with aclosing(stream):  # type: ignore[type-var]
        async for item in stream:
            if isinstance(item, ChatDelta):
                if call.first_token_at is None:
                    call.first_token_at = time.perf_counter()
                call.parts.append(item.text)
            elif isinstance(item, ChatUsage):
                call.usage = item
    call.ended = time.perf_counter()


def _retrieve(turn: Turn) -> tuple[answer_cache.CacheHit | None, SearchResult | None]:
    """A cached answer if there is one, else the passages to answer from."""
    request, retrieval = turn.request, turn.retrieval
    hit = _cache_lookup(turn) if retrieval.cacheable else None
    if hit is not None:
        return hit, None
    result = search(
        params=SearchParams(
            query=retrieval.query,
            k=settings.KB_CHAT_TOP_K,
            mode="hybrid",
            rerank=None,
            collections=tuple(c.slug for c in request.collections),
        ),
        user=request.user,
        api_key=request.api_key,
        embedded=retrieval.embedded,
        # _turn_check found the collections among those the caller may read.
        collection_ids=tuple(c.pk for c in request.collections) or None,
        usage=retrieval.usage,
    )
    if result.hits:
        # In the same trip to the sync thread: one small indexed query.
        retrieval.answerability = answerability_assess(
            result=result,
            follow_up=request.question if retrieval.query != request.question else None)
    return None, result


def _cache_lookup(turn: Turn) -> answer_cache.CacheHit | None:
    """Exact, then semantic; keeps the question's vector for search and the cache entry."""
    request, retrieval = turn.request, turn.retrieval
    model = search_selectors.embedding_model_for_search()
    if model is not None:
        try:
            vector = query_vector(model=model, text=retrieval.query, user=request.user,
                                  api_key=request.api_key, usage=retrieval.usage)
            retrieval.embedded = QueryEmbedding(model=model, vector=vector)
        except ProviderError as exc:
            # Search tries again, and falls back to BM25 with a notice if it fails too.
            logger.warning("Embedding the question for the semantic cache failed: %s", exc)
    embedded = retrieval.embedded
    hit = answer_cache.cache_lookup(
        question=retrieval.query, kb_version=request.kb_version,
        vector=embedded.vector if embedded is not None else None,
        embedding_model=embedded.model.key if embedded is not None else "",
    )
    if hit is not None:
        answer_cache.cache_hit_record(entry=hit.entry)
    return hit


async def _serve_cached(turn: Turn, hit: answer_cache.CacheHit) -> AsyncGenerator[ChatEvent, None]:
    entry, answer = hit.entry, turn.answer
    call = ModelCall(provider=entry.provider or "cache", model=entry.model,
                     counted_input_tokens=0, count_tokens=lambda text: 0, cache_hit=True,
                     saved_cost_usd=entry.cost_usd)
    answer.calls.append(call)
    answer.answer_call = call
    answer.answerable = True
    answer.mode = entry.mode
    answer.citations = list(entry.citations)
    answer.notices.append(
        NOTICE_CACHE_EXACT if hit.kind == "exact" else NOTICE_CACHE_SEMANTIC
    )
    yield Meta(*turn.request.ids, mode=answer.mode, notice=answer.notice)
    yield Citations(citations=answer.citations)
    call.first_token_at = time.perf_counter()
    for piece in words(entry.answer):
        answer.parts.append(piece)
        call.parts.append(piece)
        yield Delta(text=piece)
    call.ended = time.perf_counter()
    answer.status = Message.Status.COMPLETE


async def _finish_once(turn: Turn) -> None:
    """Persist the outcome exactly once, even if the request is cancelled meanwhile."""
    if turn.finish_task is None:
        turn.finish_task = asyncio.ensure_future(_finish(turn))
    await asyncio.shield(turn.finish_task)


async def _finish(turn: Turn) -> None:
    answer = turn.answer
    try:
        # The question's rows first (started now if the answer ended before they were).
        await _record_start(turn)
        await _db(_turn_finish, turn)
    except ChatUnavailable:
        logger.error("Could not persist message %s (status %s)", turn.request.assistant.pk,
                     answer.status)
        if answer.status == Message.Status.COMPLETE:
            answer.status = Message.Status.ERROR
            answer.error_code, answer.error = (
                "database_unavailable", "The answer could not be saved."
            )
    # The question and answer by fingerprint (the text too only with KB_LOG_CONTENT), so
    # a log reader can correlate requests without reading what users asked.
    logger.info(
        "Answered message %s: %s, %s, %d passages, question %s, answer %s",
        turn.request.assistant.pk, answer.status, answer.mode or "-", len(answer.citations),
        loggable_text(turn.request.question), loggable_text("".join(answer.parts)),
    )


def _turn_finish(turn: Turn) -> None:
    """Write the usage ledger, the assistant message and (for new answers) the cache."""
    # Rows held after the question's were written (a follow-up's search runs after them).
    turn.retrieval.usage.flush(conversation_id=turn.request.conversation.pk)
    _calls_record(turn)
    answer = turn.answer
    answer.check = prompts.citations_check("".join(answer.parts),
                                           passage_count=len(answer.citations))
    _message_update(turn, answer.check)
    call = answer.answer_call
    if (
        answer.status == Message.Status.COMPLETE
        and turn.retrieval.cacheable
        and call is not None
        # A cached answer is not stored again.
        and not call.cache_hit
        and answer.mode == Message.Mode.GENERATED
        and answer.check.cited
    ):
        # Only generated answers that cite something: an extractive answer is free to
        # redo, and caching it would keep serving it after the model is back.
        _answer_cache_store(turn, call, answer.check)


def _calls_record(turn: Turn) -> None:
    """One usage ledger row per model call, and one per attempt it retried."""
    request = turn.request
    for call in turn.answer.calls:
        end = call.ended or time.perf_counter()
        retried_attempts_record_usage(
            call.retried, kind=UsageRecord.Kind.CHAT, provider=call.provider, model=call.model,
            user=request.user, api_key=request.api_key, conversation_id=request.conversation.pk,
            request_id=request.request_id[:64],
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
            user=request.user,
            api_key=request.api_key,
            conversation_id=request.conversation.pk,
            request_id=request.request_id[:64],
        )


def _message_update(turn: Turn, check: prompts.CitationCheck) -> None:
    """The assistant message as the answer ended, and its conversation touched."""
    answer, call = turn.answer, turn.answer.answer_call
    Message.objects.filter(pk=turn.request.assistant.pk).update(
        content=check.text,
        status=answer.status,
        mode=answer.mode,
        notice=answer.notice or "",
        # A not-covered answer keeps its related passages where citations would be; the
        # API tells them apart by `answerable`.
        citations=answer.citations if answer.answerable is not False else answer.related,
        answerable=answer.answerable,
        cited=check.cited,
        invalid_citations=check.invalid,
        provider=call.provider if call else "",
        model=call.model if call else "",
        input_tokens=call.input_tokens if call else 0,
        output_tokens=call.output_tokens if call else 0,
        cache_hit=bool(call and call.cache_hit),
        error=answer.error if answer.status != Message.Status.COMPLETE else "",
        retrieval=_retrieval_kept(turn),
        updated_at=timezone.now(),
    )
    Conversation.objects.filter(pk=turn.request.conversation.pk).update(updated_at=timezone.now())


def _retrieval_kept(turn: Turn) -> dict:
    """What retrieval gave this answer, kept on the message (Message.retrieval)."""
    retrieval = turn.retrieval
    hit, result = retrieval.found or (None, None)
    kept: dict[str, Any] = {"query": retrieval.query}
    if hit is not None:
        kept["cache"] = {"kind": hit.kind, "similarity": round(hit.similarity, 4)}
    if result is not None:
        kept["mode"] = result.mode
        kept["hits"] = [{"chunk_id": h.chunk_id, "document_id": h.document_id,
                         "score": round(h.score, 6)} for h in result.hits]
    if retrieval.answerability is not None:
        kept["answerability"] = asdict(retrieval.answerability)
    return kept


def _answer_cache_store(turn: Turn, call: ModelCall, check: prompts.CitationCheck) -> None:
    request, retrieval, answer = turn.request, turn.retrieval, turn.answer
    answer_cache.cache_store(
        question=retrieval.query, collection=request.collection, kb_version=request.kb_version,
        vector=retrieval.embedded.vector if retrieval.embedded else None,
        embedding_model=retrieval.embedded.model.key if retrieval.embedded else "",
        answer=check.text,
        mode=answer.mode, citations=answer.citations, cited=check.cited,
        source_document_ids=[p.document_id for p in answer.passages],
        provider=call.provider, model=call.model, input_tokens=call.input_tokens,
        output_tokens=call.output_tokens, cost_usd=call.cost,
    )


def _done_event(turn: Turn) -> Done:
    answer = turn.answer
    call = answer.answer_call
    check = answer.check or prompts.CitationCheck(text="".join(answer.parts))
    usage = {
        "input_tokens": call.input_tokens if call else 0,
        "output_tokens": call.output_tokens if call else 0,
        "cost_usd": float(call.cost) if call else 0.0,
        "model": call.model if call else "",
        "provider": call.provider if call else "",
        "cache_hit": bool(call and call.cache_hit),
    }
    return Done(message_id=str(turn.request.assistant.pk), status=answer.status, usage=usage,
                cited=check.cited, invalid_citations=check.invalid, text=check.text,
                answerable=answer.answerable is not False)


def conversation_rename(*, conversation: Conversation, title: str) -> Conversation:
    """Give the conversation a title of the caller's choosing (stripped; at most 200 chars)."""
    conversation.title = title.strip()[:200]
    # Not save(): updated_at orders the history by activity, and a rename is not activity.
    Conversation.objects.filter(pk=conversation.pk).update(title=conversation.title)
    return conversation


def conversation_share(*, conversation: Conversation) -> Conversation:
    """Give the conversation a share token, unless it has one (the link stays the same)."""
    if conversation.share_token is None:
        conversation.share_token = secrets.token_urlsafe(32)
        conversation.shared_at = timezone.now()
        conversation.save(update_fields=["share_token", "shared_at"])
    return conversation


def conversation_unshare(*, conversation: Conversation) -> Conversation:
    """Stop sharing: the old link opens nothing, and sharing again makes a new one."""
    conversation.share_token = None
    conversation.shared_at = None
    conversation.save(update_fields=["share_token", "shared_at"])
    return conversation


def conversation_delete(*, conversation: Conversation) -> None:
    """Delete the conversation and its messages (they cascade). Usage rows keep their counts:
    the ledger records what was spent, not what was said."""
    conversation.delete()
