"""Search reads on a read replica: the Django database router, and the one function through
which search's statements run.

With KB_SEARCH_REPLICA_URL set (a streaming replica of the primary; docs/DEPLOY.md), the
settings add the database alias `search_replica` and this router. Retrieval's statements run
there: the BM25 and vector candidates, the text of the hits, and the query-term coverage chat
weighs. Everything else stays on the primary: access control (what a caller may read is
decided on current data), writes, the usage ledger, the admin.

A replica is behind its primary by its replay lag: a new document becomes searchable, and a
deleted or disabled one stops being found, once the replica has replayed the change
(milliseconds on a healthy one; docs/DEPLOY.md shows how to watch it).

When the replica cannot be reached, or cancels a statement because of a conflict with
recovery, the statement runs again on the primary. An unreachable replica is then left alone
for KB_SEARCH_REPLICA_RETRY_SECONDS, so that its outage costs one slow request, not every one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, InterfaceError, OperationalError, connections, router
from django.db.backends.base.base import BaseDatabaseWrapper

from kb.models import Chunk

logger = logging.getLogger(__name__)

SEARCH_REPLICA = "search_replica"

_down_lock = threading.Lock()
_replica_down_until = 0.0


class SearchReplicaRouter:
    """Reads hinted `search=True` go to the search replica while it is reachable; all writes
    and every other read go to the primary, and migrations never run on the replica (it is a
    copy of the primary's files, read-only)."""

    def db_for_read(self, model: type, **hints: Any) -> str | None:
        if hints.get("search") and replica_configured() and replica_reachable():
            return SEARCH_REPLICA
        return None

    def db_for_write(self, model: type, **hints: Any) -> str | None:
        return DEFAULT_DB_ALIAS

    def allow_relation(self, obj1: object, obj2: object, **hints: Any) -> bool | None:
        # A physical replica holds the same rows as its primary.
        return True

    def allow_migrate(self, db: str, app_label: str, model_name: str | None = None,
                      **hints: Any) -> bool | None:
        return False if db == SEARCH_REPLICA else None


def replica_configured() -> bool:
    return SEARCH_REPLICA in connections.settings


def replica_reachable() -> bool:
    """False for a while after the replica failed (KB_SEARCH_REPLICA_RETRY_SECONDS)."""
    return time.monotonic() >= _replica_down_until


def search_database() -> BaseDatabaseWrapper:
    """The connection search reads through now: the replica where one is configured and
    reachable, the primary otherwise."""
    return connections[router.db_for_read(Chunk, search=True)]


def search_rows(statement: str, params: Sequence[Any] | Mapping[str, Any]) -> list[tuple]:
    """Run one read-only statement of search, on the replica where it is up (the primary
    where none is configured), and return its rows. A failure of the replica itself (see
    the module's docstring) runs it on the primary instead; any other error is raised."""
    database = search_database()
    try:
        return _rows(database, statement, params)
    except (OperationalError, InterfaceError) as exc:
        if database.alias == DEFAULT_DB_ALIAS:
            raise
        sqlstate = getattr(exc.__cause__, "sqlstate", None)
        unreachable = sqlstate is None or sqlstate.startswith(("08", "57P"))
        if not unreachable and sqlstate != "40001":  # 40001: a conflict with recovery
            raise
        _replica_failed(database, exc, mark_down=unreachable)
    return _rows(connections[DEFAULT_DB_ALIAS], statement, params)


def _rows(database: BaseDatabaseWrapper, statement: str,
          params: Sequence[Any] | Mapping[str, Any]) -> list[tuple]:
    with database.cursor() as cursor:
        cursor.execute(statement, params)
        return cursor.fetchall()


def _replica_failed(database: BaseDatabaseWrapper, exc: Exception, *, mark_down: bool) -> None:
    global _replica_down_until
    retry_seconds = float(settings.KB_SEARCH_REPLICA_RETRY_SECONDS)
    if mark_down:
        with _down_lock:
            _replica_down_until = time.monotonic() + retry_seconds
    logger.warning(
        "Search replica failed (%s); this search reads from the primary%s.",
        str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
        f", and the next {retry_seconds:g} s of searches too" if mark_down else "",
    )
    try:
        database.close()
    except Exception:  # a broken connection may fail to close; it is discarded either way
        logger.debug("Closing the failed replica connection raised", exc_info=True)


def replica_reset() -> None:
    """Forget a recorded outage (for tests, and a process that knows the replica is back)."""
    global _replica_down_until
    with _down_lock:
        _replica_down_until = 0.0
