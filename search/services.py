"""The search service: the one path every caller (API, chat, kb_eval) goes through."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import TYPE_CHECKING

from django.conf import settings

from kb import embeddings
from kb.models import ApiKey, EmbeddingModel, UsageRecord
from kb.ops.tracing import span, traced
from kb.providers import registry
from kb.providers.base import ProviderError, RerankBackend
from kb.usage.ledger import UsageBuffer, tracked_model_call, usage_record_create
from search import selectors
from search.filters import SearchFilters
from search.fusion import convex_fusion, reciprocal_rank_fusion
from search.highlight import highlighted_snippet
from search.query_embedding import cached_query_vector, query_vector_cache
from search.retrieval import Candidate, ChunkDetails, Retrieved, chunk_details, retrieve_candidates

if TYPE_CHECKING:
    from kb.selectors import Caller


logger = logging.getLogger(__name__)

MODES = ("bm25", "vector", "hybrid")
FUSIONS = ("rrf", "convex")
MAX_QUERY_CHARS = 4000


@dataclass(frozen=True)
class SearchParams:
    query: str
    k: int = 10
    mode: str = "hybrid"
    # None means "the configured default" (settings.KB_RERANK_DEFAULT).
    rerank: bool | None = None
    collections: tuple[str, ...] = ()
    document_ids: tuple[int, ...] = ()
    metadata: dict = field(default_factory=dict)
    created_after: datetime | None = None
    created_before: datetime | None = None
    fusion: str = "rrf"
    explain: bool = False
    candidates: int = 100


@dataclass
class SearchHit:
    chunk_id: int
    document_id: int
    document_title: str
    text: str
    snippet: str
    score: float
    heading_path: list
    page_start: int | None
    page_end: int | None
    stages: dict = field(default_factory=dict)


@dataclass(frozen=True)
class QueryEmbedding:
    """A query already embedded by the caller (chat embeds once for its cache and search)."""

    model: EmbeddingModel
    vector: list[float]


@dataclass(frozen=True)
class RetrievalEvidence:
    """How strongly the two retrievers agree that something matches, for chat's decision
    whether the documents cover a question (chat.answerability). Read from the candidates
    retrieval returned anyway: it costs no query.
    """

    # The best cosine similarity of the vector leg, and how far it stands above the
    # median candidate's: a peak means a real neighbour, a plateau only the nearest noise.
    top_similarity: float | None = None
    similarity_margin: float | None = None
    top_bm25: float | None = None
    # Chunks in both legs' top AGREEMENT_DEPTH, as a share of the smaller of the two.
    agreement: float = 0.0


AGREEMENT_DEPTH = 5


@dataclass
class SearchResult:
    hits: list[SearchHit]
    mode: str
    reranked: bool
    timings_ms: dict
    notices: list[str] = field(default_factory=list)
    query_lexemes: list[str] = field(default_factory=list)
    evidence: RetrievalEvidence = field(default_factory=RetrievalEvidence)


@dataclass(frozen=True)
class _Caller:
    """Whom a search's ledger rows are for, and where they go (usage None: written at once)."""

    user: Caller | None
    api_key: ApiKey | None
    usage: UsageBuffer | None


@dataclass(frozen=True)
class _QueryVector:
    """What the embedding step settled: the mode it leaves, and the query's vector if any."""

    mode: str
    model: EmbeddingModel | None = None
    vector: list[float] | None = None
    # The BM25 half, when it ran while the model embedded the query.
    keyword: Retrieved | None = None


Scored = list[tuple[Candidate, float]]
# A chunk's score and rank at one stage, by chunk id.
Positions = dict[int, tuple[float, int]]


