"""The answer cache: an exact match on the normalised question, then a semantic match.

Entries are keyed by a *knowledge-base version*: a string built from the collection's
`updated_at`, which kb.services.collections.collection_touch bumps on every change to
what search can see (ingest, disable, enable, delete, move, reindex). An entry written
under an older version never matches, and is deleted the next time an answer is stored in
its scope (not on lookup, which is on the path to the first token). Deleting or
re-uploading a document also deletes the entries it was a source of at once (chat.signals).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING

from django.conf import settings
from django.db import connection
from django.db.models import F, Q
from django.utils import timezone

from chat.models import AnswerCacheEntry
from kb.models import ApiKey, Collection
from search.selectors import collections_visible_to
from search.vector import vector_literal

if TYPE_CHECKING:
    from kb.selectors import Caller

_SPACES = re.compile(r"\s+")
# Trailing punctuation and filler that do not change what is asked.
_TRAILING = re.compile(r"[\s?!.。？！]+$")


@dataclass(frozen=True)
class CacheHit:
    entry: AnswerCacheEntry
    kind: str  # "exact" | "semantic"
    similarity: float


def question_normalize(text: str) -> str:
    """The question as the exact cache compares it: NFKC, case-folded, spaces collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = _SPACES.sub(" ", text).strip()
    return _TRAILING.sub("", text)


def cache_key(*, question: str, kb_version: str) -> str:
    """sha256 of the knowledge-base version and the normalised question."""
    return hashlib.sha256(f"{kb_version}\n{question_normalize(question)}".encode()).hexdigest()


def kb_version(
    *, collection: Collection | None, user: Caller, api_key: ApiKey | None = None
) -> str:
    """The version of what a question over `collection` (None: all visible ones) can see.

    "<scope>@<stamp>": the scope names the collection (or which set of collections is
    visible), the stamp changes whenever any of its documents change.
    """
    if collection is not None:
        stamp = (
            Collection.objects.filter(pk=collection.pk).values_list("updated_at", flat=True).first()
        )
        return _collection_version(collection.pk, stamp)
    # The digest covers exactly the collections this caller can see, so an answer built
    # from collections another caller cannot see is never served to them.
    scope = "all-superuser" if getattr(user, "is_superuser", False) else "all"
    rows = (
        Collection.objects.filter(collections_visible_to(user=user, api_key=api_key))
        .order_by("pk")
        .values_list("pk", "updated_at")
    )
    digest = hashlib.sha256(
        ";".join(f"{pk}:{updated.isoformat()}" for pk, updated in rows).encode()
    ).hexdigest()[:24]
    return f"{scope}@{digest}"


def collection_version(collection: Collection) -> str:
    """kb_version of one collection from its row as just read: the caller read it in the
    same trip to the database, so no second read is needed for the stamp."""
    return _collection_version(collection.pk, collection.updated_at)


def collections_version(collections: Sequence[Collection]) -> str:
    """kb_version of several collections chosen together, from their rows as just read."""
    ids = ",".join(str(c.pk) for c in sorted(collections, key=lambda c: c.pk))
    stamps = ";".join(f"{c.pk}:{c.updated_at.isoformat()}"
                      for c in sorted(collections, key=lambda c: c.pk))
    scope = hashlib.sha256(ids.encode()).hexdigest()[:16]
    return f"s{scope}@{hashlib.sha256(stamps.encode()).hexdigest()[:24]}"


def _collection_version(pk: int, stamp: datetime | None) -> str:
    return f"c{pk}@{stamp.isoformat() if stamp else 'gone'}"


def cache_lookup(
    *, question: str, kb_version: str, vector: Sequence[float] | None = None,
    embedding_model: str = "", threshold: float | None = None,
) -> CacheHit | None:
    """The exact entry for the question, else the nearest above the threshold.

    One statement (_cache_nearest_entry), run before the first token: the exact entry wins,
    then the nearest of the same embedding model; the entry itself is loaded only for a hit.
    """
    key = cache_key(question=question, kb_version=kb_version)
    found = _cache_nearest_entry(key=key, kb_version=kb_version, vector=vector,
                                 embedding_model=embedding_model)
    if found is None:
        return None
    pk, exact, distance = found
    if exact:
        kind, similarity = "exact", 1.0
    elif distance is None:  # not reached: a row other than the question's has a vector
        return None
    else:
        threshold = settings.KB_SEMANTIC_CACHE_THRESHOLD if threshold is None else threshold
        kind, similarity = "semantic", 1.0 - float(distance)
        if similarity < threshold:
            return None
    entry = AnswerCacheEntry.objects.filter(pk=pk).first()
    return CacheHit(entry=entry, kind=kind, similarity=similarity) if entry else None


