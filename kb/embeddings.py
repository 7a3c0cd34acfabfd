"""Embedding spaces: registering models, the embedding cache, per-model HNSW indexes,
and zero-downtime re-embedding with an atomic cutover."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from django.db import connection, transaction
from django.db.backends.utils import CursorWrapper
from django.db.models import Exists, F, OuterRef
from django.utils import timezone

from kb.ingestion.chunking import embedding_input
from kb.models import Chunk, ChunkEmbedding, Document, EmbeddingModel, UsageRecord
from kb.ops.database import index_build_settings
from kb.ops.tracing import span
from kb.ops.worker_threads import WorkerThreads
from kb.providers import registry
from kb.providers.base import EmbeddingBackend, EmbeddingResult, ProviderError
from kb.usage.ledger import tracked_model_call

logger = logging.getLogger(__name__)

# How many chunks a re-embedding pass loads, embeds and writes at a time.
REEMBED_PAGE_SIZE = 256


# Where a query is embedded while the request's own thread does database work.
_alongside_threads = WorkerThreads(max_workers=4, name="query-embedding")


class EmbeddingModelError(Exception):
    """An embedding-model operation was refused; the message says why."""


def embedding_model_register(*, key: str) -> EmbeddingModel:
    """The EmbeddingModel row for a configured key, created (status building) if new."""
    existing = EmbeddingModel.objects.filter(key=key).first()
    if existing is not None:
        return existing
    entry = registry.embedding_entry(key)
    backend = registry.embedding_backend(key)
    model, _ = EmbeddingModel.objects.get_or_create(
        key=key,
        defaults={
            "backend": entry["BACKEND"],
            "model_name": entry.get("MODEL", ""),
            "dimensions": backend.dimensions,
        },
    )
    return model


def embedding_model_active_or_bootstrap() -> EmbeddingModel:
    """The active model; on a new install, the default model becomes active at once."""
    from django.conf import settings

    active = EmbeddingModel.objects.filter(is_active=True).first()
    if active is not None:
        return active
    model = embedding_model_register(key=settings.KB_DEFAULT_EMBEDDING_MODEL)
    with transaction.atomic():
        locked = EmbeddingModel.objects.select_for_update().get(pk=model.pk)
        if not EmbeddingModel.objects.filter(is_active=True).exists():
            locked.is_active = True
            locked.status = EmbeddingModel.Status.ACTIVE
            locked.activated_at = timezone.now()
            locked.save(update_fields=["is_active", "status", "activated_at"])
    embedding_model_index_create(model=locked)
    return EmbeddingModel.objects.get(is_active=True)


def embedding_models_written_on_ingest() -> list[EmbeddingModel]:
    """Models every newly ingested chunk must be embedded with: the active one, and any
    being built, so a re-embedding stays complete while documents keep arriving."""
    active = embedding_model_active_or_bootstrap()
    building = list(EmbeddingModel.objects.filter(status=EmbeddingModel.Status.BUILDING))
    return [active, *[m for m in building if m.pk != active.pk]]


def backend_for(model: EmbeddingModel) -> EmbeddingBackend:
    """The provider backend that produces this model's vectors."""
    return registry.embedding_backend(model.key)


# The vector type each model's HNSW index holds, by (database, model id): asked once.
_index_types: dict[tuple, str] = {}