@traced("search")
def search(
    *,
    params: SearchParams,
    user: Caller,
    api_key: ApiKey | None = None,
    record_usage: bool = True,
    embedded: QueryEmbedding | None = None,
    collection_ids: Sequence[int] | None = None,
    usage: UsageBuffer | None = None,
) -> SearchResult:
    """Hybrid (or single-mode) retrieval, fusion and optional reranking, with timings.

    `user` is the caller, whose readable collections are searched: request.user, or
    kb.selectors.SYSTEM for the product itself (there is no default).

    `embedded` is the query's vector when the caller has it already, from the model that
    is active for search; it is used instead of embedding the query again.
    `collection_ids` are the collections to search when the caller has already resolved
    them against what this user may read (params.collections is then not looked up again).
    `usage` holds the ledger rows for the caller to write later (chat, before its first token).
    With record_usage=False (kb_eval) the search writes no ledger row: neither its own nor
    those of the local or cached model calls it makes. A call that costs money is still
    written, ahead of the call (kb.usage.ledger.tracked_model_call).
    """
    started = time.perf_counter()
    timings: dict[str, float] = {}
    notices: list[str] = []
    # Unrecorded rows go to a buffer that nothing flushes.
    caller = _Caller(user=user, api_key=api_key, usage=usage if record_usage else UsageBuffer())
    # PostgreSQL text cannot hold NUL; anything else, however odd, goes through as data.
    text = params.query[:MAX_QUERY_CHARS].replace("\x00", " ")
    filters = _search_filters(params, collection_ids=collection_ids, user=user, api_key=api_key)
    limit = max(params.k, params.candidates)
    query = _query_vector_or_fallback(
        params.mode, text=text, embedded=embedded, caller=caller, timings=timings, notices=notices,
        keyword_half=lambda: _retrieve_timed(timings, "retrieve", mode="bm25", query=text,
                                             vector=None, filters=filters, model=None,
                                             limit=limit),
    )
    retrieved = _retrieve(query, text=text, filters=filters, limit=limit, k=params.k,
                          timings=timings)
    scored, fused = _fuse_timed(retrieved.candidates, mode=query.mode, fusion=params.fusion,
                                timings=timings)
    # Chunk text is read only for what is reranked or shown; None marks a chunk gone since.
    details: dict[int, ChunkDetails | None] = {}
    scored, reranked = _rerank_if_asked(params.rerank, text, scored, details=details, caller=caller,
                                        timings=timings, notices=notices)
    hits = _hits(scored, params=params, lexemes=retrieved.query_lexemes, fused=fused,
                 reranked=reranked, details=details, timings=timings)
    timings["total"] = _ms(started)
    if record_usage:
        usage_record_create(
            kind=UsageRecord.Kind.SEARCH, provider="postgres", model=query.mode,
            latency_ms=timings["total"], user=user, api_key=api_key, buffer=usage,
        )
    return SearchResult(hits=hits, mode=query.mode, reranked=reranked is not None,
                        timings_ms=timings, notices=notices, query_lexemes=retrieved.query_lexemes,
                        evidence=retrieval_evidence(retrieved.candidates))


def _search_filters(params: SearchParams, *, collection_ids: Sequence[int] | None,
                    user: Caller, api_key: ApiKey | None) -> SearchFilters:
    """The params' filters, over the collections the caller may search (resolved unless given)."""
    if collection_ids is None:
        collection_ids = selectors.collection_ids_for_search(
            user=user, slugs=params.collections, api_key=api_key
        )
    return SearchFilters(
        collection_ids=tuple(collection_ids),
        document_ids=tuple(params.document_ids),
        metadata=params.metadata,
        created_after=params.created_after,
        created_before=params.created_before,
    )


def _query_vector_or_fallback(
    mode: str, *, text: str, embedded: QueryEmbedding | None, caller: _Caller,
    keyword_half: Callable[[], Retrieved], timings: dict[str, float], notices: list[str],
) -> _QueryVector:
    """The query's vector for the vector and hybrid modes; BM25 alone, with a notice, when
    no model is active or the model fails. Given, cached, or embedded now."""
    if mode not in {"vector", "hybrid"} or not text.strip():
        return _QueryVector(mode)
    model = embedded.model if embedded is not None else selectors.embedding_model_for_search()
    if model is None:
        notices.append("No embedding model is active yet; showing keyword (BM25) results.")
        return _QueryVector("bm25")
    vector: list[float] | None
    if embedded is not None:
        vector = embedded.vector
    else:
        t = time.perf_counter()
        vector = cached_query_vector(model=model, text=text, user=caller.user,
                                     api_key=caller.api_key, usage=caller.usage)
        timings["embed"] = _ms(t)
    if vector is not None:
        return _QueryVector(mode, model, vector)
    vector, error, keyword = _embed_query(mode, model=model, text=text, caller=caller,
                                          keyword_half=keyword_half, timings=timings)
    if vector is None:
        logger.warning("Query embedding failed, falling back to BM25: %s", error)
        notices.append("The embedding service is unavailable; showing keyword (BM25) results only.")
        return _QueryVector("bm25", model, None, keyword)
    query_vector_cache.put((model.pk, text), vector)
    return _QueryVector(mode, model, vector, keyword)


