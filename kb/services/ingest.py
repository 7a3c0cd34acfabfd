"""Ingestion: parse, chunk and embed documents, then swap each new generation in.

A document's chunks are written as a new, unsearchable generation; the swap makes it
searchable and drops the old one in one transaction, so search never sees half a document.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import PurePath

from django.conf import settings
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from kb import embeddings
from kb.ingestion.chunking import ChunkDraft, chunk_document, embedding_input
from kb.ingestion.document import ParseError, ParseLimits
from kb.ingestion.parsing import parse_document
from kb.models import Chunk, ChunkEmbedding, Document, EmbeddingModel
from kb.providers.base import ProviderError
from kb.services.collections import collection_touch

logger = logging.getLogger(__name__)


# Rows per bulk_update statement (each is a CASE over its rows per field).
BULK_UPDATE_BATCH = 100
# Stage changes closer together than this are not written (see _stage_progress).
PROGRESS_MIN_INTERVAL_SECONDS = 1.0


def document_ingest(*, document_id: int) -> Document | None:
    """Parse, chunk, embed and index one document; safe to run again after any failure."""
    documents = documents_ingest_batch(document_ids=[document_id])
    return documents[0] if documents else None


@dataclass
class _ParsedDocument:
    """A document parsed and chunked, not yet written."""

    document: Document
    generation: int
    keep_disabled: bool
    title: str
    mime_type: str
    metadata: dict
    text: str
    drafts: list[ChunkDraft]
    inputs: list[str]
    input_hashes: list[str]


@dataclass
class _PreparedDocument:
    """A document parsed and chunked, its new generation written, waiting for vectors."""

    document: Document
    generation: int
    keep_disabled: bool
    chunks: list[Chunk]
    inputs: list[str]
    # Per embedding model id: indexes into chunks that still need a vector.
    missing: dict[int, list[int]]
    embedded: int = 0
    total: int = 0
    failed: bool = False


def documents_ingest_batch(
    *, document_ids: Sequence[int], on_embedded: Callable[[int], object] | None = None
) -> list[Document]:
    """Ingest several documents, embedding their chunks together in full model batches.

    Small documents would otherwise give the model tiny batches; here the chunks of all
    documents share batches, and the database work is done a batch at a time, which keeps
    the pipeline close to the raw embedder's speed. Each document still succeeds or fails
    on its own:

    1. parse and chunk each document;
    2. write the chunks as new, unsearchable generations, copying any vectors the cache
       already has (including those a killed run committed);
    3. embed the rest in batches, committing vectors as they come;
    4. swap the new generations in for the old ones, in one transaction for the batch.
    """
    try:
        models = embeddings.embedding_models_written_on_ingest()
    except Exception as exc:
        # Before any document's own steps: without this they would stay pending for good.
        logger.exception("Ingestion of documents %s could not start", list(document_ids))
        Document.objects.filter(pk__in=list(document_ids)).update(
            status=Document.Status.FAILED, processing_finished_at=timezone.now(),
            error_message=f"Ingestion could not start: {exc.__class__.__name__}: {exc}. "
                          "Retry it.")
        raise
    parsed = _ingest_parse(document_ids=document_ids, models=models)
    prepared = _ingest_write_generations(parsed, models=models)
    for model in models:
        _ingest_embed(prepared=prepared, model=model, on_embedded=on_embedded)
    _ingest_finalize([item for item in prepared if not item.failed])
    documents = Document.objects.in_bulk([item for item in document_ids])
    return [documents[pk] for pk in document_ids if pk in documents]


def _ingest_guarded[T](item_document: Document, generation: int, work: Callable[[], T]) -> T | None:
    """Run one step for one document; a failure marks only that document failed."""
    try:
        return work()
    except (ParseError, ProviderError) as exc:
        _ingest_failed(document=item_document, generation=generation, reason=str(exc))
    except Exception as exc:
        logger.exception("Ingestion of document %s failed", item_document.pk)
        _ingest_failed(
            document=item_document, generation=generation,
            reason=f"Unexpected error while {item_document.stage}: {exc.__class__.__name__}: {exc}",
        )
    return None


def _ingest_parse(*, document_ids: Sequence[int], models: list) -> list[_ParsedDocument]:
    found = Document.objects.select_related("collection").in_bulk(list(document_ids))
    for document_id in document_ids:
        if document_id not in found:
            logger.info("Document %s was deleted before ingestion.", document_id)
    documents = [found[pk] for pk in dict.fromkeys(document_ids) if pk in found]
    if not documents:
        return []
    now = timezone.now()
    disabled = {
        document.pk for document in documents if document.status == Document.Status.DISABLED
    }
    started = {
        "stage": Document.Stage.PARSING, "processing_started_at": now,
        "processing_finished_at": None, "error_message": "", "chunks_embedded": 0,
        "chunks_total": 0, "heartbeat_at": now,
    }
    # Two statements for the whole batch (a disabled document stays disabled).
    for status, pks in ((Document.Status.DISABLED, disabled),
                        (Document.Status.PROCESSING, {d.pk for d in documents} - disabled)):
        if pks:
            Document.objects.filter(pk__in=pks).update(
                status=status, attempts=F("attempts") + 1, **started
            )
    parsed = []
    for document in documents:
        keep_disabled = document.pk in disabled
        document.status = Document.Status.DISABLED if keep_disabled else Document.Status.PROCESSING
        for name, value in started.items():
            setattr(document, name, value)
        generation = document.chunk_generation + 1
        item = _ingest_guarded(document, generation, partial(
            _parse_and_chunk,
            document=document, generation=generation, keep_disabled=keep_disabled, models=models,
        ))
        if item is not None:
            parsed.append(item)
    return parsed


def _parse_and_chunk(
    *, document: Document, generation: int, keep_disabled: bool, models: list
) -> _ParsedDocument:
    with document.file.open("rb") as handle:
        data = handle.read()
    parsed = parse_document(
        filename=document.original_filename,
        data=data,
        limits=ParseLimits(
            max_file_bytes=settings.KB_MAX_UPLOAD_BYTES,
            parse_timeout_seconds=settings.KB_PARSE_TIMEOUT_SECONDS,
            max_parse_memory_bytes=settings.KB_PARSE_MAX_MEMORY_BYTES,
        ),
    )
    _stage_progress(document, Document.Stage.CHUNKING)
    backend = embeddings.backend_for(models[0])
    drafts = chunk_document(
        parsed=parsed,
        count_tokens=backend.count_tokens,
        max_tokens=settings.KB_CHUNK_MAX_TOKENS,
        overlap_tokens=settings.KB_CHUNK_OVERLAP_TOKENS,
    )
    if not drafts:
        raise ParseError("No text could be extracted from this file.")
    title = (document.metadata.get("title") or parsed.title
             or PurePath(document.original_filename).stem)[:500]
    inputs = [
        embedding_input(title=title, heading_path=d.heading_path, text=d.text) for d in drafts
    ]
    return _ParsedDocument(
        document=document, generation=generation, keep_disabled=keep_disabled, title=title,
        mime_type=parsed.mime_type, metadata={**parsed.metadata, **document.metadata},
        text=parsed.text, drafts=drafts, inputs=inputs,
        input_hashes=[hashlib.sha256(text.encode()).hexdigest() for text in inputs],
    )


def _stage_progress(document: Document, stage: str) -> None:
    """Write a stage change only if the document has been in its stage a while.

    A stage that lasts less than the admin's refresh interval is never seen; skipping its
    write saves a statement per document when a batch holds many small ones.
    """
    now = timezone.now()
    since = document.heartbeat_at
    if since is not None and (now - since).total_seconds() < PROGRESS_MIN_INTERVAL_SECONDS:
        return
    Document.objects.filter(pk=document.pk).update(stage=stage, heartbeat_at=now)
    document.stage, document.heartbeat_at = stage, now


def _ingest_write_generations(
    items: list[_ParsedDocument], *, models: list
) -> list[_PreparedDocument]:
    """Write the batch's new generations in one transaction; one by one if that fails.

    One by one, a document whose rows the database refuses fails alone.
    """
    if not items:
        return []
    try:
        return _write_generations(items, models=models)
    except Exception:
        logger.warning("Writing %d new generations at once failed; writing them one by one.",
                       len(items), exc_info=True)
    prepared = []
    for item in items:
        written = _ingest_guarded(item.document, item.generation,
                                  partial(_write_generations, [item], models=models))
        if written:
            prepared.extend(written)
    return prepared


def _write_generations(items: list[_ParsedDocument], *, models: list) -> list[_PreparedDocument]:
    all_hashes = sorted({h for item in items for h in item.input_hashes})
    # Look the cache up before clearing a killed run's leftovers: they are part of it.
    cached = {m.pk: embeddings.cached_vectors(model=m, input_hashes=all_hashes) for m in models}
    leftovers = Q()
    for item in items:
        leftovers |= Q(document_id=item.document.pk, generation=item.generation)
    prepared = []
    now = timezone.now()
    with transaction.atomic():
        # The collection as it is now, locked: the document may have been moved since it
        # was loaded, and the database refuses a chunk outside its document's collection
        # (search migration 0003).
        collection_ids = dict(
            Document.objects.select_for_update().filter(pk__in=[item.document.pk for item in items])
            .order_by("pk").values_list("pk", "collection_id")
        )
        for item in items:
            item.document.collection_id = collection_ids.get(item.document.pk,
                                                             item.document.collection_id)
        Chunk.objects.filter(leftovers).delete()
        chunks = Chunk.objects.bulk_create(
            [_chunk_new(item, i, draft) for item in items for i, draft in enumerate(item.drafts)]
        )
        for model in models:
            hits = cached[model.pk]
            ChunkEmbedding.objects.bulk_create([
                ChunkEmbedding(
                    chunk=c, embedding_model=model, embedding=hits[c.embedding_input_hash]
                )
                for c in chunks
                if c.embedding_input_hash in hits
            ])
        offset = 0
        for item in items:
            own = chunks[offset : offset + len(item.drafts)]
            offset += len(item.drafts)
            prepared.append(_prepared(item, own, cached=cached, models=models, now=now))
        Document.objects.bulk_update(
            [item.document for item in prepared],
            ["title", "mime_type", "metadata", "extracted_text", "stage", "chunks_total",
             "chunks_embedded", "heartbeat_at"],
            # Each statement is a CASE per field over its rows: keep them short.
            batch_size=BULK_UPDATE_BATCH,
        )
    return prepared


def _chunk_new(item: _ParsedDocument, i: int, draft: ChunkDraft) -> Chunk:
    """The unsaved, unsearchable chunk of the item's new generation for its i-th draft."""
    return Chunk(
        document=item.document,
        collection_id=item.document.collection_id,
        generation=item.generation,
        ordinal=draft.ordinal,
        text=draft.text,
        search_context=" › ".join([item.title, *draft.heading_path]),
        embedding_input_hash=item.input_hashes[i],
        token_count=draft.token_count,
        heading_path=list(draft.heading_path),
        char_start=draft.char_start,
        char_end=draft.char_end,
        page_start=draft.page_start,
        page_end=draft.page_end,
        searchable=False,
    )


