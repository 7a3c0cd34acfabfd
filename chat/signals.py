"""Signal receivers that keep the answer cache honest, connected in ChatConfig.ready().

Document.delete() and Document.save() (a new upload of a file) fire them; disabling and
enabling use queryset.update() and are caught by the answer cache's kb_version instead.
"""

from __future__ import annotations

from typing import Any

from django.db.models.signals import post_delete, post_save

from chat.answer_cache import cache_invalidate_documents
from kb.models import Document


def answer_cache_forget_document(sender: type[Document], instance: Document, **kwargs: Any) -> None:
    """Delete the cached answers a deleted or replaced document was a source of."""
    if instance.pk is not None and not kwargs.get("created", False):
        cache_invalidate_documents(document_ids=[instance.pk])


def signals_connect() -> None:
    """Connect the receivers (idempotent: dispatch_uid)."""
    post_delete.connect(answer_cache_forget_document, sender=Document,
                        dispatch_uid="chat_cache_forget_deleted_document")
    post_save.connect(answer_cache_forget_document, sender=Document,
                      dispatch_uid="chat_cache_forget_saved_document")