def _embed_query(
    mode: str, *, model: EmbeddingModel, text: str, caller: _Caller,
    keyword_half: Callable[[], Retrieved], timings: dict[str, float],
) -> tuple[list[float] | None, ProviderError | None, Retrieved | None]:
    """The query's vector (None and the error if the model failed), and in hybrid mode the
    BM25 half, which needs no vector and so runs while the model embeds the query."""
    if mode == "hybrid":
        alongside = embeddings.embed_query_alongside(
            keyword_half, model=model, text=text, user=caller.user, api_key=caller.api_key,
            buffer=caller.usage,
        )
        timings["embed"] = round(alongside.latency_ms, 3)
        return alongside.vector, alongside.error, alongside.outcome
    t = time.perf_counter()
    vector = error = None
    try:
        vector = embeddings.embed_query(model=model, text=text, user=caller.user,
                                        api_key=caller.api_key, buffer=caller.usage)
    except ProviderError as exc:
        error = exc
    timings["embed"] = _ms(t)
    return vector, error, None


def _retrieve(query: _QueryVector, *, text: str, filters: SearchFilters, limit: int, k: int,
              timings: dict[str, float]) -> Retrieved:
    """The candidates of both halves (or of the mode's one), joining the BM25 half already
    run, and the vector half again exactly when filters starved HNSW."""
    keyword = query.keyword
    timed = partial(_retrieve_timed, timings, query=text, vector=query.vector, filters=filters,
                    model=query.model, limit=limit)
    if keyword is not None and query.vector is not None:
        retrieved = keyword.with_vector_candidates(timed("retrieve", mode="vector"))
    elif keyword is not None:
        retrieved = keyword
    else:
        # BM25 and vector retrieval are one SQL statement, so one span (kb.ops.tracing explains).
        retrieved = timed("retrieve", mode=query.mode)
    if query.vector is not None and retrieved.vector_count < k:
        # A selective filter (a small collection among large ones, a document, metadata,
        # dates) can leave HNSW with fewer than k rows: pgvector 0.8's iterative scan
        # (KB_HNSW_ITERATIVE_SCAN) goes on until hnsw.max_scan_tuples, and a server without
        # it stops at ef_search. Re-run exactly over the filtered rows so that k matching
        # rows give k results; with fewer than k matching rows in all, the exact scan is
        # over those few rows and cheap.
        exact = timed("retrieve_exact", mode="vector" if keyword else query.mode, exact_vector=True)
        retrieved = keyword.with_vector_candidates(exact) if keyword is not None else exact
    return retrieved


def _fuse_timed(candidates: list[Candidate], *, mode: str, fusion: str,
                timings: dict[str, float]) -> tuple[Scored, Positions]:
    """The candidates in fused order, and each one's fused score and rank."""
    t = time.perf_counter()
    with span("fuse", mode=mode, fusion=fusion, candidates=len(candidates)):
        scored = _fuse(candidates, mode=mode, fusion=fusion)
    timings["fuse"] = _ms(t)
    # Kept before reranking reorders the list, so explain can show both stages.
    return scored, {c.chunk_id: (score, rank) for rank, (c, score) in enumerate(scored, start=1)}