def _prepared(
    item: _ParsedDocument, own: list[Chunk], *, cached: dict[int, dict[str, list[float]]],
    models: list[EmbeddingModel], now: datetime,
) -> _PreparedDocument:
    """The item with its written chunks, its document updated in memory (saved in bulk)."""
    missing = {
        m.pk: [i for i, c in enumerate(own) if c.embedding_input_hash not in cached[m.pk]]
        for m in models
    }
    total = len(own) * len(models)
    embedded = total - sum(len(indexes) for indexes in missing.values())
    document = item.document
    document.title, document.mime_type = item.title, item.mime_type
    document.metadata, document.extracted_text = item.metadata, item.text
    document.stage = Document.Stage.EMBEDDING
    document.chunks_total, document.chunks_embedded = total, embedded
    document.heartbeat_at = now
    return _PreparedDocument(
        document=document, generation=item.generation, keep_disabled=item.keep_disabled,
        chunks=own, inputs=item.inputs, missing=missing, embedded=embedded, total=total,
    )


def _ingest_embed(
    *, prepared: list[_PreparedDocument], model: EmbeddingModel,
    on_embedded: Callable[[int], object] | None,
) -> None:
    pending = [(item, i) for item in prepared if not item.failed for i in item.missing[model.pk]]
    batch_size = embeddings.backend_for(model).batch_size
    for start in range(0, len(pending), batch_size):
        batch = [(item, i) for item, i in pending[start : start + batch_size] if not item.failed]
        if not batch:
            continue
        documents = list({id(item): item for item, _ in batch}.values())
        try:
            vectors = embeddings.embed_texts(
                model=model,
                texts=[item.inputs[i] for item, i in batch],
                document=documents[0].document if len(documents) == 1 else None,
            )
        except Exception as exc:
            # The provider failed after its own retries: these documents fail (their
            # committed vectors stay as cache for the retry); the others go on.
            reason = str(exc) if isinstance(exc, ProviderError) else (
                f"Embedding failed: {exc.__class__.__name__}: {exc}")
            if not isinstance(exc, ProviderError):
                logger.exception("Embedding batch failed")
            for item in documents:
                item.failed = True
                _ingest_failed(document=item.document, generation=item.generation, reason=reason)
            continue
        ChunkEmbedding.objects.bulk_create([
            ChunkEmbedding(chunk=item.chunks[i], embedding_model=model, embedding=vector)
            for (item, i), vector in zip(batch, vectors, strict=True)
        ])
        now = timezone.now()
        for item in documents:
            item.embedded += sum(1 for other, _ in batch if other is item)
            item.document.chunks_embedded = item.embedded
            item.document.heartbeat_at = now
        # One statement for the batch's documents: a batch can span dozens of small ones.
        Document.objects.bulk_update([item.document for item in documents],
                                     ["chunks_embedded", "heartbeat_at"])
        if on_embedded is not None:
            on_embedded(len(batch))


