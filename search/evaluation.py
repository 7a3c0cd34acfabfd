"""Retrieval evaluation on BEIR-format datasets (corpus.jsonl, queries.jsonl, qrels/test.tsv).

A dataset is ingested through the real pipeline into its own collection, its test queries
go through `search.services.search` (the path the API takes), chunk hits are mapped back
to corpus ids, and nDCG@10, Recall@100 and MRR@10 are computed with ranx, so the figures
are comparable with the BEIR paper and Pyserini.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from django.conf import settings
from django.db import connection
from django.db.models import Exists, OuterRef
from django.test.utils import override_settings

from kb.embeddings import embedding_model_active_or_bootstrap
from kb.models import Chunk, ChunkEmbedding, Collection, Document, EmbeddingModel
from kb.services.collections import collection_get_or_create, collection_reindex
from kb.services.documents import document_delete
from kb.services.ingest import documents_ingest_batch
from kb.services.uploads import documents_upload
from search import query_embedding, services
from search.models import CollectionStatistic

if TYPE_CHECKING:
    from django.contrib.auth.models import User

METRICS = ("ndcg@10", "recall@100", "mrr@10")
MODES = ("bm25", "vector", "hybrid", "hybrid+rerank")
# Documents per documents_ingest_batch call: large enough for full embedding batches,
# small enough that an interrupted run keeps most of its work.
INGEST_GROUP = 256
FINGERPRINT_PREFIX = "kb_eval fingerprint: "
# Queries run as this plain account (no password, no staff rights), the way an API
# caller's would: it sees public collections, and kb_eval's collections are public.
EVAL_USERNAME = "kb-eval"


class EvaluationError(Exception):
    """The evaluation cannot give meaningful figures; the message says why."""


@dataclass(frozen=True)
class CorpusEntry:
    doc_id: str
    title: str
    text: str

    @property
    def data(self) -> bytes:
        """The uploaded file's bytes: the text, or the title for title-only entries (CACM)."""
        return (self.text if self.text.strip() else self.title).encode()


@dataclass(frozen=True)
class BeirDataset:
    name: str
    path: Path
    corpus: list[CorpusEntry]
    # Only the queries that have judgements in qrels/test.tsv, in qrels order.
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    corpus_sha256: str


@dataclass
class EvalCollection:
    """The dataset's collection and how its documents map back to corpus ids."""

    collection: Collection
    # Identical texts are one document (ingestion never stores a duplicate twice), so a
    # document can stand for several corpus ids; they are ranked together, as the tie
    # BEIR itself would see.
    doc_ids_by_document: dict[int, list[str]]
    ingested: int = 0
    reused: bool = False
    failures: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class ModeResult:
    mode: str
    metrics: dict[str, float]
    latencies_ms: list[float]
    queries: int
    notices: list[str] = field(default_factory=list)

    @property
    def p50_ms(self) -> float:
        return _percentile(self.latencies_ms, 50)

    @property
    def p95_ms(self) -> float:
        return _percentile(self.latencies_ms, 95)

    def as_dict(self) -> dict:
        return {
            "mode": self.mode, "queries": self.queries, **self.metrics,
            "p50_ms": round(self.p50_ms, 2), "p95_ms": round(self.p95_ms, 2),
            "notices": self.notices,
        }


def beir_dataset_load(*, path: Path, split: str = "test") -> BeirDataset:
    """Read a BEIR dataset directory; queries are those judged in qrels/<split>.tsv."""
    path = Path(path)
    corpus_file = path / "corpus.jsonl"
    digest = hashlib.sha256()
    corpus = []
    with corpus_file.open("rb") as handle:
        for raw in handle:
            digest.update(raw)
            if not raw.strip():
                continue
            row = json.loads(raw)
            corpus.append(CorpusEntry(
                doc_id=str(row["_id"]), title=row.get("title") or "", text=row.get("text") or "",
            ))
    qrels: dict[str, dict[str, int]] = {}
    with (path / "qrels" / f"{split}.tsv").open() as handle:
        for number, line in enumerate(handle):
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 3 or (number == 0 and not parts[2].lstrip("-").isdigit()):
                continue  # the header
            qrels.setdefault(parts[0], {})[parts[1]] = int(parts[2])
    all_queries = {}
    with (path / "queries.jsonl").open() as handle:
        for line in handle:
            if line.strip():
                row = json.loads(line)
                all_queries[str(row["_id"])] = row.get("text") or ""
    queries = {qid: all_queries[qid] for qid in qrels if qid in all_queries}
    return BeirDataset(
        name=path.resolve().name, path=path, corpus=corpus, queries=queries,
        qrels={qid: qrels[qid] for qid in queries}, corpus_sha256=digest.hexdigest(),
    )


