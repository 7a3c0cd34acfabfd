"""Reads for search: which collections a caller may search, which model serves vectors."""

from __future__ import annotations

from collections.abc import Sequence

from django.db.models import Q

from kb.models import Collection, EmbeddingModel


def collections_visible_to(*, user) -> Q:
    """The filter for collections a user may read: public ones, or all for superusers."""
    if user is not None and getattr(user, "is_superuser", False):
        return Q()
    return Q(is_public=True)


def collection_ids_for_search(*, user, slugs: Sequence[str] = ()) -> list[int]:
    """Ids of the named collections (all when none are named) that the user may search."""
    queryset = Collection.objects.filter(collections_visible_to(user=user))
    if slugs:
        queryset = queryset.filter(slug__in=list(slugs))
    return list(queryset.values_list("pk", flat=True))


def embedding_model_for_search() -> EmbeddingModel | None:
    """The active embedding model; search uses only its vectors."""
    return EmbeddingModel.objects.filter(is_active=True).first()
