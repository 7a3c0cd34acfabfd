"""OpenTelemetry spans: off by default at no cost, and the search pipeline's spans when on."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from kb.ops import tracing
from kb.providers.base import RerankBackend, RerankResult
from search.services import SearchParams, search


class WordOverlapReranker(RerankBackend):
    """A deterministic reranker for the test: the share of query words in the passage."""

    provider_name = "test"

    def rerank(self, query: str, documents: Sequence[str]) -> RerankResult:
        words = set(query.lower().split())
        return RerankResult(scores=[len(words & set(d.lower().split())) / len(words)
                                    for d in documents],
                            input_tokens=len(documents))


@pytest.fixture
def spans():
    """Record spans in memory for one test, then switch tracing off again."""
    exporter = InMemorySpanExporter()
    tracing.tracing_configure(exporter=exporter, simple=True)
    yield exporter
    tracing.tracing_disable()


def test_span_is_a_shared_no_op_when_tracing_is_off(settings):
    """With tracing off, span() hands back one shared null context: nothing is allocated."""
    tracing.tracing_disable()
    assert tracing.span("embed", model="m") is tracing.span("fuse")
    with tracing.span("embed") as live:
        assert live is None
    assert not tracing.tracing_enabled()


def test_search_emits_embed_retrieve_fuse_and_rerank_spans(spans, collection, ingest_one, settings,
                                                           django_user_model):
    """A hybrid, reranked search is one `search` span with its stages as children."""
    settings.KB_PROVIDERS = {**settings.KB_PROVIDERS,
                             "reranker": {"BACKEND": "tests.ops.test_tracing.WordOverlapReranker"}}
    ingest_one(collection, "tides.md", "# Tides\n\nSpring tides follow the full moon.\n\n"
                                       "## Harbour\n\nThe harbour opens at dawn.")
    spans.clear()  # ingestion's own embed spans

    reader = django_user_model.objects.create_user("reader", password="pw")
    result = search(params=SearchParams(query="when are spring tides", rerank=True), user=reader)

    assert result.hits and result.reranked
    finished = {span.name: span for span in spans.get_finished_spans()}
    # The query is embedded while the BM25 statement runs, so the two retrievals are apart.
    assert set(finished) == {
        "search", "embed", "retrieve.bm25", "retrieve.vector", "fuse", "rerank",
    }
    root = finished["search"]
    for name in ("embed", "retrieve.bm25", "retrieve.vector", "fuse", "rerank"):
        assert finished[name].parent.span_id == root.context.span_id
        assert finished[name].context.trace_id == root.context.trace_id
    assert finished["retrieve.bm25"].start_time < finished["embed"].end_time
    assert finished["retrieve.vector"].attributes["candidates"] >= 1
    assert finished["retrieve.bm25"].attributes["bm25_engine"] in {"kb_bm25", "sql"}
    assert finished["embed"].attributes["query"] is True
    assert finished["rerank"].attributes["provider"] == "test"

    spans.clear()
    search(params=SearchParams(query="when are spring tides"), user=reader)
    finished = {span.name: span for span in spans.get_finished_spans()}
    # A vector already known (here from the query-vector cache): one statement for both.
    assert set(finished) == {"search", "retrieve.bm25+vector", "fuse"}
    assert finished["retrieve.bm25+vector"].attributes["mode"] == "hybrid"


def test_ingestion_embeds_in_spans(spans, collection, ingest_one):
    """Document embedding batches are `embed` spans too (in the worker, in production)."""
    ingest_one(collection, "a.md", "# A\n\nSome text to embed.")
    embed = [s for s in spans.get_finished_spans() if s.name == "embed"]
    assert embed and embed[0].attributes["texts"] >= 1


def test_http_request_span_and_llm_span_outside_current_context(spans, client):
    """Requests get an http.request span with the request id; current=False spans end cleanly."""
    response = client.get("/healthz", HTTP_X_REQUEST_ID="req-trace-1")
    with tracing.span("llm", current=False, provider="p", model="m", tokens=None) as llm:
        llm.set_attribute("output_tokens", 3)
    with pytest.raises(RuntimeError), tracing.span("llm", current=False):
        raise RuntimeError("provider down")

    finished = spans.get_finished_spans()
    (http,) = [s for s in finished if s.name == "http.request"]
    assert http.attributes["request_id"] == response["X-Request-ID"] == "req-trace-1"
    ok, failed = [s for s in finished if s.name == "llm"]
    assert ok.attributes["output_tokens"] == 3 and "tokens" not in ok.attributes
    assert not failed.status.is_ok and failed.events[0].name == "exception"


class _Collector(BaseHTTPRequestHandler):
    """A fake OpenTelemetry collector: keeps each OTLP/HTTP export request it receives."""

    received: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, self.headers["Content-Type"], body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def collector():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    _Collector.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Collector.received
    server.shutdown()
    server.server_close()


def test_otlp_endpoint_switches_tracing_on_and_exports(settings, monkeypatch, collector):
    """With OTEL_EXPORTER_OTLP_ENDPOINT set, spans are exported over OTLP/HTTP to
    <endpoint>/v1/traces."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    endpoint, received = collector
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    settings.KB_TRACING = "otlp"
    tracing.tracing_reset()
    try:
        with tracing.span("fuse", fusion="rrf"):
            pass
        assert tracing.tracing_flush()
    finally:
        tracing.tracing_disable()

    ((path, content_type, body),) = received
    request = ExportTraceServiceRequest.FromString(body)
    (span,) = request.resource_spans[0].scope_spans[0].spans
    assert (path, content_type) == ("/v1/traces", "application/x-protobuf")
    assert span.name == "fuse" and span.attributes[0].value.string_value == "rrf"
    service = {a.key: a.value.string_value for a in request.resource_spans[0].resource.attributes}
    assert service["service.name"] == "kb"


def test_console_tracing_prints_spans(settings, capsys):
    """KB_TRACING=console prints each span as it ends."""
    settings.KB_TRACING = "console"
    tracing.tracing_reset()
    try:
        with tracing.span("embed", model="m"):
            pass
    finally:
        tracing.tracing_disable()
    assert '"name": "embed"' in capsys.readouterr().out


def test_tracing_off_by_default(settings):
    """Without KB_TRACING or an OTLP endpoint, the first span resolves tracing to off."""
    settings.KB_TRACING = ""
    tracing.tracing_reset()
    assert tracing.span("embed") is tracing.span("fuse") and not tracing.tracing_enabled()
