"""The kb_bm25 extension: built for a server from its pg_config, created by migrate, and
its C function's answer to bad arguments."""

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
    from pgserver._commands import POSTGRES_BIN_PATH

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
        **{option: subprocess.run([str(real), option], capture_output=True, text=True, check=True).stdout.strip()
           for option in ("--includedir-server", "--cppflags", "--cflags", "--cflags_sl")},
    }
    script = tmp_path / "pg_config"
    cases = "\n".join(f'    {option}) echo "{value}" ;;' for option, value in answers.items())
    script.write_text(f'#!/bin/sh\nfor option in "$@"; do\n  case "$option" in\n{cases}\n  esac\ndone\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script, lib_dir, share_dir / "extension"


def test_build_installs_the_library_and_extension_files_once(fake_server):
    pg_config, lib_dir, extension_dir = fake_server

    assert extension_build(pg_config)
    library = lib_dir / f"{EXTENSION}.so"
    assert library.stat().st_size > 0
    assert {path.name for path in extension_dir.iterdir()} == {f"{EXTENSION}.control", f"{EXTENSION}--1.0.sql"}
    built_at = library.stat().st_mtime_ns

    assert extension_build(pg_config), "an unchanged source is not rebuilt"
    assert library.stat().st_mtime_ns == built_at
    assert sorted(path.name for path in lib_dir.iterdir()) == [f"{EXTENSION}.sha256", f"{EXTENSION}.so"]


def test_a_failed_build_is_logged_and_leaves_nothing(fake_server, monkeypatch, caplog):
    pg_config, lib_dir, extension_dir = fake_server
    monkeypatch.setenv("CC", "false")

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
        assert cursor.fetchall() == [("1.0",)]


def top_chunks(*arguments) -> list[tuple]:
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SELECT * FROM kb_bm25_top_chunks(%s::regclass, %s, %s, %s, %s, %s, %s, %s)", arguments)
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
