"""The quality gate: a change to how search works must search as well as what it replaces.

Activating an embedding model runs it (activation_gate); a change of the BM25 engine or the
fusion and BM25 parameters, which are deployment settings, is checked before it is made
with `manage.py kb_quality_gate` (settings_gate).

For each collection (the largest GATE_COLLECTIONS), its golden set runs against both
models: the vector and hybrid modes, Recall@10 and MRR@10. A collection without a golden
set is measured on generated queries instead: words from a sample of its own chunks, each
expected to find the chunk's document; the verdict says so. The candidate is refused when
any figure falls more than KB_QUALITY_GATE_TOLERANCE below the active model's.

kb.embeddings calls it through activation_gate_set (kb imports nothing from search).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from django.conf import settings
from django.db.models import Count, Q
from django.test import override_settings

from kb.embeddings import activation_gate_set
from kb.models import Chunk, Collection, Document, EmbeddingModel
from kb.services.collections import collection_create, collection_delete
from kb.services.ingest import documents_ingest_batch
from kb.services.uploads import documents_upload
from search.golden import document_metrics, golden_set_version
from search.models import GoldenQuery, QualityGateRun

logger = logging.getLogger(__name__)

GATE_MODES = ("vector", "hybrid")
GATE_METRICS = ("recall@10", "mrr@10")
GATE_COLLECTIONS = 10
# Generated queries per collection without a golden set, and their length in words.
SAMPLE_QUERIES = 40
SAMPLE_QUERY_WORDS = 12


@dataclass
class CollectionVerdict:
    collection: str
    source: str
    queries: int
    current: dict[str, dict[str, float]]
    candidate: dict[str, dict[str, float]]
    worse: list[str]


def activation_gate(*, candidate: EmbeddingModel, current: EmbeddingModel,
                    override_reason: str = "") -> dict:
    """The gate's verdict, kept as a QualityGateRun: {"passed", "summary", "tolerance",
    "collections": [...]}."""
    tolerance = settings.KB_QUALITY_GATE_TOLERANCE
    verdicts = _compare(
        lambda collection, queries, qrels: _scores(collection, queries, qrels, current),
        lambda collection, queries, qrels: _scores(collection, queries, qrels, candidate),
        modes=GATE_MODES, tolerance=tolerance)
    verdict = _verdict(verdicts, candidate=candidate.key, current=current.key,
                       tolerance=tolerance)
    logger.info("Quality gate for %s: %s", candidate.key, verdict["summary"])
    QualityGateRun.objects.create(
        candidate=candidate, current=current, passed=verdict["passed"],
        summary=verdict["summary"], verdict=verdict,
        override_reason="" if verdict["passed"] else override_reason)
    return verdict


def quality_gate_latest(*, model: EmbeddingModel) -> QualityGateRun | None:
    """The gate's most recent verdict on activating the model, if it ran."""
    return QualityGateRun.objects.filter(candidate=model).order_by("-created_at").first()


def settings_gate(*, changes: dict[str, object]) -> dict:
    """The verdict on changing search settings (KB_BM25_ENGINE, KB_RRF_K, KB_BM25_K1,
    KB_BM25_B) to `changes`: each collection searched in the bm25 and hybrid modes with the
    settings as they are and as they would be, with the active embedding model."""
    tolerance = settings.KB_QUALITY_GATE_TOLERANCE
    model = EmbeddingModel.objects.filter(is_active=True).first()

    def with_changes(collection: Collection, queries: dict[str, str],
                     qrels: dict[str, dict[str, int]]) -> dict[str, dict[str, float]]:
        with override_settings(**changes):
            return _scores(collection, queries, qrels, model, modes=SETTINGS_MODES)

    verdicts = _compare(
        lambda collection, queries, qrels: _scores(collection, queries, qrels, model,
                                                   modes=SETTINGS_MODES),
        with_changes, modes=SETTINGS_MODES, tolerance=tolerance)
    described = ", ".join(f"{name}={value}" for name, value in changes.items())
    verdict = _verdict(verdicts, candidate=described, current="the current settings",
                       tolerance=tolerance)
    logger.info("Quality gate for %s: %s", described, verdict["summary"])
    return verdict


