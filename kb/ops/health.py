"""Liveness and readiness probes."""

from django.db import DEFAULT_DB_ALIAS, connections
from django.db.migrations.executor import MigrationExecutor
from django.http import HttpRequest, JsonResponse


def healthz(request: HttpRequest) -> JsonResponse:
    """The process is up and serving requests; says nothing about the database."""
    return JsonResponse({"status": "ok"})


def readiness_report() -> dict:
    """Whether the database answers, has pgvector, and has every migration applied."""
    report: dict[str, bool | str] = {
        "database": False, "vector_extension": False, "migrations_applied": False
    }
    try:
        connection = connections[DEFAULT_DB_ALIAS]
        with connection.cursor() as cursor:
            cursor.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
            row = cursor.fetchone()
        report["database"] = True
        report["vector_extension"] = row is not None
        executor = MigrationExecutor(connection)
        plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
        report["migrations_applied"] = not plan
    except Exception as exc:  # a probe reports failure; it never raises
        report["error"] = f"{exc.__class__.__name__}: {exc}".strip()[:300]
    return report


def readyz(request: HttpRequest) -> JsonResponse:
    """200 when the app can serve: database reachable, pgvector present, migrations applied."""
    report = readiness_report()
    ready = report["database"] and report["vector_extension"] and report["migrations_applied"]
    report["status"] = "ready" if ready else "not ready"
    return JsonResponse(report, status=200 if ready else 503)
