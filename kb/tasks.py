"""django-q2 entry points: an id goes in, a service is called. Nothing else lives here.

Tasks are queued with kb.queue.enqueue, which services import without importing this.
"""

from __future__ import annotations

from kb import embeddings
from kb.services import collections, documents, embedding_models, ingest


def document_ingest_task(document_id: int) -> str:
    document = ingest.document_ingest(document_id=document_id)
    return document.status if document is not None else "deleted"


def reembed_task(embedding_model_id: int, activate: bool = False) -> str:
    return embeddings.reembed_run(model_id=embedding_model_id, activate=activate).status


def documents_mark_stalled_task() -> int:
    return documents.documents_mark_stalled()


def collection_reindex_task(collection_id: int) -> str:
    return collections.collection_reindex_run(collection_id=collection_id)


def embedding_model_drop_vectors_task(embedding_model_id: int) -> int:
    return embedding_models.embedding_model_drop_vectors_run(embedding_model_id=embedding_model_id)
