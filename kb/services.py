"""Writes of the core domain: uploading, ingesting, disabling and deleting documents.

Views, the API, admin actions, commands and tasks call these; none of them holds
business logic of its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import PurePath, PurePosixPath

from django.conf import settings
from django.core.exceptions import PermissionDenied
from django.core.files.base import ContentFile
from django.core.files.uploadedfile import UploadedFile
from django.db import DatabaseError, transaction
from django.db.models import F, Q
from django.utils import timezone

from kb import embeddings, selectors
from kb.authentication import api_key_generate, api_key_hash
from kb.ingestion.archives import ArchiveLimits, extract_archive
from kb.ingestion.chunking import chunk_document, embedding_input
from kb.ingestion.document import ParseError, ParseLimits
from kb.ingestion.parsing import parse_document
from kb.ingestion.sniff import sniff_mime_type
from kb.models import ApiKey, Chunk, ChunkEmbedding, Collection, Document
from kb.providers.base import ProviderError
from kb.selectors import collections_visible

logger = logging.getLogger(__name__)

ZIP_MIME_TYPE = "application/zip"


@dataclass(frozen=True)
class UploadOutcome:
    """What happened to one uploaded file (or one member of an uploaded zip)."""

    filename: str
    outcome: str  # "created" | "updated" | "duplicate" | "rejected"
    document: Document | None = None
    message: str = ""

    @property
    def accepted(self) -> bool:
        return self.outcome in {"created", "updated", "duplicate"}


# Document.original_filename's length: a longer name (a deep path in a zip or a folder) is
# rejected before anything is stored, rather than failing the insert.
NAME_MAX_LENGTH = 255


@dataclass(frozen=True)
class UploadSummary:
    """What an upload came to, counted honestly: accepted files are only queued until a
    worker has processed them, and can still fail then."""

    queued: int
    ready: int
    failed: int
    duplicates: int
    rejected: int
    new_versions: int

    @property
    def files(self) -> int:
        return self.queued + self.ready + self.failed + self.duplicates + self.rejected

    @property
    def text(self) -> str:
        def count(n: int, one: str, many: str) -> str:
            return f"{n} {one if n == 1 else many}"

        parts = [count(self.queued, "file queued for processing", "files queued for processing")]
        if self.ready:
            parts.append(f"{self.ready} already ready")
        if self.failed:
            parts.append(f"{self.failed} failed while processing")
        # Zero counts are left out: "0 rejected" reads as a verdict on files not yet read.
        if self.duplicates:
            parts.append(count(self.duplicates, "duplicate", "duplicates"))
        if self.rejected:
            parts.append(f"{self.rejected} rejected")
        text = ", ".join(parts) + "."
        if self.new_versions == 1:
            text += " 1 is a new version of an existing document."
        elif self.new_versions:
            text += f" {self.new_versions} are new versions of existing documents."
        if self.queued:
            text += (" Queued files are read while they are processed; any that cannot be "
                     "read show as Failed in the document list.")
        return text


def upload_outcomes_refresh(*, outcomes: Sequence[UploadOutcome]) -> list[UploadOutcome]:
    """The outcomes with their documents as they are now (one query), so a file that was
    accepted and then failed, when ingestion ran inline, is reported as failed."""
    ids = [o.document.pk for o in outcomes if o.document is not None and o.accepted]
    current = Document.objects.in_bulk(ids) if ids else {}
    refreshed = []
    for outcome in outcomes:
        document = current.get(outcome.document.pk) if outcome.document is not None else None
        if document is None or not outcome.accepted:
            refreshed.append(outcome)
            continue
        message = outcome.message
        if outcome.outcome != "duplicate" and document.status == Document.Status.FAILED:
            message = f"Accepted, then failed while processing: {document.error_message}"
        elif outcome.outcome != "duplicate" and document.status == Document.Status.READY:
            message = "Processed; ready for search."
        refreshed.append(dataclasses.replace(outcome, document=document, message=message))
    return refreshed


def upload_summary(*, outcomes: Sequence[UploadOutcome]) -> UploadSummary:
    """Counts for the upload summary; pass outcomes through upload_outcomes_refresh first."""
    accepted = [o for o in outcomes if o.outcome in {"created", "updated"}]
    statuses = [o.document.status if o.document else "" for o in accepted]
    ready = sum(1 for status in statuses if status == Document.Status.READY)
    failed = sum(1 for status in statuses if status == Document.Status.FAILED)
    return UploadSummary(
        queued=len(accepted) - ready - failed, ready=ready, failed=failed,
        duplicates=sum(1 for o in outcomes if o.outcome == "duplicate"),
        rejected=sum(1 for o in outcomes if o.outcome == "rejected"),
        new_versions=sum(1 for o in accepted if o.outcome == "updated"),
    )


def filename_sanitize(filename: str) -> str:
    """A display-safe base name: no directories, control characters or absurd length."""
    name = PurePath(filename.replace("\\", "/")).name
    return _name_part_sanitize(name)


def path_sanitize(path: str) -> str:
    """A display-safe relative path: each folder and the file name sanitised as
    filename_sanitize does a top-level name (control and bidi characters dropped)."""
    parts = [part for part in path.replace("\\", "/").split("/") if part not in ("", ".", "..")]
    return "/".join(_name_part_sanitize(part) for part in parts) or "unnamed"


def _name_part_sanitize(name: str) -> str:
    # Category C covers control characters (ESC of "\x1b[31m") and format characters
    # (the bidi overrides U+202E...), which would let a name display as another.
    name = unicodedata.normalize("NFC", name)
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C")
    name = re.sub(r"\s+", " ", name).strip(" .")
    if len(name) > 200:
        stem, dot, suffix = name.rpartition(".")
        name = (stem[: 200 - len(suffix) - 1] + dot + suffix) if dot and len(suffix) < 10 else name[:200]
    return name or "unnamed"


def collection_get_or_create(*, slug: str, name: str | None = None) -> Collection:
    """The collection with this slug, created with default settings if missing."""
    collection, _ = Collection.objects.get_or_create(
        slug=slug, defaults={"name": name or slug.replace("-", " ").title()}
    )
    return collection


def collection_reindex(*, collection: Collection) -> int:
    """Recompute every chunk's lexemes after the collection's text-search config changed.

    Touching `text` fires the trigger that rebuilds search_vector, and the statement
    trigger moves the BM25 statistics over in the same transaction.
    """
    with transaction.atomic():
        count = Chunk.objects.filter(collection=collection).update(text=F("text"))
        Collection.objects.filter(pk=collection.pk).update(updated_at=timezone.now())
    return count


def upload_permission_check(*, user) -> None:
    """Raise PermissionDenied unless the user may add documents (user=None: the system).

    Reading a collection is not writing to it; the admin's upload page, the upload API
    and kb_ingest --user all ask here.
    """
    if user is not None and not user.has_perm("kb.add_document"):
        raise PermissionDenied("Uploading needs the “Can add document” permission.")


def documents_upload_files(
    *, collection: Collection, files: Iterable[UploadedFile], uploaded_by
) -> list[UploadOutcome]:
    """Store uploaded files (admin form or API) and queue them; see documents_upload.

    A file over the size limit is recorded as rejected without being read into memory.
    """
    upload_permission_check(user=uploaded_by)
    outcomes: list[UploadOutcome] = []
    for upload in files:
        if upload.size > settings.KB_MAX_UPLOAD_BYTES:
            outcomes.append(document_record_failure(
                collection=collection, filename=filename_sanitize(upload.name or ""),
                size=upload.size, uploaded_by=uploaded_by,
                reason=f"The file is {upload.size / 2**20:.1f} MB, over the "
                       f"{settings.KB_MAX_UPLOAD_BYTES // 2**20} MB limit.",
            ))
            continue
        outcomes += documents_upload(collection=collection, filename=upload.name or "",
                                     data=upload.read(), uploaded_by=uploaded_by)
    return outcomes


def documents_upload(
    *, collection: Collection, filename: str, data: bytes, uploaded_by=None,
    metadata: dict | None = None, queue: bool = True, keep_folders: bool = False,
) -> list[UploadOutcome]:
    """Store an upload and queue its ingestion; a zip becomes one document per member.

    Never raises for bad input: each file's outcome says what happened, and one bad
    file does not stop the others. A document is identified in its collection by its
    name: the file name, or with keep_folders (kb_ingest) its path relative to the folder
    ingested, so teamA/README.md and teamB/README.md are two documents.
    """
    filename = path_sanitize(filename) if keep_folders else filename_sanitize(filename)
    if len(filename) > NAME_MAX_LENGTH:
        return [document_upload(collection=collection, filename=filename, data=data,
                                uploaded_by=uploaded_by)]
    if len(data) <= settings.KB_MAX_UPLOAD_BYTES and sniff_mime_type(
        filename=filename, head=data[:4096]
    ) == ZIP_MIME_TYPE:
        return _archive_upload(
            collection=collection, filename=filename, data=data, uploaded_by=uploaded_by
        )
    return [document_upload(collection=collection, filename=filename, data=data,
                            uploaded_by=uploaded_by, metadata=metadata, queue=queue)]


def _archive_upload(
    *, collection: Collection, filename: str, data: bytes, uploaded_by
) -> list[UploadOutcome]:
    limits = ArchiveLimits(
        max_total_uncompressed_bytes=settings.KB_ZIP_MAX_TOTAL_BYTES,
        max_entries=settings.KB_ZIP_MAX_ENTRIES,
        max_member_bytes=settings.KB_MAX_UPLOAD_BYTES,
    )
    try:
        members, skipped = extract_archive(filename=filename, data=data, limits=limits)
    except ParseError as exc:
        return [document_record_failure(
            collection=collection, filename=filename, size=len(data), reason=str(exc),
            uploaded_by=uploaded_by,
        )]
    outcomes = [
        UploadOutcome(filename=f"{filename}/{path_sanitize(item.name)}", outcome="rejected",
                      message=item.reason)
        for item in skipped
    ]
    seen: dict[str, str] = {}
    for member in members:
        name = path_sanitize(member.name)
        shown = f"{filename}/{name}"
        # Two members that differ only in characters the sanitising drops would otherwise
        # be one document, the second silently replacing the first.
        if shown.casefold() in seen:
            outcomes.append(UploadOutcome(
                filename=shown, outcome="rejected",
                message=f"Another file in the archive has the same name once made safe to "
                        f"display ({seen[shown.casefold()]!r}); not ingested.",
            ))
            continue
        seen[shown.casefold()] = member.name
        outcomes.append(document_upload(
            collection=collection, filename=name, data=member.data,
            uploaded_by=uploaded_by, display_name=shown,
        ))
    return outcomes


def document_upload(
    *,
    collection: Collection,
    filename: str,
    data: bytes,
    uploaded_by=None,
    display_name: str | None = None,
    metadata: dict | None = None,
    queue: bool = True,
) -> UploadOutcome:
    """Store one file and queue its ingestion, unless it is a duplicate.

    - identical bytes already in the collection: reported as a duplicate, nothing new;
    - same file name with new bytes: a new version of that document, re-ingested (its
      unchanged passages keep their vectors through the embedding cache);
    - otherwise a new document.

    Replacing a document needs the change permission: an uploader who may only add
    documents gets a rejection and the document is left as it was (uploaded_by=None is
    the system). metadata is stored on the document (a "title" key overrides the parsed
    title). With queue=False the caller ingests it itself (documents_ingest_batch).
    """
    shown = display_name or filename
    if len(shown) > NAME_MAX_LENGTH:
        # Rejected before anything is stored: the name does not fit the document row.
        return UploadOutcome(
            filename=shown[:120] + "…", outcome="rejected",
            message=f"The name is {len(shown)} characters long; names (with their folders) "
                    f"are limited to {NAME_MAX_LENGTH}. Shorten the path and upload it again.",
        )
    if not data:
        return document_record_failure(
            collection=collection, filename=shown, size=0, reason="The file is empty.",
            uploaded_by=uploaded_by,
        )
    if len(data) > settings.KB_MAX_UPLOAD_BYTES:
        limit_mb = settings.KB_MAX_UPLOAD_BYTES // (1024 * 1024)
        return document_record_failure(
            collection=collection, filename=shown, size=len(data), uploaded_by=uploaded_by,
            reason=f"The file is {len(data) / 1024 / 1024:.1f} MB, over the {limit_mb} MB limit.",
        )
    content_hash = hashlib.sha256(data).hexdigest()
    duplicate = (
        Document.objects.filter(collection=collection, content_hash=content_hash)
        # A failed copy, or one whose worker died mid-way, is ingested again, not reported
        # as a duplicate of itself.
        .exclude(status=Document.Status.FAILED)
        .exclude(_stalled(older_than_seconds=DOCUMENT_STALLED_AFTER_SECONDS))
        .order_by("pk")
        .first()
    )
    if duplicate is not None:
        return UploadOutcome(
            filename=shown, outcome="duplicate", document=duplicate,
            message=f"Identical to “{duplicate}” (document {duplicate.pk}); not ingested again.",
        )
    previous = (
        Document.objects.filter(collection=collection, original_filename=shown)
        .order_by("-pk")
        .first()
    )
    if previous is not None and uploaded_by is not None and not uploaded_by.has_perm(
            "kb.change_document"):
        return UploadOutcome(
            filename=shown, outcome="rejected",
            message=f"A document named “{shown}” already exists in this collection (document "
                    f"{previous.pk}); replacing it needs the “Can change document” permission. "
                    "Nothing was changed: rename the file to add it as a new document.",
        )
    stored: list[str] = []
    try:
        return _document_store(
            collection=collection, filename=filename, data=data, shown=shown,
            content_hash=content_hash, previous=previous, uploaded_by=uploaded_by,
            metadata=metadata, queue=queue, stored=stored,
        )
    except (DatabaseError, OSError) as exc:
        # Whatever the database or the disk refused, no file is left without its row.
        logger.exception("Storing upload %r failed", shown)
        storage = Document._meta.get_field("file").storage
        for name in stored:
            storage.delete(name)
        return UploadOutcome(filename=shown, outcome="rejected",
                             message=f"The file could not be stored ({exc.__class__.__name__}).")


def _document_store(
    *, collection: Collection, filename: str, data: bytes, shown: str, content_hash: str,
    previous: Document | None, uploaded_by, metadata: dict | None, queue: bool, stored: list[str],
) -> UploadOutcome:
    with transaction.atomic():
        if previous is not None:
            document = Document.objects.select_for_update().get(pk=previous.pk)
            old_file = document.file.name if document.file else None
            outcome = "updated"
        else:
            document = Document(collection=collection, original_filename=shown, uploaded_by=uploaded_by)
            old_file = None
            outcome = "created"
        document.content_hash = content_hash
        document.size_bytes = len(data)
        document.mime_type = sniff_mime_type(filename=filename, head=data[:4096])
        if document.status != Document.Status.DISABLED:
            document.status = Document.Status.PENDING
        document.stage = Document.Stage.QUEUED
        document.error_message = ""
        if metadata:
            document.metadata = {**document.metadata, **metadata}
        # Stored under its base name: the folders of a zip member or a kb_ingest path are
        # part of its name, not of the storage layout, where "x.md" and "x.md/y.md" collide.
        document.file.save(PurePosixPath(filename).name, ContentFile(data), save=False)
        stored.append(document.file.name)
        document.save()
        if old_file and old_file != document.file.name:
            transaction.on_commit(lambda: document.file.storage.delete(old_file))
        if queue:
            document_queue_ingest(document=document)
    message = "New version queued for ingestion." if outcome == "updated" else "Queued for ingestion."
    return UploadOutcome(filename=shown, outcome=outcome, document=document, message=message)


def document_record_failure(
    *, collection: Collection, filename: str, size: int, reason: str, uploaded_by=None
) -> UploadOutcome:
    """Keep a rejected upload visible as a failed document with its reason."""
    document = Document.objects.create(
        collection=collection,
        original_filename=filename,
        title=filename,
        size_bytes=size,
        content_hash="",
        status=Document.Status.FAILED,
        stage=Document.Stage.QUEUED,
        error_message=reason,
        uploaded_by=uploaded_by,
    )
    return UploadOutcome(filename=filename, outcome="rejected", document=document, message=reason)


def document_queue_ingest(*, document: Document) -> None:
    """Queue the document's ingestion once the current transaction commits."""
    from kb import tasks

    Document.objects.filter(pk=document.pk).update(
        status=_status_while_processing(document), stage=Document.Stage.QUEUED, error_message=""
    )
    transaction.on_commit(lambda: tasks.enqueue("kb.tasks.document_ingest_task", document.pk))