def _rerank_if_asked(
    rerank: bool | None, text: str, scored: Scored, *, details: dict[int, ChunkDetails | None],
    caller: _Caller, timings: dict[str, float], notices: list[str],
) -> tuple[Scored, Positions | None]:
    """The reranked order and the reranker's scores and ranks, when reranking is asked for
    and works; else the fused order, and None."""
    use_rerank = settings.KB_RERANK_DEFAULT if rerank is None else rerank
    if not use_rerank or not scored:
        return scored, None
    backend = registry.reranker_backend()
    if backend is None:
        notices.append(
            "Reranking is not configured (KB_PROVIDERS['reranker']); results are fused only."
        )
        return scored, None
    t = time.perf_counter()
    try:
        return _rerank(backend, text, scored, top_n=settings.KB_RERANK_TOP_N, details=details,
                       caller=caller)
    except ProviderError as exc:
        logger.warning("Reranker failed, keeping fused order: %s", exc)
        notices.append("The reranker is unavailable; results are in fused order.")
        return scored, None
    finally:
        timings["rerank"] = _ms(t)


def _hits(scored: Scored, *, params: SearchParams, lexemes: list[str], fused: Positions,
          reranked: Positions | None, details: dict[int, ChunkDetails | None],
          timings: dict[str, float]) -> list[SearchHit]:
    """The first k chunks still searchable, as hits (with per-stage scores when explained)."""
    t = time.perf_counter()
    shown = _with_details(scored, params.k, details)
    timings["chunks"] = _ms(t)
    hits = []
    for candidate, score, chunk in shown:
        hit = SearchHit(
            chunk_id=candidate.chunk_id,
            document_id=chunk.document_id,
            document_title=chunk.document_title,
            text=chunk.text,
            snippet=highlighted_snippet(chunk.text, lexemes),
            score=score,
            heading_path=chunk.heading_path,
            page_start=chunk.page_start,
            page_end=chunk.page_end,
        )
        if params.explain:
            fused_score, fused_rank = fused[candidate.chunk_id]
            rerank = reranked.get(candidate.chunk_id) if reranked is not None else None
            hit.stages = _explain(candidate, fused_score=fused_score, fused_rank=fused_rank,
                                  rerank=rerank)
        hits.append(hit)
    return hits


