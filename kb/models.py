"""The core domain: collections of documents, their chunks, vectors, and the usage ledger."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.contrib.postgres.indexes import GinIndex
from django.contrib.postgres.search import SearchVectorField
from django.db import models
from django.db.models import Q
from django.urls import reverse
from pgvector.django import VectorField


class Collection(models.Model):
    """A named set of documents searched together, with its own text-search language."""

    class ReindexStatus(models.TextChoices):
        CURRENT = "current", "Up to date"
        QUEUED = "queued", "Re-index queued"
        RUNNING = "running", "Re-indexing"
        FAILED = "failed", "Re-index failed"

    slug = models.SlugField(max_length=64, unique=True)
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    # A PostgreSQL text-search configuration (english, simple, german, ...). It decides
    # the lexemes BM25 is computed over, so changing it re-indexes the collection.
    text_search_config = models.CharField(max_length=63, default="english")
    # Public collections are readable by every signed-in user and API key; restricted
    # ones only by the users and groups listed (and superusers). Every read path filters
    # by kb.selectors.collections_visible_to inside its SQL.
    is_public = models.BooleanField(default=True)
    allowed_users = models.ManyToManyField(
        settings.AUTH_USER_MODEL, blank=True, related_name="kb_collections"
    )
    allowed_groups = models.ManyToManyField("auth.Group", blank=True, related_name="kb_collections")
    # A change of text_search_config re-indexes the chunks in a queued task (kb.tasks).
    reindex_status = models.CharField(max_length=16, choices=ReindexStatus.choices,
                                      default=ReindexStatus.CURRENT)
    reindex_error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    # The version cached answers are keyed by: bumped only through
    # kb.services.collections.collection_touch (chat.answer_cache.kb_version reads it).
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class EmbeddingModel(models.Model):
    """One embedding space: a provider model whose vectors live in ChunkEmbedding.

    Several can hold vectors at once; exactly one is active and serves search. A new one
    is filled in the background and becomes active in one atomic update (kb_reembed).
    """

    class Status(models.TextChoices):
        BUILDING = "building", "Building"
        READY = "ready", "Ready (complete, not active)"
        ACTIVE = "active", "Active"
        CANCELLED = "cancelled", "Cancelled"
        RETIRED = "retired", "Retired"
        DROPPING = "dropping", "Dropping vectors"

    key = models.SlugField(
        max_length=64, unique=True, help_text="Key in KB_PROVIDERS['embedding']."
    )
    backend = models.CharField(max_length=255)
    model_name = models.CharField(max_length=255)
    dimensions = models.PositiveIntegerField()
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.BUILDING)
    is_active = models.BooleanField(default=False)
    chunks_total = models.PositiveIntegerField(default=0)
    chunks_embedded = models.PositiveIntegerField(default=0)
    error_message = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    activated_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["is_active"], condition=Q(is_active=True), name="one_active_embedding_model"
            )
        ]

    def __str__(self) -> str:
        return f"{self.key} ({self.model_name}, {self.dimensions}d)"

    @property
    def hnsw_index_name(self) -> str:
        return f"kb_chunkembedding_hnsw_{self.pk}"


class Document(models.Model):
    """One uploaded source file and the state of its ingestion."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        PROCESSING = "processing", "Processing"
        READY = "ready", "Ready"
        FAILED = "failed", "Failed"
        DISABLED = "disabled", "Disabled"

    class Stage(models.TextChoices):
        QUEUED = "queued", "Queued"
        PARSING = "parsing", "Parsing"
        CHUNKING = "chunking", "Chunking"
        EMBEDDING = "embedding", "Embedding"
        INDEXING = "indexing", "Indexing"
        DONE = "done", "Done"

    collection = models.ForeignKey(Collection, on_delete=models.CASCADE, related_name="documents")
    title = models.CharField(max_length=500, blank=True)
    file = models.FileField(upload_to="documents/%Y/%m/", max_length=500)
    original_filename = models.CharField(max_length=255)
    mime_type = models.CharField(max_length=127, blank=True)
    size_bytes = models.BigIntegerField(default=0)
    content_hash = models.CharField(max_length=64, db_index=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    stage = models.CharField(max_length=16, choices=Stage.choices, default=Stage.QUEUED)
    error_message = models.TextField(blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    # The whole extracted text; chunk offsets point into it, so citations can show context.
    extracted_text = models.TextField(blank=True, editable=False)
    chunks_total = models.PositiveIntegerField(default=0)
    chunks_embedded = models.PositiveIntegerField(default=0)
    attempts = models.PositiveIntegerField(default=0)
    # The generation of chunks that serves search. An ingestion writes generation+1 beside
    # it and switches over in one transaction, so reprocessing never takes a document
    # offline and a killed run leaves only an unsearchable generation to clean up.
    chunk_generation = models.PositiveIntegerField(default=0)
    # Bumped by the worker as it makes progress; a stale heartbeat means the worker died.
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    processing_started_at = models.DateTimeField(null=True, blank=True)
    processing_finished_at = models.DateTimeField(null=True, blank=True)
    uploaded_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["collection", "status"])]

    def __str__(self) -> str:
        return self.title or self.original_filename

    def get_absolute_url(self) -> str:
        return reverse("document-source", args=[self.pk])


def chunk_source_url(*, document_id: int, chunk_id: int) -> str:
    """Where a citation or search hit links: the chunk's anchor on its document's source page.

    Callers hold ids, not rows (a search hit, a prompt's passage); Chunk.get_absolute_url
    is the same for a row.
    """
    return f"{reverse('document-source', args=[document_id])}#chunk-{chunk_id}"


