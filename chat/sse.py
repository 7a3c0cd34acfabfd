"""Server-sent events: the chat's events in text/event-stream framing, and the response."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing

from django.http import StreamingHttpResponse

from chat.events import ChatEvent, Citations, Delta, Done, Error, Heartbeat, Meta


def sse_event(event: ChatEvent) -> str:
    """One event in text/event-stream framing."""
    if isinstance(event, Heartbeat):
        return ": ping\n\n"
    data: dict[str, object]
    if isinstance(event, Meta):
        name, data = "meta", {"conversation_id": event.conversation_id,
                              "message_id": event.message_id, "mode": event.mode,
                              "notice": event.notice, "answerable": event.answerable}
    elif isinstance(event, Citations):
        name, data = "citations", {"citations": event.citations, "related": event.related}
    elif isinstance(event, Delta):
        name, data = "delta", {"text": event.text}
    elif isinstance(event, Done):
        name, data = "done", {"message_id": event.message_id, "status": event.status,
                              "usage": event.usage, "cited": event.cited,
                              "invalid_citations": event.invalid_citations,
                              "answerable": event.answerable}
    elif isinstance(event, Error):
        name, data = "error", {"code": event.code, "message": event.message}
    else:
        return ""
    # json.dumps escapes newlines, so each event is exactly one data line.
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


async def sse_stream(events: AsyncGenerator[ChatEvent, None]) -> AsyncGenerator[str, None]:
    """The events as SSE text; closing it closes the pipeline's generator."""
    # aclosing: when the client leaves, closing this generator closes the pipeline's,
    # whose finally: blocks close the upstream and persist the partial answer.
    async with aclosing(events):
        async for event in events:
            text = sse_event(event)
            if text:
                yield text


def event_stream_response(content: AsyncIterator[str]) -> StreamingHttpResponse:
    """A text/event-stream response that proxies pass through unbuffered and uncompressed."""
    response = StreamingHttpResponse(content, content_type="text/event-stream; charset=utf-8")
    response["Cache-Control"] = "no-cache"
    # nginx buffers proxied responses unless told not to; a buffered stream arrives at once.
    response["X-Accel-Buffering"] = "no"
    return response
