"""Fusing the BM25 and vector candidate lists into one ranking."""

from __future__ import annotations

from collections.abc import Sequence

from search.retrieval import Candidate


def reciprocal_rank_fusion(
    candidates: Sequence[Candidate], *, k: int = 60
) -> list[tuple[Candidate, float]]:
    """RRF (Cormack et al. 2009): Σ 1 / (k + rank) over the lists a candidate appears in."""
    scored = []
    for candidate in candidates:
        score = 0.0
        if candidate.bm25_rank is not None:
            score += 1.0 / (k + candidate.bm25_rank)
        if candidate.vector_rank is not None:
            score += 1.0 / (k + candidate.vector_rank)
        scored.append((candidate, score))
    return _sorted(scored)


def convex_fusion(
    candidates: Sequence[Candidate], *, alpha: float = 0.5
) -> list[tuple[Candidate, float]]:
    """Convex combination α·bm25' + (1−α)·cos' of min-max normalised scores.

    A candidate missing from one list gets 0 for that list, the bottom of its range.
    """
    bm25 = [c.bm25_score for c in candidates if c.bm25_score is not None]
    cosine = [c.vector_similarity for c in candidates if c.vector_similarity is not None]

    def normalise(value: float | None, values: list[float]) -> float:
        if value is None or not values:
            return 0.0
        low, high = min(values), max(values)
        return 1.0 if high == low else (value - low) / (high - low)

    return _sorted([
        (
            c,
            alpha * normalise(c.bm25_score, bm25)
            + (1 - alpha) * normalise(c.vector_similarity, cosine),
        )
        for c in candidates
    ])


def _sorted(scored: list[tuple[Candidate, float]]) -> list[tuple[Candidate, float]]:
    # Ties broken by chunk id so results are stable across runs.
    return sorted(scored, key=lambda pair: (-pair[1], pair[0].chunk_id))
