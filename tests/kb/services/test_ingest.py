"""Ingestion end to end: real files, the real local model, real Postgres."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
from django.db import connection
from django.utils.timezone import now as timezone_now

from kb.models import Chunk, ChunkEmbedding, Document, UsageRecord
from kb.services.documents import (
    DOCUMENT_STALLED_AFTER_SECONDS,
    document_delete,
    document_disable,
    document_enable,
    document_retry,
    documents_mark_stalled,
)
from kb.services.ingest import document_ingest, documents_ingest_batch
from kb.services.uploads import documents_upload
from search.models import CollectionStatistic, Posting

SAMPLES = Path(__file__).resolve().parents[3] / "fixtures" / "samples"

pytestmark = pytest.mark.django_db


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


@pytest.mark.parametrize(
    "filename",
    ["guide.md", "manual.pdf", "policy.docx", "article.html", "notes-latin1.txt"],
)
def test_each_format_ingests_to_ready_with_searchable_vectors(collection, ingest_one, filename):
    """Every supported format ends ready, with chunks, one vector per chunk, and BM25 postings."""
    document = ingest_one(collection, filename, sample(filename))

    assert document.status == Document.Status.READY, document.error_message
    assert document.stage == Document.Stage.DONE
    chunks = list(Chunk.objects.filter(document=document))
    assert chunks and all(c.searchable for c in chunks)
    assert document.chunks_embedded == document.chunks_total == len(chunks)
    assert ChunkEmbedding.objects.filter(chunk__document=document).count() == len(chunks)
    assert Posting.objects.filter(chunk_id__in=[c.pk for c in chunks]).exists()
    for chunk in chunks:
        assert document.extracted_text[chunk.char_start : chunk.char_end] == chunk.text


def test_pdf_chunks_keep_page_numbers(collection, ingest_one):
    """A citation into a PDF can name its page."""
    document = ingest_one(collection, "manual.pdf", sample("manual.pdf"))

    pages = set(Chunk.objects.filter(document=document).values_list("page_start", flat=True))
    assert None not in pages and len(pages) >= 2


def test_embedding_writes_usage_records(collection, ingest_one):
    """Each embedding batch is accounted with tokens and latency."""
    document = ingest_one(collection, "guide.md", sample("guide.md"))

    records = UsageRecord.objects.filter(kind=UsageRecord.Kind.EMBEDDING, document=document)
    assert records.exists()
    assert all(r.input_tokens > 0 and r.latency_ms > 0 and r.provider == "local" for r in records)


def test_uploading_a_document_whose_worker_died_restarts_it(collection, ingest_one, ingest):
    """A copy stuck in processing (no heartbeat for the stall period) is not a duplicate:
    the same file again re-ingests that document, reusing its vectors."""
    from django.utils import timezone

    document = ingest_one(collection, "guide.md", sample("guide.md"))
    vectors = ChunkEmbedding.objects.filter(chunk__document=document).count()
    stale = timezone.now() - timezone.timedelta(seconds=DOCUMENT_STALLED_AFTER_SECONDS + 1)
    Document.objects.filter(pk=document.pk).update(status=Document.Status.PROCESSING,
                                                   heartbeat_at=stale)

    (outcome,) = ingest(collection, "guide.md", sample("guide.md"))

    assert outcome.outcome == "updated" and outcome.document.pk == document.pk
    document.refresh_from_db()
    assert document.status == Document.Status.READY
    assert ChunkEmbedding.objects.filter(chunk__document=document).count() == vectors


def test_a_document_still_being_processed_is_a_duplicate(collection, ingest_one, ingest):
    document = ingest_one(collection, "guide.md", sample("guide.md"))
    Document.objects.filter(pk=document.pk).update(status=Document.Status.PROCESSING,
                                                   heartbeat_at=timezone_now())

    (outcome,) = ingest(collection, "copy.md", sample("guide.md"))

    assert outcome.outcome == "duplicate" and outcome.document.pk == document.pk


def test_identical_upload_is_a_duplicate_and_embeds_nothing(collection, ingest_one, ingest):
    """Re-uploading the same bytes reports the existing document and calls no model."""
    original = ingest_one(collection, "guide.md", sample("guide.md"))
    embedding_calls = UsageRecord.objects.filter(kind=UsageRecord.Kind.EMBEDDING).count()

    (outcome,) = ingest(collection, "copy-of-guide.md", sample("guide.md"))

    assert outcome.outcome == "duplicate"
    assert outcome.document.pk == original.pk
    assert Document.objects.count() == 1
    assert UsageRecord.objects.filter(kind=UsageRecord.Kind.EMBEDDING).count() == embedding_calls


def test_changed_file_reembeds_only_changed_chunks(collection, ingest_one):
    """A new version with one edited section embeds only the chunks whose text changed."""
    text = sample("guide.md").decode()
    first = ingest_one(collection, "guide.md", text)
    old_chunks = {c.embedding_input_hash for c in Chunk.objects.filter(document=first)}
    embedding_records = UsageRecord.objects.filter(kind="embedding")
    tokens_before = sum(embedding_records.values_list("input_tokens", flat=True))

    edited = text.replace("## ", "## Revised: ", 1)
    second = ingest_one(collection, "guide.md", edited)

    assert second.pk == first.pk and second.status == Document.Status.READY
    new_chunks = list(Chunk.objects.filter(document=second))
    changed = [c for c in new_chunks if c.embedding_input_hash not in old_chunks]
    assert 0 < len(changed) < len(new_chunks)
    records = UsageRecord.objects.filter(kind="embedding", document=second).order_by("-created_at")
    new_tokens = sum(embedding_records.values_list("input_tokens", flat=True)) - tokens_before
    assert records.exists()
    assert new_tokens <= sum(c.token_count + 64 for c in changed)
    # Only one generation remains, and every chunk has exactly one vector.
    assert {c.generation for c in new_chunks} == {second.chunk_generation}
    assert ChunkEmbedding.objects.filter(chunk__document=second).count() == len(new_chunks)


@pytest.mark.parametrize(
    ("filename", "data", "reason"),
    [
        ("empty.txt", b"", "empty"),
        ("truncated.pdf", None, "PDF"),
        ("binary.txt", bytes(range(256)) * 40, "text"),
        ("lies.pdf", b"<html><body>not a pdf</body></html>", "PDF"),
        ("program.exe", b"MZ\x90\x00" + bytes(2000), "support"),
    ],
)
def test_bad_files_fail_with_a_readable_reason(collection, ingest, filename, data, reason):
    """Empty, corrupt, lying or unsupported files end failed with a message, never a crash."""
    if data is None:
        data = sample("manual.pdf")[:900]
    (outcome,) = ingest(collection, filename, data)

    document = Document.objects.get(pk=outcome.document.pk)
    assert document.status == Document.Status.FAILED
    assert reason.lower() in document.error_message.lower()
    assert not Chunk.objects.filter(document=document, searchable=True).exists()


def test_file_over_the_size_limit_fails_without_storing(collection, ingest, settings):
    """An oversized file is recorded as failed with the limit in the message."""
    settings.KB_MAX_UPLOAD_BYTES = 1000
    (outcome,) = ingest(collection, "big.txt", b"word " * 1000)

    assert outcome.outcome == "rejected"
    assert "limit" in outcome.document.error_message


def test_zip_with_one_bad_member_still_ingests_the_rest(collection, ingest):
    """A batch with a corrupt file and a traversal entry ingests its good files."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("docs/guide.md", sample("guide.md"))
        archive.writestr("docs/notes.txt", sample("notes-latin1.txt"))
        archive.writestr("docs/broken.pdf", b"%PDF-1.7\n garbage")
        archive.writestr("../../etc/evil.txt", b"escape attempt")

    outcomes = ingest(collection, "bundle.zip", buffer.getvalue())

    by_name = {o.filename.split("/")[-1]: o for o in outcomes}
    assert Document.objects.get(pk=by_name["guide.md"].document.pk).status == Document.Status.READY
    assert Document.objects.get(pk=by_name["notes.txt"].document.pk).status == Document.Status.READY
    assert (Document.objects.get(pk=by_name["broken.pdf"].document.pk).status
            == Document.Status.FAILED)
    assert by_name["evil.txt"].outcome == "rejected"
    assert "traversal" in by_name["evil.txt"].message.lower() or ".." in by_name["evil.txt"].message


