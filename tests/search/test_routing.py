"""search.routing: search's reads go to the replica alias when one is configured, and to the
primary when it fails. (tests/acceptance/test_search_replica.py runs it on a real streaming
replica.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.db import DEFAULT_DB_ALIAS, connections

from kb.models import Chunk
from search import routing
from search.routing import SEARCH_REPLICA, SearchReplicaRouter

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def replica_alias(settings):
    """A `search_replica` alias, with the router installed (it is never connected to here)."""
    connections.settings[SEARCH_REPLICA] = {"HOST": "replica.internal"}
    settings.DATABASE_ROUTERS = ["search.routing.SearchReplicaRouter"]
    routing.replica_reset()
    try:
        yield
    finally:
        del connections.settings[SEARCH_REPLICA]
        routing.replica_reset()


def test_without_a_replica_search_reads_the_primary():
    assert SEARCH_REPLICA not in connections.settings
    assert SearchReplicaRouter().db_for_read(Chunk, search=True) is None
    assert routing.search_database().alias == DEFAULT_DB_ALIAS


def test_only_reads_hinted_as_search_go_to_the_replica(replica_alias):
    router = SearchReplicaRouter()
    assert router.db_for_read(Chunk, search=True) == SEARCH_REPLICA
    assert router.db_for_read(Chunk) is None
    assert router.db_for_write(Chunk, search=True) == DEFAULT_DB_ALIAS
    assert router.allow_migrate(SEARCH_REPLICA, "kb") is False
    assert router.allow_migrate(DEFAULT_DB_ALIAS, "kb") is None


# The fallback runs in a process of its own, configured as a deployment is: DATABASE_URL is the
# test database (the primary), KB_SEARCH_REPLICA_URL a replica. Django's test isolation allows
# no connection to an alias added during a test.
FALLBACK = """
import django, sys
django.setup()
from search import routing
print("before", routing.search_database().alias)
try:
    print("rows", routing.search_rows(sys.argv[1], [41]))
except Exception as exc:
    print("raised", type(exc).__name__, exc)
print("after", routing.search_database().alias)
"""


def _search_rows_in_a_deployment(statement: str, replica_url: str) -> str:
    from django.db import connection

    connection.ensure_connection()
    primary = (f"postgresql://{connection.connection.info.user}@/"
               f"{connection.settings_dict['NAME']}?host={connection.connection.info.host}")
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "kb.settings", "DATABASE_URL": primary,
           "KB_SEARCH_REPLICA_URL": replica_url, "KB_SEARCH_REPLICA_RETRY_SECONDS": "30",
           "LOG_LEVEL": "WARNING"}
    done = subprocess.run([sys.executable, "-c", FALLBACK, statement], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.mark.django_db
def test_an_unreachable_replica_sends_the_read_to_the_primary_and_is_left_alone():
    out = _search_rows_in_a_deployment("SELECT %s::int + 1",
                                       "postgresql://kb@127.0.0.1:9/kb?connect_timeout=2")
    assert "before search_replica" in out
    assert "rows [(42,)]" in out
    assert "Search replica failed" in out and "the next 30 s of searches too" in out
    # Left alone for KB_SEARCH_REPLICA_RETRY_SECONDS: no second wait on it.
    assert "after default" in out


@pytest.mark.django_db
def test_a_statement_error_on_the_replica_is_raised_not_retried_on_the_primary():
    from django.db import connection

    connection.ensure_connection()
    # The primary itself as the "replica": reachable, so a bad statement fails as anywhere.
    replica = (f"postgresql://{connection.connection.info.user}@/"
               f"{connection.settings_dict['NAME']}?host={connection.connection.info.host}")
    out = _search_rows_in_a_deployment("SELECT %s / 0", replica)
    assert "raised DataError division by zero" in out
    assert "Search replica failed" not in out
    assert "after search_replica" in out