def server_has_halfvec() -> bool:
    """Whether the server's pgvector has halfvec (0.7 and later)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT string_to_array(extversion, '.')::int[] >= '{0,7}' "
                       "FROM pg_extension WHERE extname = 'vector'")
        row = cursor.fetchone()
    return bool(row and row[0])


def hnsw_vector_type(*, model_id: int) -> str:
    """"halfvec" or "vector": what the model's HNSW index holds, so that a query casts to
    the same type and the planner can use it. An index made before halfvec (a directory
    moved across before its migration ran, or an older pgvector) stays "vector"."""
    key = (connection.settings_dict["NAME"], connection.settings_dict.get("HOST"), model_id)
    if key not in _index_types:
        with connection.cursor() as cursor:
            cursor.execute("SELECT indexdef FROM pg_indexes WHERE indexname = %s",
                           [f"kb_chunkembedding_hnsw_{int(model_id)}"])
            row = cursor.fetchone()
        if row is None:  # not built yet: the type it will be built with
            return "halfvec" if server_has_halfvec() else "vector"
        _index_types[key] = "halfvec" if "halfvec_cosine_ops" in row[0] else "vector"
    return _index_types[key]


def embedding_model_index_create(*, model: EmbeddingModel) -> None:
    """Create the model's own HNSW index: a partial index over `embedding::halfvec(d)`.

    The column is dimensionless so models of any size share the table; the cast gives
    HNSW its fixed dimension and the WHERE clause keeps each model's graph separate.
    Queries must repeat the same expression and predicate (search.vector does, with
    hnsw_vector_type). The graph holds half-precision vectors where pgvector has them
    (0.7+): 57% of the size, with recall@10 and nDCG@10 within 0.001 of full precision on
    scifact and nfcorpus (benchmarks/halfvec.py).
    """
    dimensions = int(model.dimensions)
    vector_type = "halfvec" if server_has_halfvec() else "vector"
    concurrently = "" if connection.in_atomic_block else "CONCURRENTLY"
    with (connection.cursor() as cursor, index_build_settings(cursor),
          _index_build_lock(cursor, model.hnsw_index_name)):
        if connection.in_atomic_block:
            # Inside a transaction (tests, or a caller's atomic block) the index is built
            # plainly, and deferred foreign-key checks must run first or Postgres refuses.
            cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
        # A concurrent build that failed (cancelled, out of memory, the server stopped)
        # leaves its index behind, invalid: never used by queries, and in the way of
        # IF NOT EXISTS. Drop it and build again.
        cursor.execute("SELECT NOT i.indisvalid FROM pg_index i "
                       "WHERE i.indexrelid = to_regclass(%s)", [model.hnsw_index_name])
        row = cursor.fetchone()
        if row and row[0]:
            logger.warning("Dropping the invalid index %s left by a failed build.",
                           model.hnsw_index_name)
            cursor.execute(f"DROP INDEX {concurrently} {model.hnsw_index_name}")
        cursor.execute(
            f"CREATE INDEX {concurrently} IF NOT EXISTS {model.hnsw_index_name} "
            "ON kb_chunkembedding USING hnsw "
            f"((embedding::{vector_type}({dimensions})) {vector_type}_cosine_ops) "
            f"WITH (m = 16, ef_construction = 64) "
            f"WHERE embedding_model_id = {int(model.pk)}"
        )
    _index_types.clear()


# How often a second builder of the same index asks whether the first one is done.
INDEX_BUILD_LOCK_POLL_SECONDS = 0.25


@contextmanager
def _index_build_lock(cursor: CursorWrapper, index_name: str) -> Iterator[None]:
    """One builder of an index at a time, across processes.

    Two workers ingesting the first documents of a new install both bootstrap the model
    and build its index: two CREATE INDEX CONCURRENTLY of one name deadlock, and the
    second would take the first's index, invalid while it is being built, for a failed
    build and drop it. A session advisory lock orders them, and the second then finds the
    index built. It is polled with pg_try_advisory_lock, never waited on in a statement:
    a concurrent build waits for every open snapshot, a waiting statement's included.
    """
    while True:
        cursor.execute("SELECT pg_try_advisory_lock(hashtext(%s))", [index_name])
        if cursor.fetchone()[0]:
            break
        time.sleep(INDEX_BUILD_LOCK_POLL_SECONDS)
    try:
        yield
    finally:
        cursor.execute("SELECT pg_advisory_unlock(hashtext(%s))", [index_name])


def embedding_model_index_drop(*, model: EmbeddingModel) -> None:
    """Drop the model's HNSW index."""
    with connection.cursor() as cursor:
        cursor.execute(f"DROP INDEX IF EXISTS {model.hnsw_index_name}")
    _index_types.clear()


