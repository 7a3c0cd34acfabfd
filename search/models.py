"""The BM25 index: postings and per-collection statistics, maintained by triggers on kb_chunk.

The triggers live in migration 0002_bm25_index; search.bm25 states the formula.
"""

from django.conf import settings
from django.db import models

from kb.models import Collection


class CollectionStatistic(models.Model):
    """N and the summed document length of a collection's searchable chunks."""

    collection = models.OneToOneField(
        Collection, on_delete=models.CASCADE, primary_key=True, related_name="bm25_statistic"
    )
    chunk_count = models.BigIntegerField(default=0)
    total_length = models.BigIntegerField(default=0)

    def __str__(self) -> str:
        return f"{self.collection_id}: {self.chunk_count} chunks"

    @property
    def average_length(self) -> float:
        return self.total_length / self.chunk_count if self.chunk_count else 0.0


class TermStatistic(models.Model):
    """Document frequency of one lexeme among a collection's searchable chunks."""

    pk = models.CompositePrimaryKey("collection_id", "lexeme")
    collection = models.ForeignKey(Collection, on_delete=models.CASCADE, related_name="+")
    lexeme = models.TextField()
    document_frequency = models.BigIntegerField(default=0)

    def __str__(self) -> str:
        return f"{self.collection_id}:{self.lexeme}={self.document_frequency}"


class Posting(models.Model):
    """One (lexeme, chunk) entry of a collection's inverted index, for searchable chunks.

    The table is created by migration 0002_bm25_index with a covering primary key
    (collection_id, lexeme, chunk_id) INCLUDE (term_frequency, chunk_length), so BM25 reads
    a query term's postings with an index-only scan. Rows are written only by triggers.
    """

    pk = models.CompositePrimaryKey("collection_id", "lexeme", "chunk_id")
    collection_id = models.BigIntegerField()
    lexeme = models.TextField()
    chunk_id = models.BigIntegerField()
    term_frequency = models.IntegerField()
    chunk_length = models.IntegerField()

    class Meta:
        db_table = "search_posting"

    def __str__(self) -> str:
        return f"{self.lexeme}@{self.chunk_id}×{self.term_frequency}"


class GoldenQuery(models.Model):
    """A real question and the documents that should answer it: one entry of its
    collection's golden set, which kb_eval --golden runs and the quality gate compares."""

    collection = models.ForeignKey(Collection, on_delete=models.CASCADE,
                                   related_name="golden_queries")
    question = models.TextField()
    documents = models.ManyToManyField(
        "kb.Document", related_name="+",
        help_text="The documents a good search returns for the question.")
    # The answer the question came from, when an editor marked it on the Quality screen.
    source_message_id = models.UUIDField(null=True, blank=True, editable=False)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True,
                                   on_delete=models.SET_NULL, related_name="+", editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "golden query"
        verbose_name_plural = "golden set"
        ordering = ["collection", "created_at"]
        constraints = [models.UniqueConstraint(fields=["collection", "question"],
                                               name="golden_query_unique_question")]

    def __str__(self) -> str:
        return self.question[:80]


class GoldenSet(models.Model):
    """A collection's golden set as a whole: its version moves with every change, so a
    result can say which set it was measured on."""

    collection = models.OneToOneField(Collection, on_delete=models.CASCADE, primary_key=True,
                                      related_name="golden_set")
    version = models.PositiveIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"{self.collection_id} v{self.version}"


class QualityGateRun(models.Model):
    """One run of the quality gate on activating an embedding model, kept with its verdict
    (search.quality_gate): per collection, the questions used and both models' figures."""

    candidate = models.ForeignKey("kb.EmbeddingModel", on_delete=models.CASCADE,
                                  related_name="quality_gate_runs")
    current = models.ForeignKey("kb.EmbeddingModel", null=True, on_delete=models.SET_NULL,
                                related_name="+")
    passed = models.BooleanField()
    summary = models.TextField()
    verdict = models.JSONField(default=dict)
    # Why an editor activated the candidate although it did not pass.
    override_reason = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.candidate_id}: {'passed' if self.passed else 'refused'}"

    @property
    def outcome(self) -> str:
        if self.passed:
            return "passed"
        return "overridden" if self.override_reason else "refused"
