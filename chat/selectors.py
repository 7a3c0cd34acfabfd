"""Reads for chat: a caller's conversations and messages, collections offered on the page."""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from django.contrib.postgres.expressions import ArraySubquery
from django.contrib.postgres.fields import ArrayField
from django.db import connection
from django.db.models import BigIntegerField, Exists, Func, OuterRef, Q, QuerySet

from chat.models import AnswerCacheEntry, AnswerFeedback, Conversation, Message
from kb.models import ApiKey, Collection, Document
from kb.providers.base import ChatMessage
from kb.selectors import (
    AnyUser,
    Caller,
    SystemCaller,
    collections_visible,
    documents_visible,
    signed_in_user,
)
from kb.usage.reports import CitedDocument, Window, cited_documents_source_set
from search.selectors import collections_visible_to


def conversation_list(
    *, user: AnyUser, api_key: ApiKey | None = None
) -> QuerySet[Conversation]:
    """The caller's conversations that its scope still covers, most recently active first.

    A conversation about one collection is listed while the caller (user and key) may read
    that collection, one about several while it may read all of them. One over "every
    collection I can read" may have drawn on any of the user's collections, so a key
    narrowed to some collections sees it only if that key asked it and no answer in it
    (say, one added later through the web page) cites a document outside the key's
    collections.
    """
    owner = signed_in_user(user)
    if owner is None:
        return Conversation.objects.none()
    visible = collections_visible(user=user, api_key=api_key)
    in_scope = Q(collection__in=visible)
    # Over several chosen collections: listed while the caller may read every one of them,
    # as a one-collection conversation is while its collection is readable.
    chose_unreadable = Exists(
        Conversation.collections.through.objects.filter(conversation_id=OuterRef("pk"))
        .exclude(collection__in=visible)
    )
    if api_key is None:
        unscoped = Q(~chose_unreadable, collection__isnull=True)
    else:
        narrowed = Exists(ApiKey.collections.through.objects.filter(apikey_id=api_key.pk))
        in_key_scope = ArraySubquery(
            documents_visible(user=user, api_key=api_key, include_disabled=True).values("pk")
        )
        cites_outside = Exists(
            Message.objects.filter(conversation=OuterRef("pk"))
            .alias(cited_ids=CitedDocumentIds("citations"))
            .exclude(cited_ids__contained_by=in_key_scope)
        )
        unscoped = Q(~chose_unreadable, collection__isnull=True) & (
            ~narrowed | (Q(api_key_id=api_key.pk) & ~cites_outside)
        )
    return Conversation.objects.filter(in_scope | unscoped, user=owner).order_by("-updated_at")


def conversation_get(
    *, user: AnyUser, pk: uuid.UUID | str, api_key: ApiKey | None = None
) -> Conversation | None:
    """One of the caller's conversations (conversation_list), with its collection, or None."""
    return (
        conversation_list(user=user, api_key=api_key)
        .select_related("collection")
        .prefetch_related("collections")
        .filter(pk=pk)
        .first()
    )


def conversation_collection_slugs(*, conversation: Conversation) -> list[str]:
    """The slugs of the collections the conversation asks; empty for every readable one."""
    if conversation.collection is not None:
        return [conversation.collection.slug]
    return sorted(collection.slug for collection in conversation.collections.all())


def shared_conversation_get(*, token: str) -> Conversation | None:
    """The conversation shared under `token`, or None (never shared, or no longer)."""
    if not token:
        return None
    return (
        Conversation.objects.select_related("collection")
        .prefetch_related("collections")
        .filter(share_token=token)
        .first()
    )


def shared_conversation_readable(*, conversation: Conversation, viewer: AnyUser) -> bool:
    """Whether `viewer` may open the shared conversation.

    Its owner may. Anyone else must be signed in and able to read every collection the
    conversation cites or was asked of: a shared answer quotes its passages, so a link
    must not carry text out of a collection its reader cannot open. A deleted document's
    collection is unknown, so a conversation citing one opens only for superusers.
    """
    owner = signed_in_user(viewer)
    if owner is None:
        return False
    if conversation.user_id == owner.pk:
        return True
    cited = {
        citation.get("document_id")
        for citations in Message.objects.filter(conversation=conversation)
        .values_list("citations", flat=True)
        for citation in (citations or []) if isinstance(citation, dict)
    }
    cited_ids = {pk for pk in cited if isinstance(pk, int)}
    documents = dict(
        Document.objects.filter(pk__in=cited_ids).values_list("pk", "collection_id")
    )
    if len(documents) < len(cited) and not owner.is_superuser:
        return False
    needed = set(documents.values()) | {c.pk for c in conversation.collections.all()}
    if conversation.collection_id is not None:
        needed.add(conversation.collection_id)
    readable = set(
        collections_visible(user=owner).filter(pk__in=needed).values_list("pk", flat=True)
    )
    return needed <= readable