def _cache_nearest_entry(
    *, key: str, kb_version: str, vector: Sequence[float] | None, embedding_model: str
) -> tuple[int, bool, float | None] | None:
    """(id, exact, distance) of the best entry: the question's own first, then the nearest.

    Raw SQL because it runs on every chat turn before the first token, and the ORM took
    about 3 ms to compile the equivalent query (the statement itself runs in 0.1 ms).
    """
    ttl = settings.KB_CACHE_TTL_SECONDS
    params = {
        "key": key, "kb_version": kb_version, "model": embedding_model,
        "vector": vector_literal(vector) if vector is not None else None,
        "fresh_after": timezone.now() - timedelta(seconds=ttl) if ttl > 0 else None,
    }
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            SELECT id, key = %(key)s AS exact,
                   -- Only vectors of the same model compare (another's may differ in size).
                   CASE WHEN embedding_model = %(model)s THEN embedding <=> %(vector)s::vector END
                   AS distance
            FROM {AnswerCacheEntry._meta.db_table}
            WHERE kb_version = %(kb_version)s
              AND (%(fresh_after)s::timestamptz IS NULL OR created_at >= %(fresh_after)s)
              AND (key = %(key)s OR (%(vector)s::vector IS NOT NULL AND embedding_model = %(model)s
                                     AND embedding IS NOT NULL))
            ORDER BY exact DESC, distance ASC NULLS LAST, created_at DESC
            LIMIT 1
            """,
            params,
        )
        return cursor.fetchone()


def cache_hit_record(*, entry: AnswerCacheEntry) -> None:
    """Count a hit on an entry."""
    AnswerCacheEntry.objects.filter(pk=entry.pk).update(
        hits=F("hits") + 1, last_hit_at=timezone.now()
    )


def cache_store(
    *,
    question: str,
    collection: Collection | None,
    kb_version: str,
    vector: Sequence[float] | None,
    embedding_model: str,
    answer: str,
    mode: str,
    citations: list[dict],
    cited: list[int],
    source_document_ids: Sequence[int],
    provider: str,
    model: str,
    input_tokens: int,
    output_tokens: int,
    cost_usd: Decimal,
) -> AnswerCacheEntry:
    """Remember a complete answer for its question and knowledge-base version.

    Entries of the same scope written under an older version, or expired, go first.
    """
    cache_purge_stale(kb_version=kb_version)
    return AnswerCacheEntry.objects.create(
        question=question_normalize(question),
        key=cache_key(question=question, kb_version=kb_version),
        collection=collection,
        kb_version=kb_version,
        embedding=list(vector) if vector is not None else None,
        embedding_model=embedding_model if vector is not None else "",
        answer=answer,
        mode=mode,
        citations=citations,
        cited=cited,
        source_document_ids=sorted(set(source_document_ids)),
        provider=provider,
        model=model,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cost_usd=cost_usd,
    )


def cache_purge_stale(*, kb_version: str) -> int:
    """Delete entries of kb_version's scope written under another version, and expired ones."""
    scope = kb_version.partition("@")[0] + "@"
    stale = Q(kb_version__startswith=scope) & ~Q(kb_version=kb_version)
    ttl = settings.KB_CACHE_TTL_SECONDS
    if ttl > 0:
        stale |= Q(created_at__lt=timezone.now() - timedelta(seconds=ttl))
    deleted, _ = AnswerCacheEntry.objects.filter(stale).delete()
    return deleted


def cache_invalidate_documents(*, document_ids: Sequence[int]) -> int:
    """Delete every entry whose answer drew on any of these documents."""
    if not document_ids:
        return 0
    deleted, _ = AnswerCacheEntry.objects.filter(
        source_document_ids__overlap=list(document_ids)
    ).delete()
    return deleted


def cache_clear(*, entry_ids: Sequence[int] | None = None) -> int:
    """Delete the given entries, or the whole cache."""
    queryset = AnswerCacheEntry.objects.all()
    if entry_ids is not None:
        queryset = queryset.filter(pk__in=list(entry_ids))
    deleted, _ = queryset.delete()
    return deleted
