"""Request ids and structured logs.

One id follows a piece of work everywhere it goes:

- `RequestIdMiddleware` takes a sane `X-Request-ID` from the client (or the proxy in
  front) or makes one, keeps it in a ContextVar for the duration of the request, and sends
  it back in the response header;
- every log line carries it (`RequestIdFilter`, `JsonFormatter`);
- `kb.usage.ledger.usage_record_create` writes it into the UsageRecord;
- a django-q2 task queued during the request carries it to the worker: a `pre_enqueue`
  receiver puts it into the task package (beside, not inside, the function's kwargs, so
  task functions need no extra parameter) and a `pre_execute` receiver sets it in the
  worker for the task's duration. A task queued outside a request runs under its own
  django-q task id.

kb.queue connects the task receivers when it is imported, which every process does
(the admin's autodiscovery imports kb.admin, whose services import kb.queue). This module itself
must stay importable before the app registry is ready: the LOGGING setting names its
formatter and filter.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from contextvars import ContextVar, Token
from datetime import UTC, datetime

from django.http import HttpRequest, HttpResponseBase, StreamingHttpResponse

from kb.ops import tracing
from kb.ops.log_privacy import redact
from kb.ops.middleware import MiddlewareResult, SyncAndAsyncMiddleware

logger = logging.getLogger("kb.request")

REQUEST_ID_HEADER = "X-Request-ID"
# UsageRecord.request_id holds 64 characters. Anything else a client sends (spaces,
# newlines that would forge log lines, a megabyte of junk) is replaced by our own id.
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/+=-]{0,63}")

_request_id: ContextVar[str] = ContextVar("kb_request_id", default="")

# Probes and scrapes arrive every few seconds; their request lines are logged at DEBUG.
QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def current_request_id() -> str:
    """The id of the request (or task) this code runs for; "" outside any."""
    return _request_id.get()


def request_id_set(request_id: str) -> Token:
    """Make request_id current; pass the token to request_id_reset when done."""
    return _request_id.set(request_id)


def request_id_reset(token: Token) -> None:
    """Restore the request id that was current before request_id_set."""
    # A token from another context (a generator resumed elsewhere) cannot be reset; the
    # context it was set in ends with its request, so there is nothing to undo.
    with contextlib.suppress(ValueError):
        _request_id.reset(token)


def request_id_new() -> str:
    """A fresh request id: 32 hex characters."""
    return uuid.uuid4().hex


def request_id_from_header(value: str | None) -> str:
    """The client's X-Request-ID if it is short and plain, else a fresh id."""
    if value and _SANE_REQUEST_ID.fullmatch(value):
        return value
    return request_id_new()


# --- Middleware -----------------------------------------------------------------------------


class RequestIdMiddleware(SyncAndAsyncMiddleware):
    """Give every request an id (ContextVar + response header) and log one line per request.

    Works for sync and async views. A streaming response's body is produced after this
    middleware has returned, so its iterator is wrapped to run with the request id set:
    usage written in the generator's `finally:` still carries the id.
    """

    def __call__(self, request: HttpRequest) -> MiddlewareResult:
        if self.is_async:
            return self._acall(request)
        request_id, token, started = self._start(request)
        try:
            with _request_span(request, request_id):
                response = self.get_response(request)
            return self._finish(request, response, request_id, started)
        finally:
            request_id_reset(token)

    async def _acall(self, request: HttpRequest):
        request_id, token, started = self._start(request)
        try:
            with _request_span(request, request_id):
                response = await self.get_response(request)
            return self._finish(request, response, request_id, started)
        finally:
            request_id_reset(token)

    def _start(self, request: HttpRequest) -> tuple[str, Token, float]:
        request_id = request_id_from_header(request.headers.get(REQUEST_ID_HEADER))
        request.request_id = request_id  # type: ignore[attr-defined]  # our own attribute
        return request_id, request_id_set(request_id), time.perf_counter()

    def _finish(
        self, request: HttpRequest, response: HttpResponseBase, request_id: str, started: float
    ) -> HttpResponseBase:
        response[REQUEST_ID_HEADER] = request_id
        if isinstance(response, StreamingHttpResponse):
            content = response.streaming_content
            if isinstance(content, AsyncIterator):  # response.is_async
                response.streaming_content = _aiter_with_request_id(content, request_id)
            else:
                response.streaming_content = _iter_with_request_id(content, request_id)
        logger.log(
            logging.DEBUG if request.path in QUIET_PATHS else logging.INFO,
            "%s %s %s", request.method, request.path, response.status_code,
            extra={
                "method": request.method,
                "path": request.path,
                "status": response.status_code,
                # For a streaming response, the time until its first byte could be sent.
                "duration_ms": round((time.perf_counter() - started) * 1000, 3),
                "streaming": response.streaming,
            },
        )
        return response


