"""The BM25 index: postings and per-collection statistics, maintained by triggers on kb_chunk.

The triggers live in migration 0002_bm25_index; search.bm25 states the formula.
"""

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
