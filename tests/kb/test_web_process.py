"""Serving processes pool connections, keep one torch thread and freeze what they loaded out
of the garbage collector; other processes do not."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from kb.models import EmbeddingModel
from kb.ops.web_process import query_embedding_warm_up_start
from kb.ops.worker_threads import WorkerThreads
from kb.providers.base import EmbeddingBackend, EmbeddingResult

ROOT = Path(__file__).resolve().parents[2]

REPORT = """
import gc, json, os, threading
from django.conf import settings
from django.db import connection

def query():
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")

# Each ASGI request runs on a new thread: the pool is what lets them share connections.
for _ in range(3):
    thread = threading.Thread(target=query)
    thread.start()
    thread.join()
pool = connection.pool
print(json.dumps({
    "pool": settings.DATABASES["default"]["OPTIONS"].get("pool"),
    "pool_size": pool.get_stats()["pool_size"] if pool else None,
    "torch_threads": settings.KB_TORCH_THREADS,
    # More than the interpreter freezes by itself (3.12 starts with some objects frozen).
    "gc_frozen": gc.get_freeze_count() > int(os.environ["BARE_FREEZE_COUNT"]),
}))
"""


def bare_freeze_count() -> int:
    completed = subprocess.run([sys.executable, "-c", "import gc; print(gc.get_freeze_count())"],
                               capture_output=True, text=True, timeout=60, check=True)
    return int(completed.stdout)


def run_python(code: str, **env: str) -> dict:
    completed = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "kb.settings",
             "BARE_FREEZE_COUNT": str(bare_freeze_count()), **env},
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_the_asgi_entry_point_pools_connections_and_uses_one_torch_thread():
    report = run_python("import kb.asgi\n" + REPORT)

    assert report["pool"]["max_size"] >= 1
    assert 1 <= report["pool_size"] <= report["pool"]["max_size"]
    assert report["torch_threads"] == 1
    # A full collection would walk everything loaded at start on some request's time.
    assert report["gc_frozen"] is True


def test_other_processes_keep_plain_connections_and_every_core():
    report = run_python("import django\ndjango.setup()\n" + REPORT)

    assert report == {"pool": None, "pool_size": None, "torch_threads": 0, "gc_frozen": False}


def test_pooling_can_be_turned_off_for_the_web_process():
    report = run_python("import kb.asgi\n" + REPORT, KB_DB_POOL="false", KB_WEB_TORCH_THREADS="2")

    assert report == {"pool": None, "pool_size": None, "torch_threads": 2, "gc_frozen": True}


def test_worker_threads_run_nested_calls_in_place():
    """A task on the thread that submits to the same one-thread pool runs, not deadlocks."""
    threads = WorkerThreads(max_workers=1, name="test-nested")

    assert threads.run(lambda: threads.run(lambda: 41) + 1) == 42


def test_worker_threads_start_afresh_in_a_forked_child():
    threads = WorkerThreads(max_workers=1, name="test-fork")
    assert threads.run(lambda: "parent") == "parent"

    child = os.fork()
    if child == 0:  # the child: the parent's thread does not exist here
        os._exit(0 if threads.submit(lambda: "child").result(timeout=10) == "child" else 1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0


SURVIVES_A_DROPPED_CONNECTION = """
import json, threading
from django.db import connection

def backend_pid():
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]

def in_new_thread(fn):
    # As a request does: its own thread, and its connection closed (returned) at the end.
    out = []

    def run():
        try:
            out.append(fn())
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return out[0] if out else None

pids = [in_new_thread(backend_pid) for _ in range(2)]
# An idle pooled connection dies (a database restart, a proxy's idle timeout).
def terminate():
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                       "WHERE pid = ANY(%s) AND pid <> pg_backend_pid()", [pids])
    return True
