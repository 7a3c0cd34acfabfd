"""Whether the retrieved passages can answer a question at all, from retrieval evidence.

Vector search always returns neighbours, so "something was found" says nothing. Three
signals do:

- coverage: the share of the query's idf mass that the best of the top passages matches
  (search.bm25.query_term_coverage). "Capital of Mongolia?" over API docs matches
  no content word; an in-scope question matches most of its rare ones.
- the vector leg's best cosine similarity;
- agreement: how many chunks both legs put in their top 5.

They are combined by a logistic model, which is what calibrates the raw cosine (whose
scale means nothing by itself) into a probability; its coefficients were fitted on a
labelled set
(in-scope benchmark questions, and questions asked of the wrong collection or nonsense:
benchmarks/answerability.py prints the fit and the error rates; docs/CHAT.md reports
them). The result is a probability that the documents cover the question; below
KB_CHAT_ANSWERABLE_THRESHOLD the chat says they do not, and asks no model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from django.conf import settings

from kb.models import Chunk
from search.bm25 import query_lexemes, query_term_coverage
from search.services import SearchResult

# How many of the top passages may supply the coverage (the best one counts).
COVERAGE_DEPTH = 3

# Fitted by benchmarks/answerability.py (logistic regression on standardised features,
# folded back to raw units here). Order: intercept, coverage, top similarity, agreement.
# The similarity's margin over the median candidate is measured but left out: on the
# BEIR abstracts it only stood for how alike a collection's documents are (a small
# collection of varied prose has a low median), and it turned covered questions over
# the demo documents away.
COEFFICIENTS = (-5.811, 3.039, 14.130, -0.156)

# Without a vector leg (no model, or the embedding service down) coverage decides alone.
COVERAGE_ALONE = 0.6


@dataclass(frozen=True)
class Answerability:
    """The decision and the evidence behind it (logged, and useful when tuning)."""

    answerable: bool
    probability: float
    coverage: float
    top_similarity: float | None
    similarity_margin: float | None
    agreement: float

    def describe(self) -> str:
        sim = "-" if self.top_similarity is None else f"{self.top_similarity:.3f}"
        margin = "-" if self.similarity_margin is None else f"{self.similarity_margin:.3f}"
        return (f"p={self.probability:.3f} coverage={self.coverage:.3f} similarity={sim} "
                f"margin={margin} agreement={self.agreement:.2f}")


def answerability_probability(
    *, coverage: float, top_similarity: float | None, agreement: float,
    coefficients: Sequence[float] = COEFFICIENTS,
) -> float:
    """The logistic model's probability that the documents cover the question."""
    if top_similarity is None:
        # Coverage alone, mapped so that COVERAGE_ALONE lands on the threshold's side.
        return 1.0 if coverage >= COVERAGE_ALONE else 0.0
    intercept, w_coverage, w_similarity, w_agreement = coefficients
    z = intercept + w_coverage * coverage + w_similarity * top_similarity + w_agreement * agreement
    return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z))))


def answerability_assess(
    *, result: SearchResult, threshold: float | None = None, follow_up: str | None = None,
) -> Answerability:
    """Decide from a search result whether its passages can answer its query.

    `follow_up`: the user's own words when the query searched was built from them and the
    conversation before (a follow-up); those words must then be found too
    (_follow_up_strays). Costs one small indexed query (the coverage of the top passages),
    two more for a follow-up.
    """
    threshold = settings.KB_CHAT_ANSWERABLE_THRESHOLD if threshold is None else threshold
    evidence = result.evidence
    top = [hit.chunk_id for hit in result.hits[:COVERAGE_DEPTH]]
    coverage = max(query_term_coverage(chunk_ids=top, lexemes=result.query_lexemes).values(),
                   default=0.0)
    probability = answerability_probability(
        coverage=coverage, top_similarity=evidence.top_similarity, agreement=evidence.agreement,
    )
    answerable = bool(result.hits) and probability >= threshold
    if answerable and follow_up is not None:
        answerable = not _follow_up_strays(question=follow_up, top=top)
    return Answerability(
        answerable=answerable,
        probability=probability,
        coverage=coverage,
        top_similarity=evidence.top_similarity,
        similarity_margin=evidence.similarity_margin,
        agreement=evidence.agreement,
    )


# A follow-up with at least this many words of its own, none of them in the passages found,
# asks something new: the passages answer the question before it.
FOLLOW_UP_OWN_WORDS = 2


def _follow_up_strays(*, question: str, top: list[int]) -> bool:
    """Whether a follow-up, searched together with the question before it, brings words of
    its own (at least FOLLOW_UP_OWN_WORDS) of which none is in the top passages.

    Its search then finds the previous topic, with good evidence, and would answer that
    again ("zxqv blorptang" or "Capital of Mongolia?" after a real question). A short
    follow-up ("And for PDFs?", "what about the second one?") has too few words of its own
    to tell, and keeps the combined decision. Costs two small queries, for follow-ups only.
    """
    if not top:
        return False
    collection_ids = tuple(
        Chunk.objects.filter(pk__in=top).values_list("collection_id", flat=True).distinct()
    )
    own = query_lexemes(query=question, collection_ids=collection_ids)
    if len(own) < FOLLOW_UP_OWN_WORDS:
        return False
    return max(query_term_coverage(chunk_ids=top, lexemes=own).values(), default=0.0) == 0.0
