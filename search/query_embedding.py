"""A query's embedding: embedded once by the model, then served from an in-process LRU."""

from __future__ import annotations

from collections import OrderedDict
from threading import Lock
from typing import TYPE_CHECKING

from kb import embeddings
from kb.models import ApiKey, EmbeddingModel, UsageRecord
from kb.usage.ledger import UsageBuffer, usage_record_create

if TYPE_CHECKING:
    from kb.selectors import Caller


class QueryVectorCache:
    """A small in-process LRU of query embeddings: repeated queries skip the model."""

    def __init__(self, size: int = 2048) -> None:
        self.size = size
        self._items: OrderedDict[tuple, list[float]] = OrderedDict()
        self._lock = Lock()

    def get(self, key: tuple) -> list[float] | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: tuple, value: list[float]) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def clear(self) -> None:
        """Forget every vector (kb_eval times each mode from an empty cache)."""
        with self._lock:
            self._items.clear()


query_vector_cache = QueryVectorCache()


def query_vector(
    *, model: EmbeddingModel, text: str, user: Caller | None = None,
    api_key: ApiKey | None = None, usage: UsageBuffer | None = None,
) -> list[float]:
    """The query's embedding, from the LRU when seen before (recorded as a cache hit)."""
    cached = cached_query_vector(model=model, text=text, user=user, api_key=api_key, usage=usage)
    if cached is not None:
        return cached
    vector = embeddings.embed_query(
        model=model, text=text, user=user, api_key=api_key, buffer=usage
    )
    query_vector_cache.put((model.pk, text), vector)
    return vector


def cached_query_vector(
    *, model: EmbeddingModel, text: str, user: Caller | None = None,
    api_key: ApiKey | None = None, usage: UsageBuffer | None = None,
) -> list[float] | None:
    """The query's embedding if the LRU has it (recorded as a cache hit), else None."""
    cached = query_vector_cache.get((model.pk, text))
    if cached is not None:
        usage_record_create(
            kind=UsageRecord.Kind.EMBEDDING, provider=embeddings.backend_for(model).provider_name,
            model=model.model_name or model.key, cache_hit=True, user=user, api_key=api_key,
            buffer=usage,
        )
    return cached