def eval_collection_slug(*, dataset: BeirDataset) -> str:
    """`beir-<dirname>`, slugified."""
    return "beir-" + (re.sub(r"[^a-z0-9-]+", "-", dataset.name.lower()).strip("-") or "dataset")


def eval_user_get_or_create() -> User:
    """The account kb_eval searches as; created without a usable password."""
    from django.contrib.auth import get_user_model

    user, created = get_user_model().objects.get_or_create(username=EVAL_USERNAME)
    if created:
        user.set_unusable_password()
        user.save(update_fields=["password"])
    return user


def eval_fingerprint(*, dataset: BeirDataset) -> str:
    """What the collection's content depends on: the corpus bytes, chunking and the model."""
    model = EmbeddingModel.objects.filter(is_active=True).values_list("key", flat=True).first()
    return (
        f"corpus_sha256={dataset.corpus_sha256} "
        f"chunk_tokens={settings.KB_CHUNK_MAX_TOKENS}/{settings.KB_CHUNK_OVERLAP_TOKENS} "
        f"embedding={model or settings.KB_DEFAULT_EMBEDDING_MODEL}"
    )


def eval_collection_prepare(
    *, dataset: BeirDataset, progress: Callable[[int, int], object] | None = None,
    on_embedded: Callable[[int], object] | None = None,
) -> EvalCollection:
    """The dataset's collection, ingested through documents_upload + documents_ingest_batch.

    Reused as it is when its stored fingerprint matches and every document is ready;
    otherwise only what changed is uploaded and ingested (and a changed chunking or model
    re-ingests every document, reusing cached vectors where the inputs are unchanged).
    `progress(done, total)` is called after each group of documents.
    """
    collection = collection_get_or_create(
        slug=eval_collection_slug(dataset=dataset), name=f"BEIR {dataset.name}"
    )
    if collection.text_search_config != "english":
        Collection.objects.filter(pk=collection.pk).update(text_search_config="english")
        collection.refresh_from_db()
        collection_reindex(collection=collection)
    # Make sure an embedding model is active first: the fingerprint names it.
    embedding_model_active_or_bootstrap()
    fingerprint = eval_fingerprint(dataset=dataset)
    entries_by_hash: dict[str, list[CorpusEntry]] = {}
    for entry in dataset.corpus:
        if entry.data.strip():
            entries_by_hash.setdefault(hashlib.sha256(entry.data).hexdigest(), []).append(entry)

    stored_fingerprint = _stored_fingerprint(collection)
    documents = Document.objects.filter(collection=collection)
    ready = documents.filter(status=Document.Status.READY).values_list("content_hash", flat=True)
    reused = (stored_fingerprint == fingerprint and set(ready) == set(entries_by_hash)
              and documents.count() == len(entries_by_hash))
    result = EvalCollection(collection=collection, doc_ids_by_document={}, reused=reused)
    if not reused:
        _sync_documents(
            collection=collection, entries_by_hash=entries_by_hash, result=result,
            reingest_all=stored_fingerprint != fingerprint and documents.exists(),
            progress=progress, on_embedded=on_embedded,
        )
        Collection.objects.filter(pk=collection.pk).update(
            description=(
                f"BEIR {dataset.name}, ingested by kb_eval.\n"
                f"{FINGERPRINT_PREFIX}{fingerprint}"
            )
        )
        collection.refresh_from_db()
    result.doc_ids_by_document = eval_doc_ids_by_document(dataset=dataset, collection=collection)
    return result


def eval_doc_ids_by_document(
    *, dataset: BeirDataset, collection: Collection
) -> dict[int, list[str]]:
    """The corpus ids each ready document of the collection stands for, as the database has it
    now."""
    entries_by_hash: dict[str, list[CorpusEntry]] = {}
    for entry in dataset.corpus:
        if entry.data.strip():
            entries_by_hash.setdefault(hashlib.sha256(entry.data).hexdigest(), []).append(entry)
    mapping = {}
    for pk, content_hash in Document.objects.filter(
        collection=collection, status=Document.Status.READY
    ).values_list("pk", "content_hash"):
        entries = entries_by_hash.get(content_hash)
        if entries:
            mapping[pk] = [entry.doc_id for entry in entries]
    return mapping


