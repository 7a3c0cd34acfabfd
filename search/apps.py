from django.apps import AppConfig
from django.db.backends.signals import connection_created


def _set_hnsw_ef_search(sender, connection, **kwargs) -> None:
    # Once per connection, not per query: ef_search is the HNSW candidate-list size.
    from django.conf import settings

    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SET hnsw.ef_search = %s", [int(settings.KB_HNSW_EF_SEARCH)])


class SearchConfig(AppConfig):
    name = "search"
    verbose_name = "Search"

    def ready(self) -> None:
        connection_created.connect(_set_hnsw_ef_search, dispatch_uid="search_hnsw_ef_search")