def message_feedback_get(*, message: Message, user: AnyUser) -> AnswerFeedback | None:
    """The caller's vote on an answer, if any."""
    voter = signed_in_user(user)
    if voter is None:
        return None
    return AnswerFeedback.objects.filter(message=message, user=voter).first()


def conversation_feedback_by_message(
    *, conversation: Conversation, user: AnyUser
) -> dict[uuid.UUID, AnswerFeedback]:
    """The caller's votes on the conversation's answers, by message id."""
    voter = signed_in_user(user)
    if voter is None:
        return {}
    return {vote.message_id: vote for vote in AnswerFeedback.objects.filter(
        message__conversation=conversation, user=voter)}


def message_list(*, conversation: Conversation) -> QuerySet[Message]:
    """A conversation's messages in the order they were written."""
    return Message.objects.filter(conversation=conversation).order_by("created_at")


def message_get(
    *, user: AnyUser, pk: uuid.UUID, api_key: ApiKey | None = None
) -> Message | None:
    """A message of one of the caller's conversations (conversation_list), or None."""
    if not getattr(user, "is_authenticated", False):
        return None
    return Message.objects.filter(
        pk=pk, conversation__in=conversation_list(user=user, api_key=api_key)
    ).first()


def messages_scoped(
    *, messages: Iterable[Message], user: AnyUser, api_key: ApiKey | None = None
) -> list[Message]:
    """The messages with only the citations the caller may read now.

    A citation carries its passage's text; a document that was deleted, disabled, moved
    or is outside the key's collections must not be read back through an old answer.
    The instances are changed in memory only, never saved.
    """
    messages = list(messages)
    cited_ids = {
        citation.get("document_id")
        for message in messages for citation in (message.citations or [])
        if isinstance(citation, dict)
    }
    readable = set(
        documents_visible(user=user, api_key=api_key)
        .filter(pk__in=[pk for pk in cited_ids if isinstance(pk, int)])
        .values_list("pk", flat=True)
    )
    for message in messages:
        kept = [c for c in (message.citations or [])
                if isinstance(c, dict) and c.get("document_id") in readable]
        if len(kept) != len(message.citations or []):
            numbers = {c.get("n") for c in kept}
            message.citations = kept
            message.cited = [n for n in (message.cited or []) if n in numbers]
    return messages


def conversation_history(*, conversation: Conversation, turns: int) -> list[ChatMessage]:
    """The last `turns` questions and their complete answers, oldest first."""
    if turns <= 0:
        return []
    rows = list(
        Message.objects.filter(conversation=conversation)
        .exclude(
            role=Message.Role.ASSISTANT,
            status__in=[Message.Status.ERROR, Message.Status.STREAMING],
        )
        .exclude(content="")
        .order_by("-created_at")
        .values_list("role", "content")[: turns * 2]
    )
    return [ChatMessage(role=role, content=content) for role, content in reversed(rows)]


def collections_for_chat(
    *, user: AnyUser, api_key: ApiKey | None = None
) -> QuerySet[Collection]:
    """Collections the caller may ask about, by name, each flagged `has_ready` if searchable."""
    ready = Document.objects.filter(collection=OuterRef("pk"), status=Document.Status.READY)
    return (
        Collection.objects.filter(collections_visible_to(user=user, api_key=api_key))
        .annotate(has_ready=Exists(ready))
        .order_by("name")
    )


def conversation_last_collection_slug(*, user: AnyUser) -> str | None:
    """The collection of the user's most recently active conversation, if any."""
    return (
        conversation_list(user=user).exclude(collection=None)
        .values_list("collection__slug", flat=True).first()
    )


def default_collection_slug(*, collections: list[Collection], last_used: str | None = None) -> str:
    """The collection the chat page starts on: the last one used if still offered, else the
    first with ready documents, else demo."""
    if last_used and any(collection.slug == last_used for collection in collections):
        return last_used
    for collection in collections:
        if getattr(collection, "has_ready", False):
            return collection.slug
    slugs = [collection.slug for collection in collections]
    if "demo" in slugs:
        return "demo"
    return slugs[0] if slugs else ""


# --- The editors' admin ------------------------------------------------------------------------


class CitedDocumentIds(Func):
    """The document ids in a citations JSON array, as bigint[] (non-arrays give an empty one)."""

    template = (
        "ARRAY(SELECT (passage ->> 'document_id')::bigint FROM jsonb_array_elements("
        "CASE WHEN jsonb_typeof(%(expressions)s) = 'array' THEN %(expressions)s "
        "ELSE '[]'::jsonb END) AS passage "
        "WHERE jsonb_typeof(passage -> 'document_id') = 'number')"
    )
    output_field = ArrayField(BigIntegerField())


def _readable_document_ids(*, user: AnyUser) -> ArraySubquery:
    # The editors' admin shows disabled documents, so their answers stay visible there too.
    return ArraySubquery(documents_visible(user=user, include_disabled=True).values("pk"))


