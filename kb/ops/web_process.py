"""What a process that serves requests needs, and commands and the qcluster must not have."""

from __future__ import annotations

import gc
import logging
import threading

from django.conf import settings
from django.db import connections

from kb import selectors
from kb.providers import registry

logger = logging.getLogger(__name__)


def web_process_prepare() -> None:
    """Tune this process for serving requests; call it before the first request.

    What a web process gets from its settings is decided when they load, from
    KB_PROCESS_ROLE=web (set by manage.py for `serve`, and by kb.asgi under uvicorn):
    - database connections from a pool (KB_DB_POOL=web). Django runs each ASGI request on
      a new thread, so thread-local persistent connections are never reused. The qcluster
      must not pool: it forks workers, which would share the pool's sockets.
    - KB_WEB_TORCH_THREADS intra-op threads for local models: a query's forward pass runs
      beside PostgreSQL answering the same request.
    Here, what is loaded so far is frozen out of the garbage collector (and again once the
    query model is warm): full collections would otherwise pause requests.
    """
    if not settings.KB_SERVES_REQUESTS:
        logger.warning("This process serves requests but was not started as a web process "
                       "(KB_PROCESS_ROLE=web): its database connections are not pooled.")
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
    try:
        active = selectors.embedding_model_active()
        key = active.key if active else settings.KB_DEFAULT_EMBEDDING_MODEL
        backend = registry.embedding_backend(key)
        if not backend.remote:
            backend.embed_query("warm-up")
            garbage_collection_settle()
    except Exception as exc:  # the first question loads the model instead, and reports it
        # Stopped while loading, the inference thread refuses work: that is no failure.
        if threading.main_thread().is_alive():
            logger.warning("Could not warm up the query embedding model: %s", exc)
    finally:
        connections.close_all()  # this thread's own, or the pool's if pooled
