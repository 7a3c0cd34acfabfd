"""Uploads: files (one, several, or a zip's members) stored as documents and queued.

Views, the API, admin actions and commands call these; none of them holds business
logic of its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import PurePath, PurePosixPath

from django.conf import settings
from django.contrib.auth.models import User
from django.core.exceptions import PermissionDenied
from django.core.files.base import ContentFile
from django.core.files.uploadedfile import UploadedFile
from django.db import DatabaseError, transaction

from kb.ingestion.archives import ArchiveLimits, extract_archive
from kb.ingestion.document import ParseError
from kb.ingestion.sniff import sniff_mime_type
from kb.models import Collection, Document
from kb.selectors import Caller, SystemCaller, signed_in_user
from kb.services.documents import (
    DOCUMENT_STALLED_AFTER_SECONDS,
    document_queue_ingest,
    stalled_filter,
)

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
        if dot and len(suffix) < 10:
            name = stem[: 200 - len(suffix) - 1] + dot + suffix
        else:
            name = name[:200]
    return name or "unnamed"


def upload_permission_check(*, user: Caller) -> None:
    """Raise PermissionDenied unless the caller may add documents (SYSTEM always may).

    Reading a collection is not writing to it; the admin's upload page, the upload API
    and kb_ingest --user all ask here.
    """
    if not isinstance(user, SystemCaller) and not user.has_perm("kb.add_document"):
        raise PermissionDenied("Uploading needs the “Can add document” permission.")


def upload_size_refusal(*, size: int) -> str | None:
    """Why a file of this many bytes is refused, or None if it is within the limit."""
    if size <= settings.KB_MAX_UPLOAD_BYTES:
        return None
    return (f"The file is {size / 2**20:.1f} MB, over the "
            f"{settings.KB_MAX_UPLOAD_BYTES // 2**20} MB limit.")


def documents_upload_files(
    *, collection: Collection, files: Iterable[UploadedFile], uploaded_by: Caller,
    metadata: dict | None = None,
) -> list[UploadOutcome]:
    """Check the uploader may add documents, then store the files and queue them; the one
    entry point of the admin's upload page and the upload API (see documents_upload).

    A file over the size limit is recorded as rejected without being read into memory.
    """
    upload_permission_check(user=uploaded_by)
    uploader = signed_in_user(uploaded_by)  # AnonymousUser never passes the check
    outcomes: list[UploadOutcome] = []
    for upload in files:
        refusal = upload_size_refusal(size=upload.size or 0)
        if refusal is not None:
            outcomes.append(document_record_failure(
                collection=collection, filename=filename_sanitize(upload.name or ""),
                size=upload.size or 0, uploaded_by=uploader, reason=refusal,
            ))
            continue
        outcomes += documents_upload(collection=collection, filename=upload.name or "",
                                     data=upload.read(), uploaded_by=uploader, metadata=metadata)
    return outcomes


def document_replace(*, document: Document, upload: UploadedFile,
                     uploaded_by: Caller) -> UploadOutcome:
    """A new version of `document` from `upload`, whatever the upload's own name: the new
    chunks replace the old ones when they are ready (the same path as uploading a file of
    the document's name). Needs the change permission, as in the admin."""
    upload_permission_check(user=uploaded_by)
    uploader = signed_in_user(uploaded_by)
    if uploader is not None and not uploader.has_perm("kb.change_document"):
        raise PermissionDenied(
            "Replacing a document needs the “Can change document” permission.")
    refusal = upload_size_refusal(size=upload.size or 0)
    if refusal is not None:
        return UploadOutcome(filename=document.original_filename, outcome="rejected",
                             message=refusal)
    data = upload.read()
    if sniff_mime_type(filename=upload.name or "", head=data[:4096]) == ZIP_MIME_TYPE:
        return UploadOutcome(filename=document.original_filename, outcome="rejected",
                             message="A document is one file: upload a zip to its collection "
                                     "to add its members as documents.")
    return document_upload(collection=document.collection,
                           filename=filename_sanitize(upload.name or document.original_filename),
                           data=data, uploaded_by=uploader,
                           display_name=document.original_filename)


def documents_upload(
    *, collection: Collection, filename: str, data: bytes, uploaded_by: User | None = None,
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
    *, collection: Collection, filename: str, data: bytes, uploaded_by: User | None
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
    uploaded_by: User | None = None,
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
    refused = _upload_refused(collection=collection, shown=shown, data=data,
                              uploaded_by=uploaded_by)
    if refused is not None:
        return refused
    content_hash = hashlib.sha256(data).hexdigest()
    duplicate = _duplicate_outcome(collection=collection, shown=shown, content_hash=content_hash)
    if duplicate is not None:
        return duplicate
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


def _duplicate_outcome(
    *, collection: Collection, shown: str, content_hash: str
) -> UploadOutcome | None:
    """The outcome of bytes the collection already holds, or None if they are new."""
    duplicate = (
        Document.objects.filter(collection=collection, content_hash=content_hash)
        # A failed copy, or one whose worker died mid-way, is ingested again, not reported
        # as a duplicate of itself.
        .exclude(status=Document.Status.FAILED)
        .exclude(stalled_filter(older_than_seconds=DOCUMENT_STALLED_AFTER_SECONDS))
        .order_by("pk")
        .first()
    )
    if duplicate is None:
        return None
    return UploadOutcome(
        filename=shown, outcome="duplicate", document=duplicate,
        message=f"Identical to “{duplicate}” (document {duplicate.pk}); not ingested again.",
    )


def _upload_refused(
    *, collection: Collection, shown: str, data: bytes, uploaded_by: User | None
) -> UploadOutcome | None:
    """The outcome of a file refused before it is hashed: too long a name, empty, too big."""
    if len(shown) > NAME_MAX_LENGTH:
        # Rejected before anything is stored: the name does not fit the document row.
        return UploadOutcome(
            filename=shown[:120] + "…", outcome="rejected",
            message=f"The name is {len(shown)} characters long; names (with their folders) "
                    f"are limited to {NAME_MAX_LENGTH}. Shorten the path and upload it again.",
        )
    reason = "The file is empty." if not data else upload_size_refusal(size=len(data))
    if reason is None:
        return None
    return document_record_failure(collection=collection, filename=shown, size=len(data),
                                   reason=reason, uploaded_by=uploaded_by)


def _document_store(
    *, collection: Collection, filename: str, data: bytes, shown: str, content_hash: str,
    previous: Document | None, uploaded_by: User | None, metadata: dict | None,
    queue: bool, stored: list[str],
) -> UploadOutcome:
    with transaction.atomic():
        if previous is not None:
            document = Document.objects.select_for_update().get(pk=previous.pk)
            old_file = document.file.name if document.file else None
            outcome = "updated"
        else:
            document = Document(
                collection=collection, original_filename=shown, uploaded_by=uploaded_by
            )
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
        if document.file.name:  # saved just now, so named
            stored.append(document.file.name)
        document.save()
        if old_file and old_file != document.file.name:
            transaction.on_commit(lambda: document.file.storage.delete(old_file))
        if queue:
            document_queue_ingest(document=document)
    message = (
        "New version queued for ingestion." if outcome == "updated" else "Queued for ingestion."
    )
    return UploadOutcome(filename=shown, outcome=outcome, document=document, message=message)


def document_record_failure(
    *, collection: Collection, filename: str, size: int, reason: str,
    uploaded_by: User | None = None,
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
