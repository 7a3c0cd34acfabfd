"""Conversations and their messages, the answer cache, and daily budgets."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.contrib.postgres.fields import ArrayField
from django.contrib.postgres.indexes import GinIndex
from django.db import models
from django.db.models import Q
from pgvector.django import VectorField

from kb.models import ApiKey, Collection


class Conversation(models.Model):
    """A thread of questions and answers belonging to one user (and the key that asked)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE,
        related_name="conversations",
    )
    api_key = models.ForeignKey(
        ApiKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    collection = models.ForeignKey(
        Collection, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # A conversation over several chosen collections has them here and no `collection`;
    # neither means every collection the caller can read.
    collections = models.ManyToManyField(Collection, blank=True, related_name="+")
    title = models.CharField(max_length=200, blank=True)
    # Set while the owner shares it: /chat/shared/<token>/ shows it, read-only, to people
    # who may read every collection it cites (chat.selectors.shared_conversation_get).
    share_token = models.CharField(max_length=64, unique=True, null=True, blank=True,
                                   editable=False)
    shared_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-updated_at"]
        indexes = [models.Index(fields=["user", "-updated_at"])]

    def __str__(self) -> str:
        return self.title or str(self.pk)


class Message(models.Model):
    """One turn: the user's question, or the assistant's answer with the passages it was given."""

    class Role(models.TextChoices):
        USER = "user", "User"
        ASSISTANT = "assistant", "Assistant"

    class Status(models.TextChoices):
        STREAMING = "streaming", "Streaming"
        COMPLETE = "complete", "Complete"
        INTERRUPTED = "interrupted", "Interrupted"
        ERROR = "error", "Error"

    class Mode(models.TextChoices):
        GENERATED = "generated", "Generated"
        EXTRACTED = "extracted", "Extracted"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    conversation = models.ForeignKey(
        Conversation, on_delete=models.CASCADE, related_name="messages"
    )
    role = models.CharField(max_length=16, choices=Role.choices)
    content = models.TextField(blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.COMPLETE)
    mode = models.CharField(max_length=16, choices=Mode.choices, blank=True)
    # Shown above the answer: a fallback was used, retrieval was keyword-only, ...
    notice = models.TextField(blank=True)
    # The citation dicts for the passages the model was given, numbered as in the prompt.
    citations = models.JSONField(default=list, blank=True)
    # The passage numbers the answer actually cites, and the ones it invented.
    cited = models.JSONField(default=list, blank=True)
    invalid_citations = models.JSONField(default=list, blank=True)
    provider = models.CharField(max_length=64, blank=True)
    model = models.CharField(max_length=255, blank=True)
    input_tokens = models.PositiveIntegerField(default=0)
    output_tokens = models.PositiveIntegerField(default=0)
    cache_hit = models.BooleanField(default=False)
    # Whether retrieval found enough evidence to answer (chat.answerability); False means
    # the answer says the documents do not cover the question and no model was asked.
    # None for user messages and answers from before the decision existed.
    answerable = models.BooleanField(null=True, blank=True)
    error = models.TextField(blank=True)
    # What retrieval gave the answer, for feedback and quality review: the query searched,
    # the top hits' chunk and document ids with their fused scores, whether the answer
    # came from the cache, and the answerability decision with its evidence.
    retrieval = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["created_at"]
        indexes = [models.Index(fields=["conversation", "created_at"])]

    def __str__(self) -> str:
        return f"{self.role}: {self.content[:60]}"


class AnswerFeedback(models.Model):
    """One person's verdict on one answer: up or down, why, and what they would add.

    One per user and answer (a second vote changes the first). The answer's citations and
    retrieval evidence stay on the message; the vote points at it.
    """

    class Rating(models.TextChoices):
        UP = "up", "Helpful"
        DOWN = "down", "Not helpful"

    class Reason(models.TextChoices):
        WRONG = "wrong", "Wrong"
        INCOMPLETE = "incomplete", "Incomplete"
        OUTDATED = "outdated", "Outdated"
        NOT_FOUND = "not_found", "Not found in the documents"

    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="feedback")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="answer_feedback"
    )
    # The key it came through, if any (a user's keys share the user's one vote).
    api_key = models.ForeignKey(
        ApiKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    rating = models.CharField(max_length=8, choices=Rating.choices)
    reason = models.CharField(max_length=16, choices=Reason.choices, blank=True)
    comment = models.TextField(blank=True, max_length=4000)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True, db_index=True)

    class Meta:
        verbose_name = "answer feedback"
        verbose_name_plural = "answer feedback"
        ordering = ["-updated_at"]
        constraints = [
            models.UniqueConstraint(fields=["message", "user"], name="feedback_one_per_user"),
        ]

    def __str__(self) -> str:
        return f"{self.get_rating_display()} on {self.message_id}"


