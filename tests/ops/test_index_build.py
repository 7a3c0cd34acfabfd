"""Index builds run without the request statement timeout, with KB_INDEX_BUILD_MEMORY, and
leave the connection's settings as they were (kb.ops.database.index_build_settings)."""

from __future__ import annotations

import pytest
from django.db import DatabaseError, connection, transaction

from kb.ops.database import index_build_settings

pytestmark = pytest.mark.django_db


def _show(cursor, name: str) -> str:
    cursor.execute(f"SHOW {name}")
    return cursor.fetchone()[0]


def test_a_build_has_no_statement_timeout_and_its_own_memory(settings):
    settings.KB_INDEX_BUILD_MEMORY = "300MB"
    with connection.cursor() as cursor:
        cursor.execute("SET statement_timeout = '50ms'")
        before = _show(cursor, "maintenance_work_mem")
        with index_build_settings(cursor):
            assert _show(cursor, "statement_timeout") == "0"
            assert _show(cursor, "maintenance_work_mem") == "300MB"
            cursor.execute("SELECT pg_sleep(0.1)")  # would be cancelled at 50 ms
        # RESET goes back to the connection's own default, not to the 50 ms set above.
        assert _show(cursor, "statement_timeout") == "1min"
        assert _show(cursor, "maintenance_work_mem") == before


def test_a_failed_build_raises_its_own_error():
    with pytest.raises(DatabaseError, match="no_such_table"), transaction.atomic(), \
            connection.cursor() as cursor, index_build_settings(cursor):
        cursor.execute("CREATE INDEX ON no_such_table (x)")


def test_an_invalid_hnsw_index_left_by_a_failed_build_is_built_again(collection, ingest_one):
    """A cancelled CREATE INDEX CONCURRENTLY leaves an invalid index, which queries never
    use and IF NOT EXISTS would keep: the next build replaces it."""
    from kb import embeddings

    ingest_one(collection, "a.md", "# A\n\nTide tables and harbour notes.\n")
    model = embeddings.embedding_model_active_or_bootstrap()
    with connection.cursor() as cursor:
        # What the failed build leaves (the test database's role is a superuser).
        cursor.execute("UPDATE pg_index SET indisvalid = false WHERE indexrelid = to_regclass(%s)",
                       [model.hnsw_index_name])
    embeddings.embedding_model_index_create(model=model)
    with connection.cursor() as cursor:
        cursor.execute("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)",
                       [model.hnsw_index_name])
        assert cursor.fetchone() == (True,)


@pytest.mark.django_db(transaction=True)
def test_two_workers_bootstrapping_a_new_install_at_once_build_one_valid_index():
    """The first two documents of a new install, ingested by two workers at once: both
    bootstrap the default model and build its index. Unordered, the two concurrent builds
    deadlocked and one document's ingestion failed before it began."""
    import threading

    from kb.embeddings import embedding_model_active_or_bootstrap
    from kb.models import EmbeddingModel

    for model in EmbeddingModel.objects.all():
        with connection.cursor() as cursor:
            cursor.execute(f"DROP INDEX IF EXISTS {model.hnsw_index_name}")
    EmbeddingModel.objects.all().delete()
    start, errors = threading.Barrier(2), []

    def worker() -> None:
        try:
            start.wait()
            embedding_model_active_or_bootstrap()
        except Exception as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    (active,) = EmbeddingModel.objects.filter(is_active=True)
    with connection.cursor() as cursor:
        cursor.execute("SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass(%s)",
                       [active.hnsw_index_name])
        assert cursor.fetchone() == (True,)