def cached_vectors(*, model: EmbeddingModel, input_hashes: Sequence[str]) -> dict[str, list[float]]:
    """Vectors already computed by this model for any of these embedding inputs.

    The cache is the vectors we already store: an identical passage anywhere in the base
    (or in an earlier generation of the same document) is copied, never re-embedded.
    """
    if not input_hashes:
        return {}
    rows = (
        ChunkEmbedding.objects.filter(
            embedding_model=model, chunk__embedding_input_hash__in=set(input_hashes)
        )
        .order_by("chunk__embedding_input_hash")
        .distinct("chunk__embedding_input_hash")
        .values_list("chunk__embedding_input_hash", "embedding")
    )
    return {input_hash: vector for input_hash, vector in rows}


def embed_texts(
    *,
    model: EmbeddingModel,
    texts: Sequence[str],
    document: Document | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[list[float]]:
    """Embed texts in the backend's batch size, writing one UsageRecord per batch."""
    backend = backend_for(model)
    vectors: list[list[float]] = []
    for start in range(0, len(texts), backend.batch_size):
        batch = texts[start : start + backend.batch_size]
        with span("embed", provider=backend.provider_name, model=model.model_name or model.key,
                  texts=len(batch)), tracked_model_call(
            kind=UsageRecord.Kind.EMBEDDING,
            provider=backend.provider_name,
            model=model.model_name or model.key,
            document=document,
            write_ahead=backend.remote,
        ) as call:
            result = backend.embed_batch(batch)
            call.input_tokens = result.input_tokens
        vectors.extend(result.vectors)
        if on_batch is not None:
            on_batch(len(batch))
    return vectors


def embed_query(*, model: EmbeddingModel, text: str, **record_fields) -> list[float]:
    """Embed one search query, recorded in the usage ledger."""
    backend = backend_for(model)
    with (
        _query_embedding_span(backend, model),
        _query_embedding_call(backend, model, record_fields) as call,
    ):
        result = backend.embed_query(text)
        call.input_tokens = result.input_tokens
    return result.vectors[0]


def _query_embedding_span(backend: EmbeddingBackend, model: EmbeddingModel, **options):
    return span("embed", provider=backend.provider_name, model=model.model_name or model.key,
                texts=1, query=True, **options)


def _query_embedding_call(backend: EmbeddingBackend, model: EmbeddingModel, record_fields: dict):
    return tracked_model_call(kind=UsageRecord.Kind.EMBEDDING, provider=backend.provider_name,
                              model=model.model_name or model.key, write_ahead=backend.remote,
                              **record_fields)


@dataclass(frozen=True)
class EmbeddedAlongside[T]:
    """A query's vector (None if the model failed: `error` says why) and what `work` returned."""

    vector: list[float] | None
    error: ProviderError | None
    outcome: T
    # The model's own time, from submission to result.
    latency_ms: float = 0.0


def embed_query_alongside[T](work: Callable[[], T], *, model: EmbeddingModel, text: str,
                          **record_fields) -> EmbeddedAlongside[T]:
    """embed_query, with a local model computing while `work` runs on this thread.

    Search runs its keyword half this way, so a request costs the slower of the two
    rather than their sum. The ledger row is the one embed_query writes, with the
    model's own latency. A remote backend is called first, then `work`: its calls are
    written ahead and retried, which the ledger does on the calling thread.
    """
    backend = backend_for(model)
    vector = error = None
    latency_ms = 0.0
    if backend.remote:
        started = time.perf_counter()
        try:
            vector = embed_query(model=model, text=text, **record_fields)
        except ProviderError as exc:
            error = exc
        latency_ms = (time.perf_counter() - started) * 1000
        return EmbeddedAlongside(vector=vector, error=error, outcome=work(), latency_ms=latency_ms)
    submitted = time.perf_counter()
    # Not the current span: `work` opens its own, beside this one rather than inside it.
    with _query_embedding_span(backend, model, current=False):
        pending = _alongside_threads.submit(_embed_query_timed, backend, text)
        try:
            outcome = work()
        finally:
            # The forward pass happened either way, so it is recorded even if `work` failed.
            try:
                with _query_embedding_call(backend, model, record_fields) as call:
                    result, finished = pending.result()
                    latency_ms = call.latency_ms = (finished - submitted) * 1000
                    call.input_tokens = result.input_tokens
                vector = result.vectors[0]
            except ProviderError as exc:
                error = exc
    return EmbeddedAlongside(vector=vector, error=error, outcome=outcome, latency_ms=latency_ms)


def _embed_query_timed(backend: EmbeddingBackend, text: str) -> tuple[EmbeddingResult, float]:
    return backend.embed_query(text), time.perf_counter()


def chunks_missing_embedding(*, model: EmbeddingModel):
    """Chunks of each document's current generation that have no vector in this model yet."""
    return Chunk.objects.filter(generation=F("document__chunk_generation")).exclude(
        Exists(ChunkEmbedding.objects.filter(chunk=OuterRef("pk"), embedding_model=model))
    )


def reembed_start(*, key: str) -> EmbeddingModel:
    """Register the model for key and mark it building; the caller queues reembed_run."""
    reason = registry.embedding_unavailable_reason(key)
    if reason:
        raise EmbeddingModelError(f"{key} cannot be used: {reason}.")
    model = embedding_model_register(key=key)
    if model.is_active:
        raise EmbeddingModelError(f"{key} is already the active embedding model.")
    model.status = EmbeddingModel.Status.BUILDING
    model.error_message = ""
    model.chunks_total, model.chunks_embedded = _reembed_progress(model=model)
    model.save(update_fields=["status", "error_message", "chunks_total", "chunks_embedded"])
    return model


def _reembed_progress(*, model: EmbeddingModel) -> tuple[int, int]:
    total = Chunk.objects.filter(generation=F("document__chunk_generation")).count()
    return total, total - chunks_missing_embedding(model=model).count()


def reembed_run(*, model_id: int, activate: bool = False) -> EmbeddingModel:
    """Embed every chunk with the model, page by page; resumable and cancellable.

    Search keeps using the active model throughout. A cancelled model stops at the next
    page. When complete, the model's HNSW index is built, then it is marked ready, and
    activated if asked.
    """
    model = EmbeddingModel.objects.get(pk=model_id)
    try:
        while True:
            model.refresh_from_db(fields=["status"])
            if model.status != EmbeddingModel.Status.BUILDING:
                logger.info("Re-embedding with %s stopped: status is %s", model.key, model.status)
                return model
            page = list(
                chunks_missing_embedding(model=model)
                .select_related("document")
                .order_by("pk")[:REEMBED_PAGE_SIZE]
            )
            if not page:
                break
            _embed_chunks(model=model, chunks=page)
            total, done = _reembed_progress(model=model)
            EmbeddingModel.objects.filter(pk=model.pk).update(
                chunks_total=total, chunks_embedded=done
            )
        embedding_model_index_create(model=model)
        EmbeddingModel.objects.filter(pk=model.pk, status=EmbeddingModel.Status.BUILDING).update(
            status=EmbeddingModel.Status.READY
        )
    except Exception as exc:
        EmbeddingModel.objects.filter(pk=model.pk).update(
            error_message=f"{exc.__class__.__name__}: {exc}"[:2000]
        )
        raise
    model.refresh_from_db()
    if activate and model.status == EmbeddingModel.Status.READY:
        try:
            model = embedding_model_activate(model=model)
        except QualityGateRefused as exc:
            # Complete but not switched to: the verdict is on the model, for an editor to
            # read and, with a reason, override.
            logger.warning("Re-embedding with %s done, not activated: %s", model.key, exc)
            EmbeddingModel.objects.filter(pk=model.pk).update(error_message=str(exc)[:2000])
            model.refresh_from_db()
    return model


def _embed_chunks(*, model: EmbeddingModel, chunks: Sequence[Chunk]) -> None:
    cached = cached_vectors(model=model, input_hashes=[c.embedding_input_hash for c in chunks])
    ChunkEmbedding.objects.bulk_create(
        [ChunkEmbedding(chunk=c, embedding_model=model, embedding=cached[c.embedding_input_hash])
         for c in chunks if c.embedding_input_hash in cached],
        ignore_conflicts=True,  # a chunk embedded meanwhile by ingestion keeps its vector
    )
    missing = [c for c in chunks if c.embedding_input_hash not in cached]
    batch_size = backend_for(model).batch_size
    # Vectors are committed batch by batch, so a failure loses at most one batch of work.
    for start in range(0, len(missing), batch_size):
        batch = missing[start : start + batch_size]
        vectors = embed_texts(model=model, texts=[
            embedding_input(title=c.document.title, heading_path=c.heading_path, text=c.text)
            for c in batch
        ])
        ChunkEmbedding.objects.bulk_create(
            [ChunkEmbedding(chunk=c, embedding_model=model, embedding=v)
             for c, v in zip(batch, vectors, strict=True)],
            ignore_conflicts=True,
        )


class QualityGateRefused(EmbeddingModelError):
    """The candidate model searches worse than the active one (search.quality_gate)."""


# The gate an activation must pass: search registers it at startup (search.quality_gate),
# since kb imports nothing from search. (candidate, current, override_reason) -> verdict
# dict with "passed" and "summary"; it keeps the verdict itself.
ActivationGate = Callable[..., dict]
_activation_gate: ActivationGate | None = None


def activation_gate_set(gate: ActivationGate | None) -> None:
    """Register the quality gate embedding_model_activate runs (search does, at startup)."""
    global _activation_gate
    _activation_gate = gate


def embedding_model_activate(*, model: EmbeddingModel, override_reason: str = "",
                             gate: bool = True) -> EmbeddingModel:
    """Make a complete model the one search uses, in one transaction.

    Refused unless every chunk has a vector in it, and, when another model is active,
    unless the quality gate finds the new one searches as well (QualityGateRefused); an
    override reason switches anyway, and is kept with the verdict and logged. The previous
    model keeps its vectors and index (status ready) until they are dropped explicitly.
    """
    current = EmbeddingModel.objects.filter(is_active=True).exclude(pk=model.pk).first()
    if gate and _activation_gate is not None and current is not None:
        reason = override_reason.strip()
        verdict = _activation_gate(candidate=model, current=current, override_reason=reason)
        if not verdict["passed"]:
            if not reason:
                raise QualityGateRefused(
                    f"{verdict['summary']} Not activated; give a reason to override the gate.")
            logger.warning("Quality gate overridden for %s: %s", model.key, reason)
    with transaction.atomic():
        locked = EmbeddingModel.objects.select_for_update().get(pk=model.pk)
        if locked.status not in {EmbeddingModel.Status.READY, EmbeddingModel.Status.ACTIVE}:
            raise EmbeddingModelError(
                f"{locked.key} is {locked.get_status_display().lower()}; only a complete model "
                "can be activated."
            )
        missing = chunks_missing_embedding(model=locked).count()
        if missing:
            raise EmbeddingModelError(f"{locked.key} still lacks vectors for {missing} chunks.")
        EmbeddingModel.objects.filter(is_active=True).exclude(pk=locked.pk).update(
            is_active=False, status=EmbeddingModel.Status.READY
        )
        locked.is_active = True
        locked.status = EmbeddingModel.Status.ACTIVE
        locked.activated_at = timezone.now()
        locked.save(update_fields=["is_active", "status", "activated_at"])
    return locked


def reembed_cancel(*, model: EmbeddingModel) -> None:
    """Stop a re-embedding at its next page; vectors written so far stay until dropped."""
    EmbeddingModel.objects.filter(pk=model.pk, status=EmbeddingModel.Status.BUILDING).update(
        status=EmbeddingModel.Status.CANCELLED
    )


def embedding_model_drop_vectors(*, model: EmbeddingModel) -> int:
    """Delete an inactive model's vectors and index; returns how many vectors went."""
    if model.is_active:
        raise EmbeddingModelError(
            "The active model's vectors serve search; activate another first."
        )
    embedding_model_index_drop(model=model)
    deleted, _ = ChunkEmbedding.objects.filter(embedding_model=model).delete()
    EmbeddingModel.objects.filter(pk=model.pk).update(
        status=EmbeddingModel.Status.RETIRED, chunks_embedded=0
    )
    return deleted