class Chunk(models.Model):
    """A retrievable passage of a document: a contiguous slice of its extracted text.

    search_vector and search_length are filled by a database trigger from the collection's
    text-search configuration, and statement-level triggers keep the per-collection BM25
    statistics (search.TermStatistic, search.CollectionStatistic) in step with every insert,
    update and delete, whatever code path writes the rows.
    """

    document = models.ForeignKey(Document, on_delete=models.CASCADE, related_name="chunks")
    # Denormalised from document so BM25 statistics and filters need no join.
    collection = models.ForeignKey(Collection, on_delete=models.CASCADE, related_name="+")
    generation = models.PositiveIntegerField(default=1)
    ordinal = models.PositiveIntegerField()
    text = models.TextField()
    # sha256 of the exact text given to the embedder (title + heading path + text): the
    # embedding cache key, so identical passages are never embedded twice.
    embedding_input_hash = models.CharField(max_length=64, db_index=True)
    token_count = models.PositiveIntegerField()
    heading_path = models.JSONField(default=list, blank=True)
    char_start = models.PositiveIntegerField()
    char_end = models.PositiveIntegerField()
    page_start = models.PositiveIntegerField(null=True, blank=True)
    page_end = models.PositiveIntegerField(null=True, blank=True)
    # Title and heading path: indexed for BM25 with the text, as they are embedded with it.
    search_context = models.TextField(blank=True)
    # True only while the document is ready and enabled. Chunks are written unsearchable
    # and switched on together when the whole document is embedded, so search never sees
    # half a document, and BM25 statistics count exactly what search can return.
    searchable = models.BooleanField(default=False)
    search_vector = SearchVectorField(null=True, editable=False)
    search_length = models.PositiveIntegerField(default=0, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["document", "ordinal"]
        constraints = [
            models.UniqueConstraint(
                fields=["document", "generation", "ordinal"],
                name="chunk_document_generation_ordinal",
            )
        ]
        indexes = [
            GinIndex(fields=["search_vector"], name="kb_chunk_search_vector_gin"),
            models.Index(fields=["collection", "searchable"]),
        ]

    def __str__(self) -> str:
        return f"{self.document_id}#{self.ordinal}"

    def get_absolute_url(self) -> str:
        return chunk_source_url(document_id=self.document_id, chunk_id=self.pk)

    @property
    def heading_path_text(self) -> str:
        return " › ".join(self.heading_path)


class ChunkEmbedding(models.Model):
    """A chunk's vector in one embedding space.

    The column has no fixed dimension so models of different sizes coexist; each model
    gets its own partial HNSW index over `embedding::halfvec(d)` (search.vector).
    """

    chunk = models.ForeignKey(Chunk, on_delete=models.CASCADE, related_name="embeddings")
    embedding_model = models.ForeignKey(EmbeddingModel, on_delete=models.CASCADE, related_name="+")
    embedding = VectorField()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["embedding_model", "chunk"], name="chunkembedding_model_chunk"
            )
        ]

    def __str__(self) -> str:
        return f"{self.chunk_id}@{self.embedding_model_id}"


class ApiKey(models.Model):
    """A bearer token for the API. Only its sha256 is stored; the key is shown once."""

    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16, unique=True, editable=False)
    hashed_key = models.CharField(max_length=64, unique=True, editable=False)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_keys"
    )
    # Narrows the key to these collections (within what its user may see); empty: no narrowing.
    collections = models.ManyToManyField(Collection, blank=True, related_name="api_keys")
    # Overrides KB_RATELIMITS for this key, e.g. "600/m"; empty: the defaults.
    rate_limit = models.CharField(max_length=32, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "API key"
        # Without it a staff user creates, sees and revokes only their own keys (kb.api.key_access).
        permissions = [("manage_all_api_keys", "Can manage every user's API keys")]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None


class UsageRecord(models.Model):
    """One model call (or one served search/cache hit): tokens, cost, latency, outcome."""

    class Kind(models.TextChoices):
        EMBEDDING = "embedding", "Embedding"
        CHAT = "chat", "Chat"
        RERANK = "rerank", "Rerank"
        SEARCH = "search", "Search"

    class Status(models.TextChoices):
        OK = "ok", "OK"
        ERROR = "error", "Error"
        INTERRUPTED = "interrupted", "Interrupted"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    kind = models.CharField(max_length=16, choices=Kind.choices)
    provider = models.CharField(max_length=64)
    model = models.CharField(max_length=255, blank=True)
    input_tokens = models.PositiveIntegerField(default=0)
    output_tokens = models.PositiveIntegerField(default=0)
    cost_usd = models.DecimalField(max_digits=14, decimal_places=8, default=0)
    # What a cache hit would have cost had it gone to the model.
    saved_cost_usd = models.DecimalField(max_digits=14, decimal_places=8, default=0)
    latency_ms = models.FloatField(default=0)
    time_to_first_token_ms = models.FloatField(null=True, blank=True)
    cache_hit = models.BooleanField(default=False)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    api_key = models.ForeignKey(
        ApiKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    document = models.ForeignKey(
        Document, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    conversation_id = models.UUIDField(null=True, blank=True, db_index=True)
    request_id = models.CharField(max_length=64, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.OK)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["kind", "created_at"])]

    def __str__(self) -> str:
        return f"{self.kind} {self.provider}/{self.model} {self.created_at:%Y-%m-%d %H:%M}"
