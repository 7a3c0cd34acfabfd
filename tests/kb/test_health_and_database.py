"""Health probes and the clear one-line errors of database setup."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from kb.ops.database import (
    DatabaseSetupError,
    database_settings_from_url,
    embedded_server_start,
    embedded_shared_buffers,
)

ROOT = Path(__file__).resolve().parents[2]


def test_healthz_reports_the_process(client):
    assert client.get("/healthz").json() == {"status": "ok"}


@pytest.mark.django_db
def test_readyz_reports_database_vector_and_migrations(client):
    body = client.get("/readyz").json()
    assert body["status"] == "ready"
    assert body["database"] and body["vector_extension"] and body["migrations_applied"]


def test_database_url_is_parsed_into_settings():
    entry = database_settings_from_url("postgresql://kb:s%40cret@db.example:6543/knowledge?sslmode=require")
    assert entry["HOST"] == "db.example" and entry["PORT"] == "6543"
    assert entry["USER"] == "kb" and entry["PASSWORD"] == "s@cret" and entry["NAME"] == "knowledge"
    assert entry["OPTIONS"] == {"sslmode": "require"}


def test_options_from_the_url_are_kept_and_ef_search_is_added():
    """A DATABASE_URL's own session options replace the default statement timeout, and
    hnsw.ef_search still goes with every connection request."""
    url = "postgresql://kb@db.example/kb?options=-c%20work_mem%3D8MB"
    completed = subprocess.run(
        [sys.executable, "-c", "from django.conf import settings; "
                               "print(settings.DATABASES['default']['OPTIONS']['options'])"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "kb.settings", "DATABASE_URL": url,
             "KB_HNSW_EF_SEARCH": "123"},
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.split() == ["-c", "work_mem=8MB", "-c", "hnsw.ef_search=123",
                                        "-c", "hnsw.iterative_scan=relaxed_order"]


def test_a_non_postgres_url_is_refused():
    with pytest.raises(Exception, match="PostgreSQL"):
        database_settings_from_url("sqlite:///db.sqlite3")


def test_unwritable_data_directory_gives_one_clear_line(tmp_path):
    """A data directory that cannot be created says so and how to fix it."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(DatabaseSetupError) as error:
        embedded_server_start(blocker / "sub" / "pgdata")
    message = str(error.value)
    assert "KB_DATA_DIR" in message and "\n" not in message


def test_serve_refuses_a_port_in_use():
    """A busy port is reported in one line before anything starts."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(CommandError, match=f"127.0.0.1:{port}"):
            call_command("serve", "--port", str(port), "--no-workers")


def test_embedded_shared_buffers_default_to_a_quarter_of_memory_within_bounds(settings):
    settings.KB_PG_SHARED_BUFFERS = ""
    quarter = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4 // 2**20

    assert embedded_shared_buffers() == f"{min(max(quarter, 128), 1024)}MB"
    settings.KB_PG_SHARED_BUFFERS = "300MB"
    assert embedded_shared_buffers() == "300MB"


SHOW_SHARED_BUFFERS = """
import logging, sys
from pathlib import Path
import psycopg
from kb.ops.database import embedded_server_start
logging.basicConfig(level=logging.INFO, format="%(message)s")
server = embedded_server_start(Path(sys.argv[1]))
with psycopg.connect(server.get_uri("postgres")) as conn:
    print("shared_buffers=" + conn.execute("SHOW shared_buffers").fetchone()[0])
"""


def test_a_new_embedded_server_restarts_once_with_its_shared_buffers_and_keeps_them_on_a_bad_value(
    tmp_path,
):
    """PostgreSQL's 128 MB is replaced at the first start (a restart, as no other process
    holds the new server); a value PostgreSQL refuses is a warning, not a failed start."""
    def start(value: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", SHOW_SHARED_BUFFERS, str(tmp_path / "pgdata")],
            capture_output=True, text=True, timeout=180, cwd=Path(__file__).resolve().parents[2],
            env={**os.environ, "KB_PG_SHARED_BUFFERS": value},
        )

    first = start("200MB")
    assert first.returncode == 0, first.stderr
    assert "shared_buffers=200MB" in first.stdout
    assert "Restarting the embedded server for shared_buffers = 200MB" in first.stderr

    refused = start("plenty")
    assert refused.returncode == 0, refused.stderr
    assert "shared_buffers=200MB" in refused.stdout
    assert "keeps its shared_buffers; plenty was refused" in refused.stderr
