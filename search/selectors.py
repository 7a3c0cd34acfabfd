"""Reads for search: which collections a caller may search, which model serves vectors."""

from __future__ import annotations

from collections.abc import Sequence

from kb.models import ApiKey, Collection, EmbeddingModel
from kb.selectors import Caller, collections_visible_to


def collection_ids_for_search(
    *, user: Caller, slugs: Sequence[str] = (), api_key: ApiKey | None = None,
) -> list[int]:
    """Ids of the named collections (all when none are named) that the caller may search."""
    queryset = Collection.objects.filter(collections_visible_to(user=user, api_key=api_key))
    if slugs:
        queryset = queryset.filter(slug__in=list(slugs))
    return list(queryset.values_list("pk", flat=True))


def embedding_model_for_search() -> EmbeddingModel | None:
    """The active embedding model; search uses only its vectors."""
    return EmbeddingModel.objects.filter(is_active=True).first()
