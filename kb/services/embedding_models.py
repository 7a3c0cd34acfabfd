"""Embedding-model work the admin and kb_reembed queue: re-embedding, dropping vectors.

The work itself is in kb.embeddings (reembed_run, embedding_model_drop_vectors); these
start it, refuse what must not run, and queue it, so no request does it inline.
"""

from __future__ import annotations

from django.db import transaction

from kb import embeddings
from kb.models import EmbeddingModel
from kb.queue import enqueue


def reembed_queue(*, key: str, activate: bool) -> EmbeddingModel:
    """Mark the model for key building and queue its re-embedding (activated when complete
    if asked); raises EmbeddingModelError if it cannot be used or is already active."""
    model = embeddings.reembed_start(key=key)
    enqueue("kb.tasks.reembed_task", model.pk, activate)
    return model


def embedding_model_drop_vectors_queue(*, model: EmbeddingModel) -> EmbeddingModel:
    """Mark an inactive model dropping and queue the deletion of its vectors and index.

    Its status shows the work in the admin until it is retired. A re-embedding in progress
    stops at its next page (it runs only while the model is building).
    """
    with transaction.atomic():
        locked = EmbeddingModel.objects.select_for_update().get(pk=model.pk)
        if locked.is_active:
            raise embeddings.EmbeddingModelError(
                "The active model's vectors serve search; activate another first.")
        locked.status = EmbeddingModel.Status.DROPPING
        locked.save(update_fields=["status"])
        transaction.on_commit(
            lambda: enqueue("kb.tasks.embedding_model_drop_vectors_task", locked.pk))
    return locked


def embedding_model_drop_vectors_run(*, embedding_model_id: int) -> int:
    """The queued drop: the model's vectors and index go, and it is retired."""
    model = EmbeddingModel.objects.filter(pk=embedding_model_id).first()
    if model is None:
        return 0
    return embeddings.embedding_model_drop_vectors(model=model)