def test_disable_removes_from_index_and_enable_restores(collection, ingest_one):
    """Disabling keeps the chunks but takes them out of BM25 statistics and search."""
    document = ingest_one(collection, "guide.md", sample("guide.md"))
    stats = CollectionStatistic.objects.get(collection=collection)
    count_before = stats.chunk_count

    document_disable(document=document)
    stats.refresh_from_db()
    assert stats.chunk_count == 0
    assert Chunk.objects.filter(document=document).count() == count_before
    assert not Posting.objects.filter(collection_id=collection.pk).exists()

    document_enable(document=document)
    stats.refresh_from_db()
    assert stats.chunk_count == count_before
    assert Document.objects.get(pk=document.pk).status == Document.Status.READY


def test_delete_removes_chunks_vectors_and_postings(collection, ingest_one):
    """Deleting a document leaves nothing of it in the index."""
    document = ingest_one(collection, "guide.md", sample("guide.md"))
    chunk_ids = list(Chunk.objects.filter(document=document).values_list("pk", flat=True))

    document_delete(document=document)

    assert not Chunk.objects.filter(pk__in=chunk_ids).exists()
    assert not ChunkEmbedding.objects.filter(chunk_id__in=chunk_ids).exists()
    assert not Posting.objects.filter(chunk_id__in=chunk_ids).exists()
    assert CollectionStatistic.objects.get(collection=collection).chunk_count == 0