def _request_span(request: HttpRequest, request_id: str):
    # Logs are redacted by their handler's filter; a span's attributes never pass one.
    return tracing.span(
        "http.request", http_method=request.method, http_target=redact(request.path, []),
        request_id=request_id,
    )


def _iter_with_request_id(content: Iterable[bytes], request_id: str) -> Iterator[bytes]:
    # The id is set around each step and reset after it: the iterator may be advanced from
    # a different thread (a copied context) each time, and a WSGI thread goes on to serve
    # other requests once the stream ends.
    iterator = iter(content)
    try:
        while True:
            token = request_id_set(request_id)
            try:
                chunk = next(iterator)
            except StopIteration:
                return
            finally:
                request_id_reset(token)
            yield chunk
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            token = request_id_set(request_id)
            try:
                close()  # runs the generator's finally: (usage records) with the id set
            finally:
                request_id_reset(token)


async def _aiter_with_request_id(
    content: AsyncIterator[bytes], request_id: str
) -> AsyncIterator[bytes]:
    iterator = aiter(content)
    try:
        while True:
            token = request_id_set(request_id)
            try:
                chunk = await anext(iterator)
            except StopAsyncIteration:
                return
            finally:
                request_id_reset(token)
            yield chunk
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            token = request_id_set(request_id)
            try:
                await aclose()
            finally:
                request_id_reset(token)


# --- django-q2 propagation ----------------------------------------------------------------

_task_tokens: dict[str, Token] = {}


def task_signals_connect() -> None:
    """Carry the request id through django-q2: into the task package, and back out in the
    worker while the task runs. Called by kb.queue at import; idempotent."""
    # Imported here: django_q.signals loads django_q's models, and this module is imported
    # by the LOGGING setting before the app registry is ready.
    from django_q.signals import post_execute_in_worker, pre_enqueue, pre_execute

    pre_enqueue.connect(_task_carry_request_id, dispatch_uid="kb_request_id_enqueue")
    pre_execute.connect(_task_set_request_id, dispatch_uid="kb_request_id_execute")
    post_execute_in_worker.connect(_task_reset_request_id, dispatch_uid="kb_request_id_executed")


def _task_carry_request_id(sender: object, task: dict, **kwargs: object) -> None:
    request_id = current_request_id()
    if request_id:
        task["request_id"] = request_id


def _task_set_request_id(sender: object, func: object, task: dict, **kwargs: object) -> None:
    request_id = task.get("request_id") or str(task.get("id", ""))[:64]
    _task_tokens[str(task.get("id"))] = request_id_set(request_id)


def _task_reset_request_id(sender: object, func: object, task: dict, **kwargs: object) -> None:
    token = _task_tokens.pop(str(task.get("id")), None)
    if token is not None:
        request_id_reset(token)


# --- Logging ------------------------------------------------------------------------------

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRIBUTES = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()
    | {"message", "asctime", "request_id", "taskName"}
)


class RequestIdFilter(logging.Filter):
    """Put the current request id on every record, for formats that show %(request_id)s."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", None):
            record.request_id = current_request_id() or "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, request_id, then any extras."""

    def format(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", None) or current_request_id()
        payload: dict = {
            "ts": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": "" if request_id == "-" else request_id,
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRIBUTES and not key.startswith("_") and key not in payload:
                payload[key] = value
        # exc_text first: a filter (kb.ops.log_privacy) may have redacted it.
        if record.exc_text:
            payload["exc_info"] = record.exc_text
        elif record.exc_info:
            payload["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            payload["stack_info"] = self.formatStack(record.stack_info)
        # default=str: an extra that is not JSON (a datetime, a model) is logged as text
        # rather than losing the whole line.
        return json.dumps(payload, default=str, ensure_ascii=False)