def eval_collection_check(*, dataset: BeirDataset, prepared: EvalCollection) -> list[str]:
    """What would make the figures meaningless, read from the database as it is now.

    Every corpus entry must stand behind a ready document, every ready document must have
    searchable chunks, the BM25 statistics must count exactly those chunks, and each
    must have a vector from the active model. Figures computed over less are not the
    dataset's, whatever the process did before; kb_eval refuses to report them.
    """
    collection = prepared.collection
    problems = []
    mapped = {doc_id for doc_ids in prepared.doc_ids_by_document.values() for doc_id in doc_ids}
    expected = {entry.doc_id for entry in dataset.corpus if entry.data.strip()}
    # Uploads that were rejected name the corpus id; ingestion failures the file, <id>.txt.
    failed_names = {name for name, _ in prepared.failures}
    failed = {Path(name).stem for name in failed_names} | failed_names
    unmapped = expected - mapped - failed
    if unmapped:
        problems.append(f"{len(unmapped)} of {len(expected)} corpus entries have no ready document "
                        f"in {collection.slug} (e.g. {sorted(unmapped)[:3]})")
    searchable = Chunk.objects.filter(collection=collection, searchable=True)
    ready = Document.objects.filter(collection=collection, status=Document.Status.READY)
    without_chunks = ready.exclude(
        Exists(searchable.filter(document=OuterRef("pk")))
    ).count()
    if without_chunks:
        problems.append(f"{without_chunks} ready documents of {collection.slug} have no "
                        "searchable chunks")
    indexed = searchable.exclude(search_vector=None).count()
    statistic = CollectionStatistic.objects.filter(collection=collection).values_list(
        "chunk_count", flat=True).first() or 0
    if statistic != indexed:
        problems.append(f"the BM25 statistics of {collection.slug} count {statistic} chunks, "
                        f"but {indexed} are searchable")
    # Every chunk with a lexeme must have its postings (the BM25 index the queries read).
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(DISTINCT chunk_id) FROM search_posting "
                       "WHERE collection_id = %s", [collection.pk])
        (posted,) = cursor.fetchone()
    worded = searchable.filter(search_length__gt=0).count()
    if posted != worded:
        problems.append(f"{worded} searchable chunks of {collection.slug} have words, "
                        f"but {posted} have BM25 postings")
    model = EmbeddingModel.objects.filter(is_active=True).first()
    if model is not None:
        unembedded = searchable.exclude(Exists(ChunkEmbedding.objects.filter(
            chunk=OuterRef("pk"), embedding_model=model))).count()
        if unembedded:
            problems.append(f"{unembedded} searchable chunks of {collection.slug} have no "
                            f"{model.key} vector")
    return problems


def _stored_fingerprint(collection: Collection) -> str:
    for line in collection.description.splitlines():
        if line.startswith(FINGERPRINT_PREFIX):
            return line.removeprefix(FINGERPRINT_PREFIX)
    return ""


def _sync_documents(
    *, collection: Collection, entries_by_hash: dict[str, list[CorpusEntry]],
    result: EvalCollection,
    reingest_all: bool, progress: Callable[[int, int], object] | None,
    on_embedded: Callable[[int], object] | None,
) -> None:
    existing = dict(
        Document.objects.filter(collection=collection).values_list("content_hash", "status")
    )
    # Documents whose content left the corpus go; failed ones go too and are uploaded again.
    stale = Document.objects.filter(collection=collection).exclude(
        content_hash__in=list(entries_by_hash)
    ) | Document.objects.filter(collection=collection, status=Document.Status.FAILED)
    for document in list(stale):
        document_delete(document=document)
        existing.pop(document.content_hash, None)
    to_ingest: list[int] = []
    for content_hash, entries in entries_by_hash.items():
        status = existing.get(content_hash)
        if status == Document.Status.READY and not reingest_all:
            continue
        entry = entries[0]
        (outcome,) = documents_upload(
            collection=collection, filename=f"{entry.doc_id}.txt", data=entry.data,
            metadata={"title": entry.title, "beir_id": entry.doc_id}, queue=False,
        )
        if outcome.document is None or outcome.outcome == "rejected":
            result.failures.append((entry.doc_id, outcome.message))
            continue
        to_ingest.append(outcome.document.pk)
    to_ingest = list(dict.fromkeys(to_ingest))
    for start in range(0, len(to_ingest), INGEST_GROUP):
        group = to_ingest[start : start + INGEST_GROUP]
        for document in documents_ingest_batch(document_ids=group, on_embedded=on_embedded):
            if document.status != Document.Status.READY:
                result.failures.append((document.original_filename, document.error_message))
        result.ingested += len(group)
        if progress is not None:
            progress(min(start + INGEST_GROUP, len(to_ingest)), len(to_ingest))


