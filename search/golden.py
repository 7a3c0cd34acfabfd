"""Golden sets: a collection's real questions with the documents that should answer them.

Editors make them from the Quality screen (or the golden set admin), `kb_eval --golden
SLUG` runs them against the collection as it is, and they travel as BEIR directories
(corpus.jsonl, queries.jsonl, qrels/test.tsv), the format kb_eval reads. Every change
moves the set's version (GoldenSet.version), which each result names.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from django.db import transaction
from django.db.models import F

from kb.models import Chunk, Collection, Document, EmbeddingModel
from kb.selectors import SYSTEM, AnyUser, signed_in_user
from search import services
from search.evaluation import metrics_compute, run_from_rankings
from search.models import GoldenQuery, GoldenSet
from search.query_embedding import query_vector

GOLDEN_METRICS = ("recall@10", "mrr@10", "ndcg@10")
# Hits asked of search per question: enough for recall@10 on whole documents, whose
# chunks can fill several of the first places.
GOLDEN_K = 50


class GoldenSetError(ValueError):
    """A golden query or set that cannot be saved, imported or run; the message says why."""


@dataclass(frozen=True)
class GoldenResult:
    """One mode's figures on a collection's golden set."""

    collection: str
    version: int
    mode: str
    queries: int
    metrics: dict[str, float]


@transaction.atomic
def golden_query_save(
    *, collection: Collection, question: str, documents: Sequence[Document],
    user: AnyUser | None = None, source_message_id: str | None = None,
) -> GoldenQuery:
    """Add a question to the collection's golden set, or change the documents it expects."""
    question = " ".join(question.split())
    if not question:
        raise GoldenSetError("The question is empty.")
    if not documents:
        raise GoldenSetError("Name at least one document that answers the question.")
    strays = [str(d) for d in documents if d.collection_id != collection.pk]
    if strays:
        raise GoldenSetError(f"Not in {collection}: {', '.join(strays)}.")
    query, _ = GoldenQuery.objects.update_or_create(
        collection=collection, question=question,
        defaults={"source_message_id": source_message_id,
                  "created_by": signed_in_user(user) if user is not None else None},
    )
    query.documents.set(documents)
    golden_set_touch(collection=collection)
    return query


@transaction.atomic
def golden_query_update(*, query: GoldenQuery, question: str | None = None,
                        documents: Sequence[Document] | None = None) -> GoldenQuery:
    """Change a golden query's wording or the documents it expects (None: unchanged)."""
    if question is not None:
        question = " ".join(question.split())
        if not question:
            raise GoldenSetError("The question is empty.")
        query.question = question
        query.save(update_fields=["question", "updated_at"])
    if documents is not None:
        if not documents:
            raise GoldenSetError("Name at least one document that answers the question.")
        strays = [str(d) for d in documents if d.collection_id != query.collection_id]
        if strays:
            raise GoldenSetError(f"Not in {query.collection}: {', '.join(strays)}.")
        query.documents.set(documents)
    golden_set_touch(collection=query.collection)
    return query


@transaction.atomic
def golden_query_delete(*, query: GoldenQuery) -> None:
    """Remove a question from its collection's golden set."""
    collection = query.collection
    query.delete()
    golden_set_touch(collection=collection)


def golden_set_touch(*, collection: Collection) -> int:
    """Move the collection's golden set to its next version; returns it."""
    golden, _ = GoldenSet.objects.get_or_create(collection=collection)
    GoldenSet.objects.filter(pk=golden.pk).update(version=F("version") + 1)
    golden.refresh_from_db(fields=["version"])
    return golden.version


def golden_set_version(*, collection: Collection) -> int:
    return (GoldenSet.objects.filter(collection=collection)
            .values_list("version", flat=True).first() or 0)


def golden_set_evaluate(*, collection: Collection,
                        modes: Sequence[str] = ("bm25", "vector", "hybrid")
                        ) -> list[GoldenResult]:
    """Each golden question searched in the collection as it is now, scored per mode on
    whole documents (a document counts at its best chunk)."""
    queries = list(GoldenQuery.objects.filter(collection=collection)
                   .prefetch_related("documents").order_by("pk"))
    if not queries:
        raise GoldenSetError(f"{collection.slug} has no golden set yet: mark questions on the "
                             "Quality screen, or import one.")
    qrels = {str(q.pk): {str(d.pk): 1 for d in q.documents.all()} for q in queries}
    texts = {str(q.pk): q.question for q in queries}
    version = golden_set_version(collection=collection)
    return [GoldenResult(collection=collection.slug, version=version, mode=mode,
                         queries=len(queries),
                         metrics=document_metrics(collection=collection, queries=texts,
                                                  qrels=qrels, mode=mode,
                                                  metrics=GOLDEN_METRICS))
            for mode in modes]


