import logging

from django.apps import AppConfig
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connections
from django.db.models.signals import post_migrate

from search.postgres_extension import embedded_pg_config, extension_built, extension_create


class SearchConfig(AppConfig):
    name = "search"
    verbose_name = "Search"

    def ready(self) -> None:
        post_migrate.connect(_bm25_extension_create, sender=self)
        # Registers the quality gate that activating an embedding model runs (kb.embeddings).
        # It imports models, which the app registry allows only once ready: at the top, a
        # cycle with Django's app registry, which imports this module.
        import search.quality_gate  # noqa: F401


def _bm25_extension_create(sender: AppConfig, using: str, **kwargs: object) -> None:
    # After every migrate, so a server that gained the extension since gets it created.
    # The embedded server's library is built here the first time (and after an upgrade
    # changed its source), never when the server starts.
    connection = connections[using]
    embedded = connection.settings_dict.get("EMBEDDED_PGDATA")
    if embedded and not extension_built(embedded_pg_config()):
        try:
            call_command("kb_build_extension")
        except CommandError as exc:
            # Without a compiler search still works: BM25 runs in SQL. Migrate goes on.
            logging.getLogger(__name__).warning("%s", exc)
    extension_create(connection)