# A chunking change is measured on a copy of each collection chunked the new way: only
# collections up to this many documents are copied (the copy is ingested and embedded).
CHUNKING_MAX_DOCUMENTS = 500


def chunking_gate(*, max_tokens: int, overlap_tokens: int) -> dict:
    """The verdict on re-chunking with `max_tokens`/`overlap_tokens`: each measured
    collection's documents are ingested into a temporary copy chunked that way, the same
    questions (their expected documents mapped by file name) are searched in both, and the
    copy is deleted. Collections over CHUNKING_MAX_DOCUMENTS are not measured."""
    tolerance = settings.KB_QUALITY_GATE_TOLERANCE
    model = EmbeddingModel.objects.filter(is_active=True).first()
    copies: dict[int, tuple[Collection, dict[str, str]]] = {}

    def chunked_anew(collection: Collection, queries: dict[str, str],
                     qrels: dict[str, dict[str, int]]) -> dict[str, dict[str, float]]:
        copy, renamed = copies[collection.pk]
        mapped = {qid: {renamed[doc]: grade for doc, grade in expected.items() if doc in renamed}
                  for qid, expected in qrels.items()}
        return _scores(copy, queries, mapped, model, modes=SETTINGS_MODES)

    candidates = _collections()
    measured = [c for c in candidates if c.documents.filter(
        status=Document.Status.READY).count() <= CHUNKING_MAX_DOCUMENTS]
    too_large = [c.slug for c in candidates if c not in measured]
    try:
        for collection in measured:
            copies[collection.pk] = _chunked_copy(collection, max_tokens=max_tokens,
                                                  overlap_tokens=overlap_tokens)
        verdicts = _compare(
            lambda collection, queries, qrels: _scores(collection, queries, qrels, model,
                                                       modes=SETTINGS_MODES),
            chunked_anew, modes=SETTINGS_MODES, tolerance=tolerance,
            collections=measured)
    finally:
        for copy, _ in copies.values():
            collection_delete(collection=copy, force=True)
    described = f"chunks of {max_tokens} tokens with {overlap_tokens} of overlap"
    verdict = _verdict(verdicts, candidate=described, current="the current chunking",
                       tolerance=tolerance)
    if too_large:
        verdict["summary"] += (f" Not measured (over {CHUNKING_MAX_DOCUMENTS} documents): "
                               + ", ".join(too_large) + ".")
    logger.info("Quality gate for %s: %s", described, verdict["summary"])
    return verdict


def _chunked_copy(collection: Collection, *, max_tokens: int,
                  overlap_tokens: int) -> tuple[Collection, dict[str, str]]:
    """A temporary restricted copy of the collection's ready documents, chunked anew; and
    each original document id's copy id."""
    copy = collection_create(
        slug=f"quality-gate-{collection.pk}-{secrets.token_hex(4)}",
        name=f"Quality gate: {collection.name} re-chunked (temporary)",
        text_search_config=collection.text_search_config, is_public=False)
    originals = {}
    with override_settings(KB_CHUNK_MAX_TOKENS=max_tokens,
                           KB_CHUNK_OVERLAP_TOKENS=overlap_tokens):
        for document in Document.objects.filter(collection=collection,
                                                status=Document.Status.READY):
            with document.file.open("rb") as stored:
                data = stored.read()
            for outcome in documents_upload(collection=copy, filename=document.original_filename,
                                            data=data, queue=False):
                if outcome.document is not None:
                    originals[outcome.document.pk] = str(document.pk)
        documents_ingest_batch(document_ids=list(originals))
    return copy, {original: str(pk) for pk, original in originals.items()}


SETTINGS_MODES = ("bm25", "hybrid")
Scorer = Callable[[Collection, dict[str, str], dict[str, dict[str, int]]],
                  dict[str, dict[str, float]]]


