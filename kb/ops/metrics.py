"""Prometheus metrics at /metrics.

Two kinds of metric, kept apart on purpose:

- HTTP request counts and latencies are in-process prometheus_client metrics, updated by
  `PrometheusMiddleware`. Each web process counts its own requests. The embedded setup runs
  one uvicorn process, so one scrape sees everything; with `uvicorn --workers N`, set
  PROMETHEUS_MULTIPROC_DIR (an empty directory, wiped at deploy) and every worker writes
  its values there and any worker's /metrics reports the sum (prometheus_client's
  multiprocess mode; docs/DEPLOY.md).
- Everything about model calls (tokens, cost, errors, cache hits) and the work queue is
  computed at scrape time from the database: UsageRecord is written by every process that
  calls a model (web requests and the qcluster workers that embed documents alike), so the
  ledger is the one place where all of them are visible. In-process counters would miss
  every call made in a worker.

Ledger totals are Prometheus counters: a settled part (rows older than SETTLE_SECONDS,
aggregated once and then only extended) plus a fresh aggregate of the last
SETTLE_SECONDS at each scrape, so a scrape costs an index range scan over recent rows
rather than a pass over the whole ledger. Rows are written with the time they were
created; a row committed more than SETTLE_SECONDS after its created_at (a transaction
held open that long) would be missed by the settled part, which is why the window is an
hour and not seconds.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timedelta
from decimal import Decimal
from functools import lru_cache
from typing import Any

from django.conf import settings
from django.db import DatabaseError
from django.db.models import Count, Min, Q, QuerySet, Sum
from django.db.models.functions import Coalesce, Greatest
from django.http import HttpRequest, HttpResponse, HttpResponseForbidden
from django.utils import timezone
from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kb.models import Document, UsageRecord
from kb.ops.middleware import MiddlewareResult, SyncAndAsyncMiddleware

logger = logging.getLogger(__name__)

# Seconds after which ledger rows are treated as final (see the module docstring).
SETTLE_SECONDS = 3600

# The in-process registry: request metrics, and the process's CPU, memory and GC.
REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

HTTP_REQUESTS = Counter(
    "kb_http_requests",
    "HTTP requests served, by route name, method and status code.",
    ["endpoint", "method", "status"],
    registry=REGISTRY,
)
HTTP_LATENCY = Histogram(
    "kb_http_request_duration_seconds",
    "Seconds until the view returned its response object (for a streamed response: until "
    "streaming could start, not until the stream ended).",
    ["endpoint", "method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _endpoint(request: HttpRequest) -> str:
    # The route's name, never the raw path: paths carry ids, and every distinct label value
    # is a new time series in Prometheus.
    match = getattr(request, "resolver_match", None)
    if match is None:
        return "unmatched"
    return match.view_name or match.route or "unnamed"


def _observe(request: HttpRequest, status: int, started: float) -> None:
    endpoint = _endpoint(request)
    method = request.method if request.method in _METHODS else "OTHER"
    HTTP_REQUESTS.labels(endpoint, method, str(status)).inc()
    HTTP_LATENCY.labels(endpoint, method).observe(time.perf_counter() - started)


class PrometheusMiddleware(SyncAndAsyncMiddleware):
    """Count requests and time them, per route name, method and status; sync and async.

    The time is measured until the response object is returned. For a streaming response
    (chat's server-sent events) that is when the first byte can be sent, not when the
    stream ends: stream length depends on the answer, and time to first token is already
    in the usage ledger.
    """

    def __call__(self, request: HttpRequest) -> MiddlewareResult:
        if self.is_async:
            return self._acall(request)
        started = time.perf_counter()
        try:
            response = self.get_response(request)
        except BaseException:
            _observe(request, 500, started)
            raise
        _observe(request, response.status_code, started)
        return response

    async def _acall(self, request: HttpRequest):
        started = time.perf_counter()
        try:
            response = await self.get_response(request)
        except BaseException:
            _observe(request, 500, started)
            raise
        _observe(request, response.status_code, started)
        return response


# --- Computed at scrape time from the database ----------------------------------------------


class _Totals:
    __slots__ = ("calls", "cost", "input_tokens", "output_tokens", "saved")

    def __init__(self) -> None:
        self.calls = 0
        self.input_tokens = 0
        self.output_tokens = 0
        self.cost = Decimal(0)
        self.saved = Decimal(0)

    def add(self, row: Mapping[str, Any]) -> None:
        self.calls += row["calls"]
        self.input_tokens += row["input_tokens"] or 0
        self.output_tokens += row["output_tokens"] or 0
        self.cost += row["cost"] or 0
        self.saved += row["saved"] or 0


# (kind, provider, model, status, cache_hit)
_LedgerKey = tuple[str, str, str, str, bool]


class UsageLedgerCollector(Collector):
    """Token, cost, error, call and cache counters summed from the UsageRecord ledger."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._settled: dict[_LedgerKey, _Totals] = defaultdict(_Totals)
        self._settled_until: datetime | None = None

    def reset(self) -> None:
        """Forget the settled totals (tests, or after pruning old ledger rows)."""
        with self._lock:
            self._settled = defaultdict(_Totals)
            self._settled_until = None

    def totals(self) -> dict[_LedgerKey, _Totals]:
        """Everything in the ledger, grouped by kind, provider, model, status and cache hit."""
        cutoff = timezone.now() - timedelta(seconds=SETTLE_SECONDS)
        with self._lock:
            if self._settled_until is None:
                self._accumulate(self._settled, UsageRecord.objects.filter(created_at__lt=cutoff))
                self._settled_until = cutoff
            elif cutoff > self._settled_until:
                self._accumulate(self._settled, UsageRecord.objects.filter(
                    created_at__gte=self._settled_until, created_at__lt=cutoff
                ))
                self._settled_until = cutoff
            merged: dict[_LedgerKey, _Totals] = defaultdict(_Totals)
            for key, totals in self._settled.items():
                merged[key].add(_as_row(totals))
        self._accumulate(merged, UsageRecord.objects.filter(created_at__gte=cutoff))
        return merged

    @staticmethod
    def _accumulate(into: dict[_LedgerKey, _Totals], queryset: QuerySet[UsageRecord]) -> None:
        rows = queryset.values("kind", "provider", "model", "status", "cache_hit").annotate(
            calls=Count("pk"),
            input_tokens=Sum("input_tokens"),
            output_tokens=Sum("output_tokens"),
            cost=Sum("cost_usd"),
            saved=Sum("saved_cost_usd"),
        ).order_by()
        for row in rows:
            key = (row["kind"], row["provider"], row["model"], row["status"], row["cache_hit"])
            into[key].add(row)

    def collect(self) -> Iterator[Metric]:
        tokens = CounterMetricFamily(
            "kb_tokens_used",
            "Model tokens, by provider, model, kind and direction (input/output).",
            labels=["provider", "model", "kind", "direction"],
        )
        cost = CounterMetricFamily(
            "kb_cost_usd", "USD spent on model calls, by provider and model.",
            labels=["provider", "model"],
        )
        saved = CounterMetricFamily(
            "kb_cost_saved_usd", "USD that cache hits would have cost, by provider and model.",
            labels=["provider", "model"],
        )
        errors = CounterMetricFamily(
            "kb_model_errors", "Model calls that failed, by provider, model and kind.",
            labels=["provider", "model", "kind"],
        )
        calls = CounterMetricFamily(
            "kb_model_calls",
            "Model calls (cache hits included), by provider, model, kind and status.",
            labels=["provider", "model", "kind", "status"],
        )
        cache = CounterMetricFamily(
            "kb_cache_requests",
            "Cache lookups by cache and result. cache=chat is the answer cache, cache=embedding "
            "the query-vector cache; a miss is a call that went to the model.",
            labels=["cache", "result"],
        )
        by_tokens: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
        by_cost: dict[tuple, list[Decimal]] = defaultdict(lambda: [Decimal(0), Decimal(0)])
        by_errors: dict[tuple, int] = defaultdict(int)
        by_calls: dict[tuple, int] = defaultdict(int)
        by_cache: dict[tuple, int] = defaultdict(int)
        for (kind, provider, model, status, cache_hit), t in self.totals().items():
            if kind == UsageRecord.Kind.SEARCH:
                continue  # a served search, not a model call
            by_tokens[(provider, model, kind)][0] += t.input_tokens
            by_tokens[(provider, model, kind)][1] += t.output_tokens
            by_cost[(provider, model)][0] += t.cost
            by_cost[(provider, model)][1] += t.saved
            by_calls[(provider, model, kind, status)] += t.calls
            if status == UsageRecord.Status.ERROR:
                by_errors[(provider, model, kind)] += t.calls
            if kind in (UsageRecord.Kind.CHAT, UsageRecord.Kind.EMBEDDING):
                by_cache[(kind, "hit" if cache_hit else "miss")] += t.calls
        for (provider, model, kind), (inp, out) in sorted(by_tokens.items()):
            tokens.add_metric([provider, model, kind, "input"], inp)
            tokens.add_metric([provider, model, kind, "output"], out)
        for (provider, model), (spent, spared) in sorted(by_cost.items()):
            cost.add_metric([provider, model], float(spent))
            saved.add_metric([provider, model], float(spared))
        for labels, value in sorted(by_errors.items()):
            errors.add_metric(list(labels), value)
        for labels, value in sorted(by_calls.items()):
            calls.add_metric(list(labels), value)
        for kind in (UsageRecord.Kind.CHAT, UsageRecord.Kind.EMBEDDING):
            for result in ("hit", "miss"):
                cache.add_metric([kind, result], by_cache.get((kind, result), 0))
        yield from (tokens, cost, saved, errors, calls, cache)


def _as_row(totals: _Totals) -> dict:
    return {"calls": totals.calls, "input_tokens": totals.input_tokens,
            "output_tokens": totals.output_tokens, "cost": totals.cost, "saved": totals.saved}


class WorkCollector(Collector):
    """Gauges of the work in flight: the task queue, ingestion lag, documents by status."""

    def collect(self) -> Iterator[Metric]:
        queue = GaugeMetricFamily("kb_queue_depth", "Background tasks queued and not yet finished.")
        queue.add_metric([], queue_depth())
        yield queue

        lag = GaugeMetricFamily(
            "kb_ingestion_lag_seconds",
            "Age of the oldest document waiting for or in ingestion: since it was queued "
            "(pending) or since its processing started (processing); 0 when none.",
        )
        lag.add_metric([], ingestion_lag_seconds())
        yield lag

        documents = GaugeMetricFamily("kb_documents", "Documents by status.", labels=["status"])
        counts = dict(Document.objects.values_list("status").annotate(n=Count("pk")).order_by())
        for status in Document.Status.values:
            documents.add_metric([status], counts.get(status, 0))
        yield documents


def queue_depth() -> int:
    """Tasks in the django-q2 broker: the OrmQ table (queued and in flight) or a Redis list."""
    from django_q.brokers import get_broker
    from django_q.conf import Conf

    broker = get_broker()
    if Conf.ORM:
        from django_q.models import OrmQ

        return OrmQ.objects.using(Conf.ORM).filter(key=broker.list_key).count()
    return int(broker.queue_size() or 0)


def ingestion_lag_seconds() -> float:
    """Seconds since the oldest pending document was queued or processing one started."""
    # Queueing a retry uses update(), which leaves updated_at alone; the end of the failed
    # run (processing_finished_at) is then the later, truer start of the wait. GREATEST
    # ignores NULLs in PostgreSQL.
    since = Document.objects.aggregate(
        processing=Min(Coalesce("processing_started_at", "updated_at"),
                       filter=Q(status=Document.Status.PROCESSING)),
        pending=Min(Greatest("updated_at", "processing_finished_at"),
                    filter=Q(status=Document.Status.PENDING)),
    )
    starts = [value for value in (since["processing"], since["pending"]) if value is not None]
    if not starts:
        return 0.0
    return max(0.0, (timezone.now() - min(starts)).total_seconds())


class _Guarded(Collector):
    """Reports a collector's database failure as kb_metrics_database_up 0, not a 500."""

    def __init__(self, collectors: Iterable[Collector]):
        self.collectors = list(collectors)

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("kb_metrics_database_up", "1 if the database metrics could be read.")
        metrics: list[Metric] = []
        try:
            for collector in self.collectors:
                metrics.extend(collector.collect())
        except DatabaseError:
            logger.exception("Could not read metrics from the database")
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield from metrics
        yield up


usage_ledger_collector = UsageLedgerCollector()
database_collector = _Guarded([usage_ledger_collector, WorkCollector()])


def metrics_registry() -> CollectorRegistry:
    """What a scrape reports: request metrics (this process or all of them) and the database."""
    if settings.PROMETHEUS_MULTIPROC_DIR:
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=settings.PROMETHEUS_MULTIPROC_DIR)
    else:
        registry = CollectorRegistry()
        registry.register(_Forward(REGISTRY))
    registry.register(database_collector)
    return registry


