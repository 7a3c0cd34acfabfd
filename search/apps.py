from django.apps import AppConfig
from django.db.models.signals import post_migrate


class SearchConfig(AppConfig):
    name = "search"
    verbose_name = "Search"

    def ready(self) -> None:
        post_migrate.connect(_bm25_extension_create, sender=self)


def _bm25_extension_create(sender, using: str, **kwargs) -> None:
    # After every migrate, so a server that gained the extension since gets it created.
    from django.db import connections

    from search.postgres_extension import extension_create

    extension_create(connections[using])