def document_metrics(
    *, collection: Collection, queries: dict[str, str], qrels: dict[str, dict[str, int]],
    mode: str, metrics: Sequence[str], model: EmbeddingModel | None = None,
) -> dict[str, float]:
    """The queries searched in the collection in one mode, scored on whole documents (a
    document counts at its best chunk). With `model`, the vector leg uses that model's
    vectors instead of the active model's (the quality gate's candidate)."""
    rankings = {}
    for qid, text in queries.items():
        embedded = (services.QueryEmbedding(model=model,
                                            vector=query_vector(model=model, text=text))
                    if model is not None and mode != "bm25" else None)
        hits = services.search(
            params=services.SearchParams(query=text, k=GOLDEN_K, mode=mode, rerank=False),
            user=SYSTEM, collection_ids=(collection.pk,), record_usage=False,
            embedded=embedded,
        ).hits
        rankings[qid] = list(dict.fromkeys(str(hit.document_id) for hit in hits))
    return metrics_compute(qrels=qrels, run=run_from_rankings(rankings), metrics=metrics)


def golden_set_export(*, collection: Collection, path: Path) -> int:
    """Write the golden set as a BEIR directory (corpus ids are document ids); returns the
    number of questions. The corpus is the collection's ready documents, as searched."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "qrels").mkdir(exist_ok=True)
    queries = list(GoldenQuery.objects.filter(collection=collection)
                   .prefetch_related("documents").order_by("pk"))
    with (path / "corpus.jsonl").open("w") as corpus:
        for document in Document.objects.filter(collection=collection,
                                                status=Document.Status.READY).order_by("pk"):
            text = "\n\n".join(Chunk.objects.filter(document=document, searchable=True)
                               .order_by("ordinal").values_list("text", flat=True))
            corpus.write(json.dumps({"_id": str(document.pk), "title": str(document),
                                     "text": text}, ensure_ascii=False) + "\n")
    with (path / "queries.jsonl").open("w") as handle:
        for query in queries:
            handle.write(json.dumps({"_id": str(query.pk), "text": query.question},
                                    ensure_ascii=False) + "\n")
    with (path / "qrels" / "test.tsv").open("w") as handle:
        handle.write("query-id\tcorpus-id\tscore\n")
        for query in queries:
            for document in query.documents.all():
                handle.write(f"{query.pk}\t{document.pk}\t1\n")
    (path / "golden.json").write_text(json.dumps({
        "collection": collection.slug, "version": golden_set_version(collection=collection),
        "questions": len(queries)}))
    return len(queries)


@transaction.atomic
def golden_set_import(*, collection: Collection, path: Path,
                      user: AnyUser | None = None) -> tuple[int, int]:
    """Read a BEIR directory into the collection's golden set: (questions added or
    changed, questions skipped because no judged document is in the collection).

    A corpus id names a document of the collection by id (an export's own ids), else by
    title as the corpus gives it.
    """
    try:
        raw_queries = [json.loads(line) for line in
                       (path / "queries.jsonl").read_text().splitlines() if line.strip()]
        judged: dict[str, list[str]] = {}
        for number, line in enumerate((path / "qrels" / "test.tsv").read_text().splitlines()):
            parts = line.split("\t")
            if len(parts) >= 3 and not (number == 0 and not parts[2].lstrip("-").isdigit()) \
                    and int(parts[2]) > 0:
                judged.setdefault(parts[0], []).append(parts[1])
        titles = {}
        if (path / "corpus.jsonl").is_file():
            for line in (path / "corpus.jsonl").read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    titles[str(row["_id"])] = row.get("title") or ""
    except (OSError, ValueError, KeyError) as exc:
        raise GoldenSetError(f"{path} is not a BEIR directory: {exc}") from None
    documents = Document.objects.filter(collection=collection)
    by_pk = {str(d.pk): d for d in documents}
    by_title = {str(d): d for d in documents}
    saved = skipped = 0
    for row in raw_queries:
        qid, text = str(row.get("_id")), row.get("text") or ""
        found = [document for cid in judged.get(qid, [])
                 if (document := by_pk.get(cid) or by_title.get(titles.get(cid, "")))]
        if not text.strip() or not found:
            skipped += int(qid in judged)
            continue
        golden_query_save(collection=collection, question=text, documents=found, user=user)
        saved += 1
    return saved, skipped