in_new_thread(terminate)
print(json.dumps({"after": [in_new_thread(backend_pid) for _ in range(4)]}))
"""


def test_a_pooled_connection_that_died_while_idle_is_replaced():
    """The pool checks a connection before handing it out, so a request never gets a
    dead one after a database restart."""
    report = run_python("import kb.asgi\n" + SURVIVES_A_DROPPED_CONNECTION)

    assert None not in report["after"]


# Embedding backends the warm-up tests configure by dotted path, as KB_PROVIDERS names any.
class RecordingEmbeddings(EmbeddingBackend):
    """Records each query's text and thread, and holds the query until `gate` is set."""

    calls: list[tuple[str, str]] = []
    gate = threading.Event()

    @property
    def dimensions(self) -> int:
        return 3

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def embed_batch(self, texts):
        type(self).calls.append((texts[0], threading.current_thread().name))
        assert type(self).gate.wait(timeout=30)
        return EmbeddingResult(vectors=[[1.0, 0.0, 0.0] for _ in texts], input_tokens=len(texts))


class BrokenEmbeddings(RecordingEmbeddings):
    def embed_batch(self, texts):
        raise OSError("weights not found at /nowhere")


class RemoteEmbeddings(RecordingEmbeddings):
    remote = True


def _embedding_provider(settings, backend: type[EmbeddingBackend], key: str = "warm-test") -> None:
    settings.KB_PROVIDERS = {
        **settings.KB_PROVIDERS,
        "embedding": {key: {"BACKEND": f"{__name__}.{backend.__name__}",
                            "MODEL": backend.__name__}},
    }
    settings.KB_DEFAULT_EMBEDDING_MODEL = key
    RecordingEmbeddings.calls = []
    RecordingEmbeddings.gate = threading.Event()


@pytest.mark.django_db(transaction=True)
def test_warm_up_embeds_one_query_with_the_active_model_on_a_background_thread(settings):
    """Serving starts while the active model loads: the start returns before the model has
    answered, and the model answers one query on the warm-up's own thread."""
    _embedding_provider(settings, RecordingEmbeddings, key="warm-active")
    settings.KB_DEFAULT_EMBEDDING_MODEL = "minilm-int8"  # not this one: the active model is
    EmbeddingModel.objects.create(key="warm-active", backend="RecordingEmbeddings", model_name="r",
                                  dimensions=3, is_active=True, status=EmbeddingModel.Status.ACTIVE)

    thread = query_embedding_warm_up_start()
    try:
        assert thread.daemon and thread.is_alive()  # still inside the model: start did not wait
    finally:
        RecordingEmbeddings.gate.set()
    thread.join(timeout=30)

    assert not thread.is_alive()
    assert RecordingEmbeddings.calls == [("warm-up", "query-embedding-warm-up")]


@pytest.mark.django_db(transaction=True)
def test_warm_up_uses_the_default_model_before_any_is_active(settings):
    """On a new install no model is active yet; the default one becomes active on the first
    ingestion, so that is the one warmed up."""
    _embedding_provider(settings, RecordingEmbeddings)
    RecordingEmbeddings.gate.set()

    query_embedding_warm_up_start().join(timeout=30)

    assert RecordingEmbeddings.calls == [("warm-up", "query-embedding-warm-up")]


@pytest.mark.django_db(transaction=True)
def test_a_model_that_fails_to_warm_up_is_logged_and_the_thread_ends(settings, caplog):
    _embedding_provider(settings, BrokenEmbeddings)

    with caplog.at_level(logging.WARNING, logger="kb.ops.web_process"):
        thread = query_embedding_warm_up_start()
        thread.join(timeout=30)

    assert not thread.is_alive()
    assert ("Could not warm up the query embedding model: weights not found at /nowhere"
            in caplog.text)


@pytest.mark.django_db(transaction=True)
def test_a_remote_model_is_not_called_to_warm_up(settings, caplog):
    """A remote model has nothing to load, and a call would cost money."""
    _embedding_provider(settings, RemoteEmbeddings)
    RecordingEmbeddings.gate.set()

    with caplog.at_level(logging.WARNING, logger="kb.ops.web_process"):
        query_embedding_warm_up_start().join(timeout=30)

    assert RecordingEmbeddings.calls == [] and "warm up" not in caplog.text