def _compare(current: Scorer, candidate: Scorer, *, modes: Sequence[str],
             tolerance: float,
             collections: Sequence[Collection] | None = None) -> list[CollectionVerdict]:
    """Each measured collection's figures both ways, and what the candidate does worse."""
    verdicts = []
    for collection in _collections() if collections is None else collections:
        queries, qrels, source = _questions(collection)
        if not queries:
            continue
        before, after = current(collection, queries, qrels), candidate(collection, queries, qrels)
        worse = [f"{mode} {metric} {after[mode][metric]:.3f} < {before[mode][metric]:.3f}"
                 for mode in modes for metric in GATE_METRICS
                 if after[mode][metric] < before[mode][metric] - tolerance]
        verdicts.append(CollectionVerdict(
            collection=collection.slug, source=source, queries=len(queries),
            current=before, candidate=after, worse=worse))
    return verdicts


def _verdict(verdicts: list[CollectionVerdict], *, candidate: str, current: str,
             tolerance: float) -> dict:
    failed = [v for v in verdicts if v.worse]
    if not verdicts:
        summary = ("No collection has two ready documents or more to rank; nothing to "
                   "compare.")
    elif failed:
        summary = (f"{candidate} searches worse than {current} (beyond {tolerance:.2f}) in "
                   + "; ".join(f"{v.collection}: {', '.join(v.worse)}" for v in failed) + ".")
    else:
        summary = (f"{candidate} searches at least as well as {current} (within "
                   f"{tolerance:.2f}) in {len(verdicts)} collection(s).")
    generated = [v.collection for v in verdicts if v.source.startswith("generated")]
    if generated:
        summary += (" Measured on generated queries, not a golden set, for: "
                    + ", ".join(generated) + ".")
    return {"passed": not failed, "summary": summary, "tolerance": tolerance,
            "collections": [asdict(v) for v in verdicts]}


def _collections() -> list[Collection]:
    """The largest collections with something to rank: with one document, every model
    finds it first, and the comparison says nothing."""
    return list(Collection.objects.annotate(
        ready=Count("documents", filter=Q(documents__status=Document.Status.READY)))
        .filter(ready__gt=1).order_by("-ready", "pk")[:GATE_COLLECTIONS])


def _questions(collection: Collection) -> tuple[dict[str, str], dict[str, dict[str, int]], str]:
    """(queries, qrels, where they came from): the golden set, else generated queries."""
    golden = list(GoldenQuery.objects.filter(collection=collection)
                  .prefetch_related("documents").order_by("pk"))
    if golden:
        return ({str(q.pk): q.question for q in golden},
                {str(q.pk): {str(d.pk): 1 for d in q.documents.all()} for q in golden},
                f"golden set v{golden_set_version(collection=collection)}")
    chunks = Chunk.objects.filter(document__collection=collection, searchable=True,
                                  document__status=Document.Status.READY)
    # Evenly spaced by id; only the ids of a large collection are read, then the sample.
    ids = list(chunks.order_by("pk").values_list("pk", flat=True))
    count = len(ids)
    sample = ids[::max(1, count // SAMPLE_QUERIES)][:SAMPLE_QUERIES]
    queries, qrels = {}, {}
    for chunk in Chunk.objects.filter(pk__in=sample).order_by("pk").only("pk", "document_id",
                                                                         "text"):
        words = chunk.text.split()
        middle = max(0, len(words) // 2 - SAMPLE_QUERY_WORDS // 2)
        text = " ".join(words[middle:middle + SAMPLE_QUERY_WORDS])
        if text:
            queries[str(chunk.pk)] = text
            qrels[str(chunk.pk)] = {str(chunk.document_id): 1}
    return queries, qrels, f"generated from {len(queries)} of its {count} chunks"


def _scores(collection: Collection, queries: dict[str, str], qrels: dict[str, dict[str, int]],
            model: EmbeddingModel | None, *,
            modes: Sequence[str] = GATE_MODES) -> dict[str, dict[str, float]]:
    """Recall@10 and MRR@10 per mode, searching with `model`'s vectors."""
    return {mode: document_metrics(collection=collection, queries=queries, qrels=qrels,
                                   mode=mode, metrics=GATE_METRICS, model=model)
            for mode in modes}


activation_gate_set(activation_gate)
