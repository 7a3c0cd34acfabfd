"""What a process that serves requests needs, and commands and the qcluster must not have."""

from __future__ import annotations

import gc
import logging
import threading

from django.conf import settings
from django.db import connections

logger = logging.getLogger(__name__)


def web_process_prepare() -> None:
    """Tune this process for serving requests; call it before the first request.

    - Database connections come from a pool (KB_DB_POOL=web). Django runs each ASGI
      request on a new thread, so thread-local persistent connections are never reused.
      The qcluster must not pool: it forks workers, which would share the pool's sockets.
    - Local models use KB_WEB_TORCH_THREADS intra-op threads: a query's forward pass runs
      beside PostgreSQL answering the same request.
    - What is loaded so far is frozen out of the garbage collector (and again once the
      query model is warm): full collections would otherwise pause requests.
    """
    if settings.KB_DB_POOL == "web":
        # Django reads these when the first connection of a thread is opened, so closing
        # this thread's connection is enough for every later one to come from the pool.
        connections.close_all()
        database = settings.DATABASES["default"]
        database["CONN_MAX_AGE"] = 0
        database["OPTIONS"]["pool"] = settings.KB_DB_POOL_OPTIONS
    settings.KB_TORCH_THREADS = settings.KB_WEB_TORCH_THREADS
    garbage_collection_settle()


def garbage_collection_settle() -> None:
    """Exempt what is loaded by now (Django, and the models once warmed up) from collection.

    The web process holds a few hundred thousand long-lived objects (more with torch). A
    full collection walks them all: 140 to 270 ms measured here, a pause that lands on
    whichever request happens to be running. Frozen objects are never walked again.
    """
    gc.collect()
    gc.freeze()


def query_embedding_warm_up_start() -> threading.Thread:
    """Load the active embedding model's query path on a background thread, and return it.

    A local model loads, and exports its ONNX twin, on its first query: the first question
    after a start waited about 17 s for that. Serving starts at once; a question asked
    before the warm-up ends waits for the same load, not a second one. A remote model is
    not called: there is nothing to load, and a call would cost money.
    """
    thread = threading.Thread(target=_query_embedding_warm_up, name="query-embedding-warm-up",
                              daemon=True)
    thread.start()
    return thread


def _query_embedding_warm_up() -> None:
    from kb import selectors
    from kb.providers import registry

    try:
        active = selectors.embedding_model_active()
        backend = registry.embedding_backend(active.key if active else settings.KB_DEFAULT_EMBEDDING_MODEL)
        if not backend.remote:
            backend.embed_query("warm-up")
            garbage_collection_settle()
    except Exception as exc:  # the first question loads the model instead, and reports it
        # Stopped while loading, the inference thread refuses work: that is no failure.
        if threading.main_thread().is_alive():
            logger.warning("Could not warm up the query embedding model: %s", exc)
    finally:
        connections.close_all()  # this thread's own, or the pool's if pooled