def _status_while_processing(document: Document) -> str:
    return Document.Status.DISABLED if document.status == Document.Status.DISABLED else Document.Status.PENDING


def document_retry(*, document: Document) -> bool:
    """Queue a failed (or stalled) document again; False if it has no file to retry."""
    if not document.file or not document.content_hash:
        return False
    document.status = Document.Status.PENDING
    document_queue_ingest(document=document)
    return True


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
    drafts: list
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
    *, document_ids: Sequence[int], on_embedded: Callable[[int], None] | None = None
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
    models = embeddings.embedding_models_written_on_ingest()
    parsed = _ingest_parse(document_ids=document_ids, models=models)
    prepared = _ingest_write_generations(parsed, models=models)
    for model in models:
        _ingest_embed(prepared=prepared, model=model, on_embedded=on_embedded)
    _ingest_finalize([item for item in prepared if not item.failed])
    documents = Document.objects.in_bulk([item for item in document_ids])
    return [documents[pk] for pk in document_ids if pk in documents]


def _ingest_guarded(item_document: Document, generation: int, work: Callable[[], object]):
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
    disabled = {document.pk for document in documents if document.status == Document.Status.DISABLED}
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
        item = _ingest_guarded(document, generation, lambda document=document, generation=generation,
                               keep_disabled=keep_disabled: _parse_and_chunk(
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
    inputs = [embedding_input(title=title, heading_path=d.heading_path, text=d.text) for d in drafts]
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
    if (now - document.heartbeat_at).total_seconds() < PROGRESS_MIN_INTERVAL_SECONDS:
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
                                  lambda item=item: _write_generations([item], models=models))
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
        chunks = Chunk.objects.bulk_create([
            Chunk(
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
            for item in items
            for i, draft in enumerate(item.drafts)
        ])
        for model in models:
            hits = cached[model.pk]
            ChunkEmbedding.objects.bulk_create([
                ChunkEmbedding(chunk=c, embedding_model=model, embedding=hits[c.embedding_input_hash])
                for c in chunks
                if c.embedding_input_hash in hits
            ])
        offset = 0
        for item in items:
            own = chunks[offset : offset + len(item.drafts)]
            offset += len(item.drafts)
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
            prepared.append(_PreparedDocument(
                document=document, generation=item.generation, keep_disabled=item.keep_disabled,
                chunks=own, inputs=item.inputs, missing=missing, embedded=embedded, total=total,
            ))
        Document.objects.bulk_update(
            [item.document for item in prepared],
            ["title", "mime_type", "metadata", "extracted_text", "stage", "chunks_total",
             "chunks_embedded", "heartbeat_at"],
            # Each statement is a CASE per field over its rows: keep them short.
            batch_size=BULK_UPDATE_BATCH,
        )
    return prepared


def _ingest_embed(*, prepared: list[_PreparedDocument], model, on_embedded) -> None:
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
        Collection.objects.filter(
            pk__in={current[item.document.pk].collection_id for item in items}
        ).update(updated_at=now)


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


def document_disable(*, document: Document) -> None:
    """Take a document out of search without deleting anything."""
    with transaction.atomic():
        Document.objects.filter(pk=document.pk).update(status=Document.Status.DISABLED)
        Chunk.objects.filter(document=document, searchable=True).update(searchable=False)
        Collection.objects.filter(pk=document.collection_id).update(updated_at=timezone.now())


def document_enable(*, document: Document) -> None:
    """Put a disabled document back into search (or back in the queue if it never finished)."""
    with transaction.atomic():
        current = Document.objects.select_for_update().get(pk=document.pk)
        if current.chunk_generation == 0:
            current.status = Document.Status.PENDING
            current.save(update_fields=["status"])
            document_queue_ingest(document=current)
            return
        Document.objects.filter(pk=document.pk).update(status=Document.Status.READY)
        Chunk.objects.filter(
            document=document, generation=current.chunk_generation, searchable=False
        ).update(searchable=True)
        Collection.objects.filter(pk=document.collection_id).update(updated_at=timezone.now())


class DocumentMoveRefused(Exception):
    """A move that would break an invariant; the message says why, for the editor."""


def document_move(*, document: Document, collection: Collection, actor=None) -> Document:
    """Move a document to another collection with its chunks, in one transaction.

    Updating the document's collection cascades to its chunks (the composite foreign key
    of search migration 0003), whose triggers re-tokenise them with the new collection's
    text-search configuration and move their postings and both collections' BM25
    statistics. Both collections' updated_at are bumped, so answer-cache entries keyed by
    either version stop matching, and the entries citing the document are dropped (the
    post_save receiver in chat.models). actor=None is the system; a user needs the change
    permission and read access to both collections.
    """
    if actor is not None:
        if not actor.has_perm("kb.change_document"):
            raise PermissionDenied("Moving a document needs the “Can change document” permission.")
        wanted = {document.collection_id, collection.pk}
        visible = set(selectors.collections_visible(user=actor).filter(pk__in=wanted)
                      .values_list("pk", flat=True))
        if visible != wanted:
            raise PermissionDenied("You can move documents only between collections you can read.")
    with transaction.atomic():
        current = Document.objects.select_for_update().get(pk=document.pk)
        source_id = current.collection_id
        if source_id == collection.pk:
            return current
        namesake = Document.objects.filter(
            collection=collection, original_filename=current.original_filename
        ).first()
        if namesake is not None:
            # A name identifies a document in its collection (the next upload of that name
            # replaces it): two of one name would make that ambiguous.
            raise DocumentMoveRefused(
                f"“{collection}” already has a document named “{current.original_filename}” "
                f"(document {namesake.pk}); delete or move that one first."
            )
        current.collection = collection
        current.save(update_fields=["collection", "updated_at"])
        Collection.objects.filter(pk__in=[source_id, collection.pk]).update(updated_at=timezone.now())
    logger.info("Document %s moved from collection %s to %s by %s.", current.pk, source_id,
                collection.pk, getattr(actor, "pk", "the system"))
    return current


def document_delete(*, document: Document) -> None:
    """Delete a document, its chunks, vectors and stored file."""
    file_name = document.file.name if document.file else None
    storage = document.file.storage if document.file else None
    with transaction.atomic():
        collection_id = document.collection_id
        document.delete()
        Collection.objects.filter(pk=collection_id).update(updated_at=timezone.now())
        if file_name:
            transaction.on_commit(lambda: storage.delete(file_name))


# A document whose worker has not reported progress for this long is presumed dead: the
# stall sweep fails it, and uploading the same file again restarts it.
DOCUMENT_STALLED_AFTER_SECONDS = 600


def _stalled(*, older_than_seconds: int) -> Q:
    """Documents in processing whose worker has not beaten for older_than_seconds."""
    cutoff = timezone.now() - timezone.timedelta(seconds=older_than_seconds)
    return Q(status=Document.Status.PROCESSING, heartbeat_at__lt=cutoff)


def documents_mark_stalled(*, older_than_seconds: int = DOCUMENT_STALLED_AFTER_SECONDS) -> int:
    """Fail documents whose worker stopped beating (killed mid-document); they can be retried."""
    return Document.objects.filter(_stalled(older_than_seconds=older_than_seconds)).update(
        status=Document.Status.FAILED,
        error_message="The worker stopped while processing this document (it may have been "
        "restarted or killed). Retry to finish it; work already done is reused.",
        processing_finished_at=timezone.now(),
    )


# --- API keys ---------------------------------------------------------------------------------


class ApiKeyError(ValueError):
    """A key that cannot be created as asked (an unknown or unreadable collection)."""


@transaction.atomic
def api_key_create(
    *,
    user,
    name: str,
    collections: Sequence[Collection] | None = None,
    rate_limit: str = "",
    api_key: ApiKey | None = None,
) -> tuple[ApiKey, str]:
    """Create a key for user, narrowed to collections if given; returns it and the raw key.

    Only the key's sha256 is stored: the raw key returned here is the one chance to show it.
    `api_key` is an unsaved row to fill in instead of a new one (the admin's form, which
    saves its many-to-many fields itself afterwards).
    """
    collections = list(collections or [])
    visible = set(collections_visible(user=user).values_list("pk", flat=True))
    unreadable = [collection.slug for collection in collections if collection.pk not in visible]
    if unreadable:
        raise ApiKeyError(f"{user.get_username()} may not read: {', '.join(unreadable)}.")
    raw_key, prefix = api_key_generate()
    api_key = api_key or ApiKey()
    api_key.user, api_key.name, api_key.rate_limit = user, name, rate_limit
    api_key.prefix, api_key.hashed_key = prefix, api_key_hash(raw_key)
    api_key.save()
    if collections:
        api_key.collections.set(collections)
    return api_key, raw_key