def retrieval_evidence(candidates: list[Candidate]) -> RetrievalEvidence:
    """The evidence summary of one retrieval's candidates (see RetrievalEvidence)."""
    similarities = sorted((c.vector_similarity for c in candidates
                           if c.vector_similarity is not None), reverse=True)
    bm25 = [c.bm25_score for c in candidates if c.bm25_score is not None]
    top_vector = {c.chunk_id for c in candidates
                  if c.vector_rank is not None and c.vector_rank <= AGREEMENT_DEPTH}
    top_bm25 = {c.chunk_id for c in candidates
                if c.bm25_rank is not None and c.bm25_rank <= AGREEMENT_DEPTH}
    return RetrievalEvidence(
        top_similarity=similarities[0] if similarities else None,
        similarity_margin=(similarities[0] - similarities[len(similarities) // 2]
                           if similarities else None),
        top_bm25=max(bm25) if bm25 else None,
        # Out of what both legs could agree on: a collection of three chunks has only three.
        agreement=len(top_vector & top_bm25) / max(1, min(len(top_vector), len(top_bm25))),
    )


def _fuse(candidates: list[Candidate], *, mode: str, fusion: str) -> Scored:
    if mode == "bm25":
        return sorted(((c, c.bm25_score or 0.0) for c in candidates if c.bm25_rank is not None),
                      key=lambda pair: (-pair[1], pair[0].chunk_id))
    if mode == "vector":
        return sorted(((c, c.vector_similarity or 0.0) for c in candidates
                       if c.vector_rank is not None),
                      key=lambda pair: (-pair[1], pair[0].chunk_id))
    if fusion == "convex":
        return convex_fusion(candidates, alpha=settings.KB_CONVEX_ALPHA)
    return reciprocal_rank_fusion(candidates, k=settings.KB_RRF_K)


def _with_details(
    scored: list[tuple[Candidate, float]], count: int, details: dict[int, ChunkDetails | None]
) -> list[tuple[Candidate, float, ChunkDetails]]:
    """The first `count` of `scored` whose chunks are still searchable, with their details.

    A chunk deleted or disabled since retrieval is skipped, and the next one takes its
    place. `details` holds what was read before (None for a chunk found gone) and gains
    what is read now.
    """
    found: list[tuple[Candidate, float, ChunkDetails]] = []
    position = 0
    while len(found) < count and position < len(scored):
        batch = scored[position:position + count - len(found)]
        position += len(batch)
        unread = [candidate.chunk_id for candidate, _ in batch if candidate.chunk_id not in details]
        if unread:
            read = chunk_details(unread)
            details.update({chunk_id: read.get(chunk_id) for chunk_id in unread})
        for candidate, score in batch:
            chunk = details[candidate.chunk_id]
            if chunk is not None:
                found.append((candidate, score, chunk))
    return found


def _rerank(backend: RerankBackend, query: str, scored: Scored, *, top_n: int,
            details: dict[int, ChunkDetails | None], caller: _Caller) -> tuple[Scored, Positions]:
    head = _with_details(scored, top_n, details)
    in_head = {candidate.chunk_id for candidate, _, _ in head}
    tail = [(candidate, score) for candidate, score in scored if candidate.chunk_id not in in_head]
    with (
        span("rerank", provider=backend.provider_name, model=backend.model, documents=len(head)),
        tracked_model_call(
            kind=UsageRecord.Kind.RERANK, provider=backend.provider_name, model=backend.model,
            user=caller.user, api_key=caller.api_key, write_ahead=backend.remote,
            buffer=caller.usage,
        ) as call,
    ):
        result = backend.rerank(query, [chunk.text for _, _, chunk in head])
        call.input_tokens = result.input_tokens
    order = sorted(range(len(head)), key=lambda i: (-result.scores[i], i))
    ranks = {head[i][0].chunk_id: (result.scores[i], rank) for rank, i in enumerate(order, start=1)}
    return [(head[i][0], result.scores[i]) for i in order] + tail, ranks


def _explain(candidate: Candidate, *, fused_score: float, fused_rank: int,
             rerank: tuple[float, int] | None) -> dict:
    stages = {
        "bm25": {"score": candidate.bm25_score, "rank": candidate.bm25_rank},
        "vector": {"similarity": candidate.vector_similarity, "rank": candidate.vector_rank},
        "fused": {"score": fused_score, "rank": fused_rank},
    }
    if rerank is not None:
        stages["rerank"] = {"score": rerank[0], "rank": rerank[1]}
    return stages


def _retrieve_timed(timings: dict[str, float], stage: str, *, mode: str, query: str,
                    vector: list[float] | None, filters: SearchFilters,
                    model: EmbeddingModel | None, limit: int,
                    exact_vector: bool = False) -> Retrieved:
    """retrieve_candidates for `mode`, in a span, its time added to timings[stage]."""
    t = time.perf_counter()
    span_attributes = {"exact_vector": True} if exact_vector else {}
    span_name = _retrieve_span_name(mode, vector)
    with span(span_name, mode=mode, limit=limit, **span_attributes) as retrieve_span:
        retrieved = retrieve_candidates(
            query=query,
            query_vector=vector,
            filters=filters,
            use_bm25=mode in {"bm25", "hybrid"},
            model_id=model.pk if model and vector is not None else None,
            dimensions=model.dimensions if model else None,
            limit=limit,
            exact_vector=exact_vector,
        )
        if retrieve_span is not None:
            retrieve_span.set_attribute("candidates", len(retrieved.candidates))
            if retrieved.bm25_engine is not None:
                retrieve_span.set_attribute("bm25_engine", retrieved.bm25_engine)
    timings[stage] = round(timings.get(stage, 0.0) + _ms(t), 3)
    return retrieved


def _retrieve_span_name(mode: str, vector: list[float] | None) -> str:
    parts = [name for name, used in (("bm25", mode in {"bm25", "hybrid"}),
                                     ("vector", vector is not None))
             if used]
    return "retrieve." + ("+".join(parts) or "none")


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
