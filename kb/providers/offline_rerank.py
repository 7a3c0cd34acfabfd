"""An offline reranker that needs no downloaded weights: the bundled bi-encoder, per sentence.

A chunk is embedded as a whole (up to 256 tokens), so one relevant sentence in a long
passage is diluted by the rest. This reranker embeds each sentence of the top passages
with the model already loaded for search, takes the best sentence's cosine to the query
(MaxSim), and fuses that ranking with the input (fused) order by weighted RRF:

    score(p) = w_prior / (k + rank_in(p)) + w_sentence / (k + rank_maxsim(p))

Rank fusion rather than score mixing, because cosines and fused scores live on
different scales. The input order is what search passes in: the fused ranking. The
defaults (w_prior 1, w_sentence 0.5, k 5: the fused order leads, MaxSim reorders
neighbours) were chosen on scifact's train queries; docs/RETRIEVAL.md has the figures.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from typing import Any

from kb.providers import registry
from kb.providers.base import RerankBackend, RerankResult

# A sentence ends at . ! ? followed by space and an upper-case letter, a digit or an
# opening bracket, or at a blank line. Abbreviations ("e.g. the") rarely match that.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\[])|\n\s*\n")
# Fragments shorter than this ("Background.", "Results were clear!") are glued to the
# next sentence, or to the previous one at the end: alone they embed to noise.
_MIN_SENTENCE_CHARS = 40


def sentences_split(text: str, *, max_sentences: int = 32) -> list[str]:
    """The passage's sentences (short fragments merged), at most max_sentences."""
    pieces = [p.strip() for p in _SENTENCE_END.split(text or "") if p and p.strip()]
    merged: list[str] = []
    pending = ""
    for piece in pieces:
        piece = f"{pending} {piece}" if pending else piece
        if len(piece) < _MIN_SENTENCE_CHARS:
            pending = piece
            continue
        pending = ""
        merged.append(piece)
    if pending:
        if merged:
            merged[-1] = f"{merged[-1]} {pending}"
        else:
            merged.append(pending)
    if len(merged) > max_sentences:
        # Keep the budget: fold the tail into the last kept sentence's neighbourhood.
        merged = [*merged[: max_sentences - 1], " ".join(merged[max_sentences - 1 :])]
    return merged or [text]


def weighted_rrf(
    rankings: Sequence[Sequence[int]], weights: Sequence[float], *, k: float
) -> list[float]:
    """Σ w / (k + rank) per item, ranks 1-based; rankings[i][j] is item j's rank in list i."""
    count = len(rankings[0]) if rankings else 0
    return [sum(w / (k + ranks[j]) for ranks, w in zip(rankings, weights, strict=True))
            for j in range(count)]


def ranks_of(values: Sequence[float]) -> list[int]:
    """1-based rank of each value, highest first; ties keep input order."""
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    ranks = [0] * len(values)
    for rank, index in enumerate(order, start=1):
        ranks[index] = rank
    return ranks


class SentenceMaxSimReranker(RerankBackend):
    """Reranks by the best-matching sentence under the bundled embedding model.

    Options: embedding (a KB_PROVIDERS['embedding'] key whose loaded model is reused;
    default KB_DEFAULT_EMBEDDING_MODEL), prior_weight (default 1.0), sentence_weight
    (default 0.5), rrf_k (default 5), max_sentences per passage (default 32).
    """

    provider_name = "offline"

    def __init__(self, *, model: str = "", **options: Any) -> None:
        super().__init__(model=model or "sentence-maxsim", **options)
        self.embedding_key: str | None = options.get("embedding") or None
        self.prior_weight = float(options.get("prior_weight", 1.0))
        self.sentence_weight = float(options.get("sentence_weight", 0.5))
        self.rrf_k = float(options.get("rrf_k", 5))
        self.max_sentences = int(options.get("max_sentences", 32))
        self._lock = threading.Lock()

    def embedder(self):
        """The embedding backend whose model is already loaded for search."""
        from django.conf import settings

        return registry.embedding_backend(self.embedding_key or settings.KB_DEFAULT_EMBEDDING_MODEL)

    def sentence_similarities(self, query: str, documents: Sequence[str]) -> list[float]:
        """Each document's best sentence cosine to the query."""
        import numpy

        backend = self.embedder()
        split = [sentences_split(d, max_sentences=self.max_sentences) for d in documents]
        flat = [s for sentences in split for s in sentences]
        result = backend.embed_batch([query, *flat])
        vectors = numpy.asarray(result.vectors, dtype=numpy.float32)
        cosines = vectors[1:] @ vectors[0]  # vectors are L2-normalised
        best, start = [], 0
        for sentences in split:
            best.append(float(cosines[start : start + len(sentences)].max()))
            start += len(sentences)
        return best

    def rerank(self, query: str, documents: Sequence[str]) -> RerankResult:
        if not documents:
            return RerankResult(scores=[])
        similarities = self.sentence_similarities(query, documents)
        prior = list(range(1, len(documents) + 1))
        scores = weighted_rrf([prior, ranks_of(similarities)],
                              [self.prior_weight, self.sentence_weight], k=self.rrf_k)
        return RerankResult(scores=scores)
