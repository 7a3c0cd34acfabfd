"""The query-vector LRU: repeated queries skip the model; kb_eval starts each mode empty."""

from __future__ import annotations

from search.query_embedding import QueryVectorCache


def test_the_least_recently_used_vector_goes_first():
    """At its size, the cache drops the vector read or written longest ago."""
    cache = QueryVectorCache(size=2)
    cache.put((1, "a"), [1.0])
    cache.put((1, "b"), [2.0])
    assert cache.get((1, "a")) == [1.0]  # now the most recent

    cache.put((1, "c"), [3.0])

    assert cache.get((1, "b")) is None
    assert cache.get((1, "a")) == [1.0] and cache.get((1, "c")) == [3.0]


def test_clear_forgets_every_vector_and_keeps_the_size():
    cache = QueryVectorCache(size=3)
    cache.put((1, "a"), [1.0])

    cache.clear()

    assert cache.get((1, "a")) is None and cache.size == 3
