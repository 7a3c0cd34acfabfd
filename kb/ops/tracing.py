"""Optional OpenTelemetry tracing: `with span("embed", model=...)` around the costly steps.

Off unless the environment asks for it (settings.KB_TRACING): set
OTEL_EXPORTER_OTLP_ENDPOINT to export over OTLP/HTTP (the exporter then reads the
standard OTEL_EXPORTER_OTLP_* variables, e.g. headers, itself), or KB_TRACING=console to
print spans. When off, `span()` is one flag check returning a shared no-op context
manager, and the SDK is never imported. When on, the SDK is set up on the first span in
each process (so forked qcluster workers build their own exporter thread).

The spans of a search (search.services) and a chat answer:

    http.request            RequestIdMiddleware; ends when the response object is returned,
                            so a streamed answer's spans start their own trace
      search
        embed               the query embedding (skipped on a query-vector cache hit)
        retrieve.bm25       beside `embed`: runs while a local model embeds the query
        retrieve.vector
        fuse
        rerank
      llm                   chat.services, one per backend attempt

When the query's vector is already known (cached, or given by chat), BM25 and vector
retrieval run as one SQL statement (search.retrieval: both CTEs and the join that pairs
their ranks), so they cannot be timed apart from Python; the span is then named for what
it covers, `retrieve.bm25+vector`. Retrieval spans carry `mode`, `limit` and `candidates`
attributes. EXPLAIN ANALYZE in docs/DEPLOY.md shows how to see the split inside the
database.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from django.conf import settings

F = TypeVar("F", bound=Callable[..., Any])

_NOOP = contextlib.nullcontext()
_lock = threading.Lock()
# None until resolved from settings; then False (off) or an opentelemetry Tracer.
_tracer: Any = None
_provider: Any = None


def span(name: str, /, *, current: bool = True, **attributes: Any):
    """A context manager timing `name` as a span; a shared no-op when tracing is off.

    `current=False` records the span without making it the parent of spans opened inside
    it. Use that around a `yield` in a generator (a streamed LLM answer): the generator may
    be resumed in another context, where re-attaching would fail.
    """
    tracer = _tracer if _tracer is not None else _tracer_resolve()
    if tracer is False:
        return _NOOP
    return _live_span(tracer, name, current, attributes)


def traced(name: str) -> Callable[[F], F]:
    """Decorate a function so each call is a span called `name`."""

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            with span(name):
                return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def tracing_enabled() -> bool:
    """Whether spans are being recorded in this process."""
    tracer = _tracer if _tracer is not None else _tracer_resolve()
    return tracer is not False


def tracing_configure(*, exporter: Any, simple: bool = False) -> Any:
    """Record spans to `exporter` from now on; returns the TracerProvider.

    simple=True exports each span as it ends (tests, console); otherwise spans are
    batched by a background thread, which is what a real collector wants.
    """
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    global _provider, _tracer
    resource = Resource.create({"service.name": settings.OTEL_SERVICE_NAME})
    provider = TracerProvider(resource=resource)
    processor = SimpleSpanProcessor(exporter) if simple else BatchSpanProcessor(exporter)
    provider.add_span_processor(processor)
    with _lock:
        _provider = provider
        _tracer = provider.get_tracer("kb")
    return provider


def tracing_flush(timeout_millis: int = 5000) -> bool:
    """Export the spans still batched in this process (before a short-lived process exits)."""
    provider = _provider
    return True if provider is None else provider.force_flush(timeout_millis)


def tracing_disable() -> None:
    """Stop recording spans (tests switch tracing on and off around a case)."""
    global _provider, _tracer
    with _lock:
        _provider = None
        _tracer = False


def tracing_reset() -> None:
    """Forget the setup, so the next span reads settings.KB_TRACING again (tests)."""
    global _provider, _tracer
    with _lock:
        _provider = None
        _tracer = None


def _tracer_resolve() -> Any:
    global _tracer
    with _lock:
        if _tracer is not None:
            return _tracer
        mode = settings.KB_TRACING
        if not mode:
            _tracer = False
            return _tracer
    if mode == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        # sys.stdout as it is now: the exporter's default is bound when it is imported.
        tracing_configure(exporter=ConsoleSpanExporter(out=sys.stdout), simple=True)
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        # No endpoint argument: the exporter reads OTEL_EXPORTER_OTLP_ENDPOINT (appending
        # /v1/traces) and the other standard variables itself.
        tracing_configure(exporter=OTLPSpanExporter())
    return _tracer


@contextlib.contextmanager
def _live_span(tracer: Any, name: str, current: bool, attributes: dict) -> Iterator[Any]:
    clean = {key: _attribute(value) for key, value in attributes.items() if value is not None}
    if current:
        with tracer.start_as_current_span(name, attributes=clean) as live:
            yield live
        return
    live = tracer.start_span(name, attributes=clean)
    try:
        yield live
    except BaseException as exc:
        from opentelemetry.trace import Status, StatusCode

        live.record_exception(exc)
        live.set_status(Status(StatusCode.ERROR, str(exc)))
        raise
    finally:
        live.end()


def _attribute(value: Any) -> Any:
    # OpenTelemetry takes str, bool, int, float and sequences of them; anything else
    # (a UUID, a Decimal, a model) is recorded as its text.
    if isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, list | tuple):
        return [v if isinstance(v, str | bool | int | float) else str(v) for v in value]
    return str(value)
