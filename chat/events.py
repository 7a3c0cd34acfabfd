"""The events of one answer, as chat.services.answer_stream yields them.

    Started, Meta, Citations, Delta…, Done   (or Error after Started; Heartbeat any time)

The views turn them into SSE (chat.sse), JSON (chat.api) or OpenAI chunks
(chat.openai_compat).
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