def test_retry_after_a_killed_run_finishes_without_duplicates(collection, ingest_one):
    """A run that died after writing its generation is finished by a retry, reusing vectors."""
    document = ingest_one(collection, "guide.md", sample("guide.md"))
    # Simulate a worker killed mid-run of a reprocess: generation+1 written, half embedded.
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO kb_chunk (document_id, collection_id, generation, ordinal, text, "
            "search_context, embedding_input_hash, token_count, heading_path, char_start, "
            "char_end, searchable, search_length, created_at) "
            "SELECT document_id, collection_id, generation + 1, ordinal, text, search_context, "
            "embedding_input_hash, token_count, heading_path, char_start, char_end, false, 0, "
            "now() FROM kb_chunk WHERE document_id = %s",
            [document.pk],
        )
    Document.objects.filter(pk=document.pk).update(status=Document.Status.PROCESSING)
    assert documents_mark_stalled(older_than_seconds=-1) == 1
    document.refresh_from_db()
    assert document.status == Document.Status.FAILED and "Retry" in document.error_message
    calls_before = UsageRecord.objects.filter(kind="embedding").count()

    document_retry(document=document)
    document_ingest(document_id=document.pk)

    document.refresh_from_db()
    chunks = Chunk.objects.filter(document=document)
    assert document.status == Document.Status.READY
    assert {c.generation for c in chunks} == {document.chunk_generation}
    assert ChunkEmbedding.objects.filter(chunk__document=document).count() == chunks.count()
    assert UsageRecord.objects.filter(kind="embedding").count() == calls_before  # all cached


def test_embedding_provider_failure_marks_failed_and_keeps_old_version(
    collection, ingest_one, settings
):
    """If the embedder fails, the document fails with the reason and its last good version
    serves."""
    from tests.fakes.openai_server import FakeOpenAIServer, Fault

    document = ingest_one(collection, "guide.md", sample("guide.md"))
    old_ids = set(Chunk.objects.filter(document=document, searchable=True)
                  .values_list("pk", flat=True))
    with FakeOpenAIServer(dimensions=8) as server:
        settings.KB_PROVIDERS = {
            **settings.KB_PROVIDERS,
            "embedding": {
                **settings.KB_PROVIDERS["embedding"],
                "fake": {"BACKEND": "kb.providers.openai.OpenAIEmbeddings", "MODEL": "fake-embed",
                         "base_url": server.base_url, "api_key": "test", "max_attempts": 2},
            },
        }
        from kb import embeddings

        model = embeddings.reembed_start(key="fake")  # a model being built gets new chunks too
        for _ in range(4):
            server.enqueue(Fault(status=500))
        edited = (sample("guide.md").decode()
                  + "\n\n## Appendix\n\nA brand new section about tides.\n")
        ingest_one(collection, "guide.md", edited)
        embeddings.reembed_cancel(model=model)

    document.refresh_from_db()
    assert document.status == Document.Status.FAILED
    assert "500" in document.error_message or "fake-embed" in document.error_message
    assert set(Chunk.objects.filter(document=document, searchable=True)
               .values_list("pk", flat=True)) == old_ids


def test_a_batch_ingests_each_document_on_its_own(collection, ingest_one):
    """One batch: new files, a new version of a stored one and a corrupt file; only the corrupt
    one fails."""
    old = ingest_one(collection, "guide.md", sample("guide.md"))
    old_generation = old.chunk_generation
    uploads = [
        ("guide.md", sample("guide.md") + b"\n\n## Appendix\n\nA new closing section.\n"),
        ("policy.docx", sample("policy.docx")),
        ("notes.txt", sample("notes-latin1.txt")),
        ("broken.pdf", b"%PDF-1.7\n garbage"),
    ]
    ids = []
    for name, data in uploads:
        (outcome,) = documents_upload(collection=collection, filename=name, data=data,
                                               queue=False)
        ids.append(outcome.document.pk)

    documents = documents_ingest_batch(document_ids=ids)

    by_name = {d.original_filename: d for d in documents}
    assert by_name["broken.pdf"].status == Document.Status.FAILED
    assert by_name["broken.pdf"].error_message
    for name in ("guide.md", "policy.docx", "notes.txt"):
        document = by_name[name]
        assert document.status == Document.Status.READY, document.error_message
        assert document.stage == Document.Stage.DONE
        assert document.attempts >= 1
        chunks = Chunk.objects.filter(document=document)
        # Only the new generation is left, all of it searchable and embedded.
        assert set(chunks.values_list("generation", flat=True)) == {document.chunk_generation}
        assert all(chunks.values_list("searchable", flat=True))
        assert document.chunks_embedded == document.chunks_total == chunks.count()
        assert ChunkEmbedding.objects.filter(chunk__document=document).count() == chunks.count()
    assert by_name["guide.md"].pk == old.pk
    assert by_name["guide.md"].chunk_generation == old_generation + 1
    assert "Appendix" in by_name["guide.md"].extracted_text
