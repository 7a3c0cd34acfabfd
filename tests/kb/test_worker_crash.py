"""A real qcluster worker killed with SIGKILL mid-document; a retry finishes the job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from django.db import connection

from kb.models import Chunk, ChunkEmbedding, Document, UsageRecord
from kb.services.collections import collection_get_or_create
from kb.services.documents import document_retry, documents_mark_stalled
from kb.services.ingest import document_ingest
from kb.services.uploads import documents_upload

ROOT = Path(__file__).resolve().parents[2]


def _long_markdown(sections: int = 200) -> str:
    return "\n\n".join(
        f"## Section {i}\n\n" + " ".join(
            f"Tidal station {i} reports water level {j} with harbour note {i * j}."
            for j in range(12)
        )
        for i in range(sections)
    )


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_worker_killed_mid_document_then_retry_finishes_without_duplicates(settings, tmp_path):
    settings.KB_TASKS_SYNC = False
    settings.MEDIA_ROOT = tmp_path / "media"
    params = connection.get_connection_params()
    url = (f"postgresql://{params.get('user') or 'postgres'}@/"
           f"{connection.settings_dict['NAME']}?host={params['host']}")
    env = {**os.environ, "DATABASE_URL": url, "KB_WORKERS": "1",
           "KB_MEDIA_ROOT": str(tmp_path / "media"), "PYTHONUNBUFFERED": "1"}
    collection = collection_get_or_create(slug="crash")
    # The active embedding model must exist before the worker starts embedding.
    from kb.embeddings import embedding_model_active_or_bootstrap

    embedding_model_active_or_bootstrap()
    worker = subprocess.Popen([sys.executable, str(ROOT / "manage.py"), "qcluster"], cwd=ROOT,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        (outcome,) = documents_upload(collection=collection, filename="tides.md",
                                               data=_long_markdown().encode())
        document = outcome.document
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            document.refresh_from_db()
            if document.chunks_embedded > 0 and document.chunks_embedded < document.chunks_total:
                break
            assert document.status != Document.Status.READY, "finished before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("the worker never started embedding")
        worker_process = psutil.Process(worker.pid)
        for process in [worker_process, *worker_process.children(recursive=True)]:
            process.send_signal(signal.SIGKILL)
        worker.wait(timeout=10)
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
    document.refresh_from_db()
    assert document.status == Document.Status.PROCESSING
    embedded_before_kill = ChunkEmbedding.objects.filter(chunk__document=document).count()
    assert embedded_before_kill > 0

    assert documents_mark_stalled(older_than_seconds=-1) == 1
    settings.KB_TASKS_SYNC = True
    calls_before = UsageRecord.objects.filter(kind="embedding").count()
    assert document_retry(document=document)
    document_ingest(document_id=document.pk)

    document.refresh_from_db()
    chunks = Chunk.objects.filter(document=document)
    assert document.status == Document.Status.READY
    assert {c.generation for c in chunks} == {document.chunk_generation}
    assert chunks.filter(searchable=True).count() == chunks.count() == document.chunks_total
    assert ChunkEmbedding.objects.filter(chunk__document=document).count() == chunks.count()
    # The vectors committed before the kill were reused, not embedded again.
    retried_inputs = UsageRecord.objects.filter(kind="embedding").count() - calls_before
    assert retried_inputs < (chunks.count() + 63) // 64