def _ingest_finalize(items: list[_PreparedDocument]) -> None:
    """Swap every new generation in, in one transaction for the whole batch.

    Set-based statements rather than a transaction per document: the BM25 statistics
    triggers are statement-level, so they run once for the batch, and there is one commit.
    """
    if not items:
        return
    now = timezone.now()
    Document.objects.filter(pk__in=[item.document.pk for item in items]).update(
        stage=Document.Stage.INDEXING, heartbeat_at=now
    )
    with transaction.atomic():
        current = {
            document.pk: document
            for document in Document.objects.select_for_update().filter(
                pk__in=[item.document.pk for item in items]
            ).order_by("pk")
        }
        # Documents deleted while we worked are gone, and their chunks with them.
        items = [item for item in items if item.document.pk in current]
        if not items:
            return
        disabled = {
            item.document.pk for item in items
            if item.keep_disabled or current[item.document.pk].status == Document.Status.DISABLED
        }
        old_generations = Q()
        new_generations = Q()
        for item in items:
            old_generations |= Q(document_id=item.document.pk) & ~Q(generation=item.generation)
            if item.document.pk not in disabled:
                new_generations |= Q(document_id=item.document.pk, generation=item.generation)
        Chunk.objects.filter(old_generations).delete()
        if new_generations:
            Chunk.objects.filter(new_generations).update(searchable=True)
        for item in items:
            item.document.chunk_generation = item.generation
            item.document.status = (Document.Status.DISABLED if item.document.pk in disabled
                                    else Document.Status.READY)
            item.document.stage = Document.Stage.DONE
            item.document.processing_finished_at = now
            item.document.heartbeat_at = now
        Document.objects.bulk_update(
            [item.document for item in items],
            ["chunk_generation", "status", "stage", "processing_finished_at", "heartbeat_at"],
            batch_size=BULK_UPDATE_BATCH,
        )
        collection_touch(
            collection_ids={current[item.document.pk].collection_id for item in items}, at=now
        )


def _ingest_failed(*, document: Document, generation: int, reason: str) -> None:
    # The failed generation's chunks stay, unsearchable: their committed vectors are the
    # cache a retry starts from, and the retry replaces them. The previous generation, if
    # any, keeps serving search.
    Document.objects.filter(pk=document.pk).update(
        status=Document.Status.FAILED,
        error_message=reason[:4000],
        processing_finished_at=timezone.now(),
        heartbeat_at=timezone.now(),
    )
