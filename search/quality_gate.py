"""The quality gate on activating an embedding model: the candidate must search as well as
the active model before it replaces it.

For each collection (the largest GATE_COLLECTIONS), its golden set runs against both
models: the vector and hybrid modes, Recall@10 and MRR@10. A collection without a golden
set is measured on generated queries instead: words from a sample of its own chunks, each
expected to find the chunk's document; the verdict says so. The candidate is refused when
any figure falls more than KB_QUALITY_GATE_TOLERANCE below the active model's.

kb.embeddings calls it through activation_gate_set (kb imports nothing from search).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from django.conf import settings
from django.db.models import Count, Q

from kb.embeddings import activation_gate_set
from kb.models import Chunk, Collection, Document, EmbeddingModel
from kb.selectors import SYSTEM
from search import services
from search.evaluation import metrics_compute, run_from_rankings
from search.golden import GOLDEN_K, golden_set_version
from search.models import GoldenQuery, QualityGateRun
from search.query_embedding import query_vector

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
    verdicts = []
    for collection in _collections():
        queries, qrels, source = _questions(collection)
        if not queries:
            continue
        scores = {model.key: _scores(collection, queries, qrels, model)
                  for model in (current, candidate)}
        worse = [f"{mode} {metric} {scores[candidate.key][mode][metric]:.3f} < "
                 f"{scores[current.key][mode][metric]:.3f}"
                 for mode in GATE_MODES for metric in GATE_METRICS
                 if scores[candidate.key][mode][metric]
                 < scores[current.key][mode][metric] - tolerance]
        verdicts.append(CollectionVerdict(
            collection=collection.slug, source=source, queries=len(queries),
            current=scores[current.key], candidate=scores[candidate.key], worse=worse))
    failed = [v for v in verdicts if v.worse]
    if not verdicts:
        summary = "No collection has documents to measure; nothing to compare."
    elif failed:
        summary = (f"{candidate.key} searches worse than {current.key} (beyond {tolerance:.2f}) "
                   "in " + "; ".join(f"{v.collection}: {', '.join(v.worse)}" for v in failed)
                   + ".")
    else:
        summary = (f"{candidate.key} searches at least as well as {current.key} (within "
                   f"{tolerance:.2f}) in {len(verdicts)} collection(s).")
    generated = [v.collection for v in verdicts if v.source.startswith("generated")]
    if generated:
        summary += (" Measured on generated queries, not a golden set, for: "
                    + ", ".join(generated) + ".")
    logger.info("Quality gate for %s: %s", candidate.key, summary)
    verdict = {"passed": not failed, "summary": summary, "tolerance": tolerance,
               "collections": [asdict(v) for v in verdicts]}
    QualityGateRun.objects.create(candidate=candidate, current=current, passed=not failed,
                                  summary=summary, verdict=verdict,
                                  override_reason=override_reason if failed else "")
    return verdict


def quality_gate_latest(*, model: EmbeddingModel) -> QualityGateRun | None:
    """The gate's most recent verdict on activating the model, if it ran."""
    return QualityGateRun.objects.filter(candidate=model).order_by("-created_at").first()


def _collections() -> list[Collection]:
    return list(Collection.objects.annotate(
        ready=Count("documents", filter=Q(documents__status=Document.Status.READY)))
        .filter(ready__gt=0).order_by("-ready", "pk")[:GATE_COLLECTIONS])


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
    count = chunks.count()
    step = max(1, count // SAMPLE_QUERIES)
    queries, qrels = {}, {}
    for chunk in chunks.order_by("pk").only("pk", "document_id", "text")[::step][:SAMPLE_QUERIES]:
        words = chunk.text.split()
        middle = max(0, len(words) // 2 - SAMPLE_QUERY_WORDS // 2)
        text = " ".join(words[middle:middle + SAMPLE_QUERY_WORDS])
        if text:
            queries[str(chunk.pk)] = text
            qrels[str(chunk.pk)] = {str(chunk.document_id): 1}
    return queries, qrels, f"generated from {len(queries)} of its {count} chunks"


def _scores(collection: Collection, queries: dict[str, str], qrels: dict[str, dict[str, int]],
            model: EmbeddingModel) -> dict[str, dict[str, float]]:
    """Recall@10 and MRR@10 per mode, searching with `model`'s vectors."""
    scores = {}
    for mode in GATE_MODES:
        rankings = {}
        for qid, text in queries.items():
            embedded = services.QueryEmbedding(model=model,
                                               vector=query_vector(model=model, text=text))
            hits = services.search(
                params=services.SearchParams(query=text, k=GOLDEN_K, mode=mode, rerank=False),
                user=SYSTEM, collection_ids=(collection.pk,), record_usage=False,
                embedded=embedded,
            ).hits
            rankings[qid] = list(dict.fromkeys(str(hit.document_id) for hit in hits))
        scores[mode] = metrics_compute(qrels=qrels, run=run_from_rankings(rankings),
                                       metrics=GATE_METRICS)
    return scores


activation_gate_set(activation_gate)