class AnswerCacheEntry(models.Model):
    """A complete generated answer, reusable for the same (or a very similar) question.

    An entry only matches while its kb_version is the collection's current one, so any
    document change retires it (chat.answer_cache.kb_version).
    """

    question = models.TextField(help_text="The normalised question.")
    key = models.CharField(max_length=64, db_index=True, help_text="sha256 of scope and question.")
    collection = models.ForeignKey(
        Collection, null=True, blank=True, on_delete=models.CASCADE, related_name="+"
    )
    kb_version = models.CharField(max_length=128, db_index=True)
    # Dimensionless like kb.ChunkEmbedding.embedding; only vectors of the same embedding
    # model are ever compared, so entries survive a switch of model without a migration.
    embedding = VectorField(null=True, blank=True)
    embedding_model = models.CharField(max_length=64, blank=True)
    answer = models.TextField()
    mode = models.CharField(
        max_length=16, choices=Message.Mode.choices, default=Message.Mode.GENERATED
    )
    citations = models.JSONField(default=list)
    cited = models.JSONField(default=list)
    source_document_ids = ArrayField(models.BigIntegerField(), default=list)
    provider = models.CharField(max_length=64, blank=True)
    model = models.CharField(max_length=255, blank=True)
    input_tokens = models.PositiveIntegerField(default=0)
    output_tokens = models.PositiveIntegerField(default=0)
    cost_usd = models.DecimalField(max_digits=14, decimal_places=8, default=0)
    hits = models.PositiveIntegerField(default=0)
    last_hit_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        verbose_name = "cached answer"
        ordering = ["-created_at"]
        indexes = [GinIndex(fields=["source_document_ids"], name="chat_cache_source_docs_gin")]

    def __str__(self) -> str:
        return self.question[:80]


class Budget(models.Model):
    """A daily token and cost ceiling for everyone, one user, or one API key.

    A row replaces the KB_BUDGET_* default for its target; an empty limit means unlimited.
    """

    class Scope(models.TextChoices):
        GLOBAL = "global", "Global"
        USER = "user", "User"
        API_KEY = "api_key", "API key"

    scope = models.CharField(max_length=16, choices=Scope.choices)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE, related_name="+"
    )
    api_key = models.ForeignKey(
        ApiKey, null=True, blank=True, on_delete=models.CASCADE, related_name="+"
    )
    daily_token_limit = models.PositiveBigIntegerField(null=True, blank=True)
    daily_cost_limit_usd = models.DecimalField(
        max_digits=12, decimal_places=4, null=True, blank=True
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["scope"], condition=Q(scope="global"), name="budget_one_global"
            ),
            models.UniqueConstraint(
                fields=["user"], condition=Q(scope="user"), name="budget_one_per_user"
            ),
            models.UniqueConstraint(
                fields=["api_key"], condition=Q(scope="api_key"), name="budget_one_per_api_key"
            ),
            models.CheckConstraint(
                condition=(
                    Q(scope="global", user__isnull=True, api_key__isnull=True)
                    | Q(scope="user", user__isnull=False, api_key__isnull=True)
                    | Q(scope="api_key", user__isnull=True, api_key__isnull=False)
                ),
                name="budget_target_matches_scope",
                violation_error_message="A global budget names no target, a user budget names "
                "a user, an API-key budget names a key.",
            ),
        ]

    def __str__(self) -> str:
        if self.scope == self.Scope.USER:
            return f"Budget for user {self.user}"
        if self.scope == self.Scope.API_KEY:
            return f"Budget for key {self.api_key}"
        return "Global budget"

