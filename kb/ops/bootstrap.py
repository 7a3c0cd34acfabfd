"""First-run preparation shared by `serve` and the tests: database checks, schedules, demo."""

from __future__ import annotations

from pathlib import Path

from django.conf import settings
from django.db import OperationalError, connection

from kb.models import Document
from kb.ops.database import DatabaseSetupError
from kb.services import collections, uploads

DEMO_DIR = Path(settings.BASE_DIR) / "fixtures" / "demo"
DEMO_COLLECTION = "demo"


def database_prepare() -> None:
    """Connect (starting the embedded server if needed) and check pgvector is installable."""
    try:
        connection.ensure_connection()
    except DatabaseSetupError:
        raise
    except OperationalError as exc:
        detail = str(exc).strip()
        first_line = detail.splitlines()[0] if detail else exc.__class__.__name__
        raise DatabaseSetupError(
            f"Cannot connect to PostgreSQL ({first_line}). Check DATABASE_URL, or unset it to "
            "use the embedded server."
        ) from None
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'vector'), "
            "EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'vector')"
        )
        installed, available = cursor.fetchone()
    if not installed and not available:
        raise DatabaseSetupError(
            "The database has no pgvector extension. Install it on the server (for example "
            "`apt install postgresql-16-pgvector`, or use the pgvector/pgvector Docker image), "
            "or unset DATABASE_URL to use the embedded server."
        )


def migrations_pending() -> list[str]:
    """The migrations this database still needs, as "app.name"."""
    from django.db.migrations.executor import MigrationExecutor

    executor = MigrationExecutor(connection)
    plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
    return [f"{migration.app_label}.{migration.name}" for migration, _ in plan]


def database_ready_check() -> None:
    """Raise DatabaseSetupError, in one readable line, unless the schema is up to date."""
    database_prepare()
    pending = migrations_pending()
    if pending:
        raise DatabaseSetupError(
            f"The database schema is not up to date ({len(pending)} migrations pending, "
            f"first {pending[0]}). Run `python manage.py migrate`, or start the app with "
            "`python manage.py serve`, which migrates."
        )


def schedules_ensure() -> None:
    """Register the periodic sweep that fails documents whose worker died."""
    from django_q.models import Schedule

    Schedule.objects.update_or_create(
        name="Fail stalled documents",
        defaults={
            "func": "kb.tasks.documents_mark_stalled_task",
            "schedule_type": Schedule.MINUTES,
            "minutes": 5,
        },
    )


def demo_corpus_load() -> int:
    """Queue the demo documents on the first run; returns how many were queued."""
    collection = collections.collection_get_or_create(
        slug=DEMO_COLLECTION, name="Demo: about this product")
    if Document.objects.filter(collection=collection).exists() or not DEMO_DIR.is_dir():
        return 0
    queued = 0
    for path in sorted(DEMO_DIR.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            outcomes = uploads.documents_upload(
                collection=collection, filename=path.name, data=path.read_bytes()
            )
            queued += sum(1 for outcome in outcomes if outcome.accepted)
    return queued