def ranked_doc_ids(
    *, document_ids: Iterable[int], doc_ids_by_document: dict[int, list[str]]
) -> list[str]:
    """Corpus ids in rank order: a document counts at its first (best) chunk only."""
    seen: set[str] = set()
    ranked = []
    for document_id in document_ids:
        for doc_id in doc_ids_by_document.get(document_id, ()):
            if doc_id not in seen:
                seen.add(doc_id)
                ranked.append(doc_id)
    return ranked


def run_from_rankings(rankings: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    """A ranx run whose scores reproduce each ranking exactly (no ties to re-break)."""
    return {
        qid: {doc_id: float(len(ranked) - position) for position, doc_id in enumerate(ranked)}
        for qid, ranked in rankings.items()
    }


def metrics_compute(
    *, qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]],
    metrics: Sequence[str] = METRICS,
) -> dict[str, float]:
    """Mean metrics over the judged queries with ranx; a query with no results scores 0."""
    import warnings

    from ranx import Qrels, Run, evaluate

    run = {qid: run.get(qid) or {} for qid in qrels}
    # ranx rejects an empty ranking; a placeholder id that no qrels name scores 0 the same way.
    run = {qid: ranking or {"\x00none": 0.0} for qid, ranking in run.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numba's uint64 cast warning inside ranx
        scores = evaluate(Qrels(qrels), Run(run), list(metrics), make_comparable=True)
    if isinstance(scores, float):
        scores = {metrics[0]: scores}
    return {name: round(float(value), 4) for name, value in scores.items()}


@contextmanager
def retrieval_settings(
    *, k1: float | None = None, b: float | None = None, rrf_k: int | None = None,
    ef_search: int | None = None, reranker: dict | None = None,
) -> Iterator[None]:
    """Temporarily override BM25, RRF, HNSW and reranker settings for an evaluation run."""
    overrides: dict = {}
    if k1 is not None:
        overrides["KB_BM25_K1"] = k1
    if b is not None:
        overrides["KB_BM25_B"] = b
    if rrf_k is not None:
        overrides["KB_RRF_K"] = rrf_k
    if reranker is not None:
        overrides["KB_PROVIDERS"] = {**settings.KB_PROVIDERS, "reranker": reranker}
    with override_settings(**overrides):
        if ef_search is not None:
            with connection.cursor() as cursor:
                cursor.execute("SET hnsw.ef_search = %s", [int(ef_search)])
        try:
            yield
        finally:
            if ef_search is not None:
                with connection.cursor() as cursor:
                    cursor.execute("SET hnsw.ef_search = %s", [int(settings.KB_HNSW_EF_SEARCH)])


def mode_evaluate(
    *, dataset: BeirDataset, prepared: EvalCollection, mode: str, k: int = 100,
    candidates: int = 100, fusion: str = "rrf", limit_queries: int | None = None,
    on_query: Callable[[], object] | None = None,
) -> ModeResult:
    """Run the judged queries through search() in one mode and score the run."""
    search_mode, rerank = ("hybrid", True) if mode == "hybrid+rerank" else (mode, False)
    # Hits are mapped through the documents as they are now, not as they were when the
    # collection was prepared: one replaced since (a new pk) would otherwise score 0.
    prepared.doc_ids_by_document = eval_doc_ids_by_document(
        dataset=dataset, collection=prepared.collection
    )
    query_items = list(dataset.queries.items())[: limit_queries or None]
    collections = (prepared.collection.slug,)
    user = eval_user_get_or_create()

    def run_one(text: str) -> services.SearchResult:
        return services.search(
            params=services.SearchParams(
                query=text, k=k, mode=search_mode, rerank=rerank, collections=collections,
                candidates=max(k, candidates), fusion=fusion,
            ),
            user=user,
            record_usage=False,
        )

    # Latency includes query embedding: start each mode with an empty query-vector cache,
    # and load models with one untimed query first.
    query_embedding.query_vector_cache.clear()
    if query_items:
        run_one("warm up the models " + query_items[0][1][:50])
        _known_items_check(mode=mode, dataset=dataset, prepared=prepared, run_one=run_one)
    rankings: dict[str, list[str]] = {}
    latencies: list[float] = []
    notices: set[str] = set()
    for qid, text in query_items:
        started = time.perf_counter()
        result = run_one(text)
        latencies.append((time.perf_counter() - started) * 1000)
        notices.update(result.notices)
        rankings[qid] = ranked_doc_ids(
            document_ids=[hit.document_id for hit in result.hits],
            doc_ids_by_document=prepared.doc_ids_by_document,
        )
        if on_query is not None:
            on_query()
    if query_items and not any(rankings.values()):
        raise EvaluationError(
            f"{mode}: every query returned nothing; can {EVAL_USERNAME!r} search "
            f"{prepared.collection.slug!r}? ({'; '.join(sorted(notices)) or 'no notices'})"
        )
    qrels = {qid: dataset.qrels[qid] for qid, _ in query_items}
    return ModeResult(
        mode=mode, metrics=metrics_compute(qrels=qrels, run=run_from_rankings(rankings)),
        latencies_ms=latencies, queries=len(query_items), notices=sorted(notices),
    )


# Documents searched for by their own opening words before a mode is timed.
KNOWN_ITEMS = 20
KNOWN_ITEM_WORDS = 40
# Below this share found in their own top 10, the search this process runs does not see
# the collection the figures are about.
KNOWN_ITEMS_MIN_FOUND = 0.8


def _known_items_check(*, mode: str, dataset: BeirDataset, prepared: EvalCollection,
                       run_one: Callable[[str], services.SearchResult]) -> None:
    """Each of a spread of corpus documents must come back for its own opening words.

    The figures are computed through this process's search; whatever state it carries
    (caches, connections, an engine chosen earlier), a document that its own text does
    not find means they would not be the dataset's. Raises EvaluationError then.
    """
    entries = [entry for entry in dataset.corpus if entry.text.strip()]
    if not entries:
        return
    step = max(1, len(entries) // KNOWN_ITEMS)
    probes = entries[::step][:KNOWN_ITEMS]
    found = 0
    for entry in probes:
        result = run_one(" ".join(entry.text.split()[:KNOWN_ITEM_WORDS]))
        ranked = ranked_doc_ids(document_ids=[hit.document_id for hit in result.hits[:10]],
                                doc_ids_by_document=prepared.doc_ids_by_document)
        found += entry.doc_id in ranked
    if found < KNOWN_ITEMS_MIN_FOUND * len(probes):
        raise EvaluationError(
            f"{mode}: only {found} of {len(probes)} documents of {prepared.collection.slug} "
            "came back in the top 10 for their own opening words; the search does not see the "
            "collection the figures would be about, so none are reported."
        )


def results_table(results: Sequence[ModeResult]) -> str:
    """A plain-text table: one row per mode."""
    header = (
        f"{'mode':<15}{'nDCG@10':>9}{'R@100':>9}{'MRR@10':>9}"
        f"{'p50 ms':>9}{'p95 ms':>9}{'queries':>9}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r.mode:<15}{r.metrics['ndcg@10']:>9.4f}{r.metrics['recall@100']:>9.4f}"
            f"{r.metrics['mrr@10']:>9.4f}{r.p50_ms:>9.1f}{r.p95_ms:>9.1f}{r.queries:>9}"
        )
    return "\n".join(lines)


def reranker_entry_parse(value: str) -> dict:
    """`dotted.path[:model]` as a KB_PROVIDERS['reranker'] entry."""
    backend, _, model = value.partition(":")
    if not backend or "." not in backend:
        raise ValueError(f"--reranker must be a dotted path[:model], got {value!r}")
    return {"BACKEND": backend, "MODEL": model} if model else {"BACKEND": backend}


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    import numpy

    return float(numpy.percentile(values, q))
