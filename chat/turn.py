"""The state of one chat turn, in parts that each have one owner.

    Turn
      request    TurnRequest  the question as asked, who asked it, where it goes:
                              built by services._turn_check, never changed after
      retrieval  Retrieval    what the question was searched as and what was found:
                              filled by services._turn_open / _retrieve (and a rewrite)
      answer     AnswerDraft  the answer being built, and every model call it took:
                              filled by whichever path answers (chat.cascade, a cached
                              answer, or "not covered") and written by services._turn_finish

Its own module because both chat.services (the turn) and chat.cascade (the models)
use it, and the cascade must not import the services that call it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING

from chat import prompts
from chat.answer_cache import CacheHit
from chat.answerability import Answerability
from chat.models import Conversation, Message
from kb.models import ApiKey, Collection, UsageRecord
from kb.providers.base import ChatMessage, ChatUsage
from kb.providers.retrying import FailedAttempt
from kb.usage.ledger import UsageBuffer, model_cost
from search.services import QueryEmbedding, SearchResult

if TYPE_CHECKING:
    from kb.selectors import AnyUser


@dataclass
class ModelCall:
    """One model call (an answer, a rewrite, a cached answer), written to the usage ledger
    when the answer ends."""

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


@dataclass(frozen=True)
class TurnRequest:
    """The question as asked; its rows (ids included) are built but written later."""

    question: str
    user: AnyUser
    api_key: ApiKey | None
    request_id: str
    conversation: Conversation
    assistant: Message
    # The one collection asked, or None for several or all of them.
    collection: Collection | None
    history: list[ChatMessage]
    kb_version: str
    # The collections the question is asked of; empty for every one the caller can read.
    collections: tuple[Collection, ...] = ()

    @property
    def ids(self) -> tuple[str, str]:
        """(conversation id, assistant message id), as the events name them."""
        return str(self.conversation.pk), str(self.assistant.pk)


@dataclass
class Retrieval:
    """What the question was searched as, and what the cache and the search found."""

    query: str = ""
    # False for a follow-up searched as the previous question plus this one: not a real
    # question, so neither looked up in nor stored to the answer cache.
    cacheable: bool = True
    embedded: QueryEmbedding | None = None
    # Decided after a search that found something (None: not decided).
    answerability: Answerability | None = None
    # The query embedding's and the search's ledger rows, written off the path to the
    # first token (services._turn_record) and tagged with the conversation.
    usage: UsageBuffer = field(default_factory=UsageBuffer)
    # What _turn_open retrieved (cached answer, or search result), or the error it met.
    found: tuple[CacheHit | None, SearchResult | None] | None = None
    error: Exception | None = None


@dataclass
class AnswerDraft:
    """The answer being built, and the model calls of the turn (a rewrite's too)."""

    status: str = Message.Status.STREAMING
    mode: str = ""
    notices: list[str] = field(default_factory=list)
    passages: list[prompts.Passage] = field(default_factory=list)
    citations: list[dict] = field(default_factory=list)
    parts: list[str] = field(default_factory=list)
    calls: list[ModelCall] = field(default_factory=list)
    # The call whose text is the answer (None: no model answered).
    answer_call: ModelCall | None = None
    error_code: str = ""
    error: str = ""
    check: prompts.CitationCheck | None = None
    # None: not decided (e.g. the answer failed before retrieval ended).
    answerable: bool | None = None
    related: list[dict] = field(default_factory=list)

    @property
    def notice(self) -> str | None:
        return " ".join(self.notices) or None


@dataclass
class Turn:
    """One question and its answer, from the checks to the rows written."""

    request: TurnRequest
    retrieval: Retrieval = field(default_factory=Retrieval)
    answer: AnswerDraft = field(default_factory=AnswerDraft)
    # The writes of the question's rows, and of the outcome: each started once.
    record_task: asyncio.Future | None = None
    finish_task: asyncio.Future | None = None