def conversations_for_admin(*, user: AnyUser) -> QuerySet[Conversation]:
    """Conversations an editor may read in the admin: the document admin's rule.

    A conversation is shown when its collection is one the editor may read (or none) and
    none of its answers cites a document outside those collections; a deleted document's
    collection is unknown, so only superusers see answers citing one.
    """
    if user.is_superuser:
        return Conversation.objects.all()
    outside = (
        Message.objects.filter(conversation=OuterRef("pk"))
        .alias(cited_ids=CitedDocumentIds("citations"))
        .exclude(cited_ids__contained_by=_readable_document_ids(user=user))
    )
    return Conversation.objects.filter(
        Q(collection__isnull=True) | Q(collection__in=collections_visible(user=user)),
        ~Exists(outside),
    )


def messages_for_admin(*, user: AnyUser) -> QuerySet[Message]:
    """Messages of the conversations an editor may read (conversations_for_admin)."""
    if user.is_superuser:
        return Message.objects.all()
    return Message.objects.filter(conversation__in=conversations_for_admin(user=user))


def answer_cache_entries_for_admin(*, user: AnyUser) -> QuerySet[AnswerCacheEntry]:
    """Cached answers whose collection and every source document the editor may read."""
    if user.is_superuser:
        return AnswerCacheEntry.objects.all()
    readable = _readable_document_ids(user=user)
    return AnswerCacheEntry.objects.alias(cited_ids=CitedDocumentIds("citations")).filter(
        Q(collection__isnull=True) | Q(collection__in=collections_visible(user=user)),
        source_document_ids__contained_by=readable,
        cited_ids__contained_by=readable,
    )


def documents_most_cited(
    *, period: Window, user: Caller, limit: int = 10
) -> list[CitedDocument]:
    """The documents cited most often by answers in the period.

    A citation counts when the answer actually cites it: each assistant message keeps the
    passages it was given (`citations`, numbered n = 1, 2, ... as in the prompt) and the
    numbers its text cites (`cited`); a passage counts when its n is in `cited`. Answers
    served from the answer cache count too: a reader saw those citations. `citations` is
    the number of cited passages from the document, `answers` the number of answers citing
    it. One query for a period of any size (_cited_rows).

    `user` is the viewer: only documents in collections they may read are counted (deleted
    ones, whose collection is unknown, only for superusers and SYSTEM), as in the document
    admin.
    """
    rows = _cited_rows(period=period, limit=limit, user=user)
    documents = Document.objects.in_bulk([row[0] for row in rows if row[0] is not None])
    result = []
    for document_id, title, citations, answers in rows:
        document = documents.get(document_id)
        result.append(CitedDocument(
            document_id=document_id,
            title=str(document) if document else (title or f"Document {document_id}"),
            citations=citations,
            answers=answers,
            exists=document is not None,
        ))
    return result


def _cited_rows(*, period: Window, limit: int, user: Caller) -> list[tuple]:
    """(document id, title, citations, answers), most cited first: the passages unnested in
    SQL (`jsonb_array_elements ... WITH ORDINALITY`; the ordinal stands in for a missing n)."""
    table = connection.ops.quote_name(Message._meta.db_table)
    params: list = [Message.Role.ASSISTANT, period.since, period.until]
    visible_sql = ""
    if not isinstance(user, SystemCaller) and not user.is_superuser:
        visible = Document.objects.filter(
            collection__in=collections_visible(user=user)).values("pk").query.sql_with_params()
        visible_sql = f"AND (passage.value ->> 'document_id')::bigint IN ({visible[0]})"
        params += list(visible[1])
    sql = f"""
        SELECT (passage.value ->> 'document_id')::bigint AS document_id,
               max(passage.value ->> 'document_title') AS title,
               count(*) AS citations,
               count(DISTINCT message.id) AS answers
        FROM {table} AS message
        CROSS JOIN LATERAL jsonb_array_elements(
            CASE WHEN jsonb_typeof(message.citations) = 'array' THEN message.citations
                 ELSE '[]'::jsonb END
        ) WITH ORDINALITY AS passage(value, ordinal)
        WHERE message.role = %s
          AND message.created_at >= %s AND message.created_at < %s
          AND passage.value ? 'document_id'
          AND jsonb_typeof(message.cited) = 'array'
          AND message.cited @> jsonb_build_array(
                coalesce((passage.value ->> 'n')::int, passage.ordinal::int))
          {visible_sql}
        GROUP BY 1
        ORDER BY citations DESC, answers DESC, document_id
        LIMIT %s
    """
    with connection.cursor() as cursor:
        cursor.execute(sql, [*params, limit])
        return cursor.fetchall()


# The usage dashboard (kb) reads the most-cited documents from chat's answers through this.
cited_documents_source_set(documents_most_cited)