class _Forward(Collector):
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry

    def collect(self) -> Iterable[Metric]:
        return self.registry.collect()


# --- The view -------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _networks(allowed: tuple[str, ...]) -> tuple:
    return tuple(ipaddress.ip_network(entry, strict=False) for entry in allowed)


def metrics_access_allowed(request: HttpRequest) -> bool:
    """A bearer token equal to KB_METRICS_TOKEN, or a client address in KB_METRICS_ALLOWED_IPS.

    The address is REMOTE_ADDR, the direct peer: behind a proxy that is the proxy, so the
    proxy must refuse /metrics from outside (deploy/nginx.conf does).
    """
    token = settings.KB_METRICS_TOKEN
    if token:
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), token.encode()
        ):
            return True
    try:
        address = ipaddress.ip_address(request.META.get("REMOTE_ADDR", ""))
    except ValueError:
        return False
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in _networks(tuple(settings.KB_METRICS_ALLOWED_IPS)))


def metrics_view(request: HttpRequest) -> HttpResponse:
    """The Prometheus exposition, in the format the scraper asks for; 403 unless allowed."""
    if not metrics_access_allowed(request):
        return HttpResponseForbidden(
            "Metrics need a bearer token (KB_METRICS_TOKEN) or an allowed address "
            "(KB_METRICS_ALLOWED_IPS).\n",
            content_type="text/plain",
        )
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return HttpResponse(encoder(metrics_registry()), content_type=content_type)
