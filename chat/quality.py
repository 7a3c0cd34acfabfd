"""Reads for the editors' Quality screen: where the knowledge base fails its users.

Answers rated down, answers that said the documents do not cover the question, the
unanswered questions grouped by meaning, and the documents answers cite most and never.
Each answer comes with what retrieval gave it (Message.retrieval). An editor sees only
the answers the message admin shows them (selectors.messages_for_admin).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from django.db.models import OuterRef, Q, QuerySet, Subquery

from chat import selectors
from chat.models import AnswerFeedback, Message
from kb.models import Collection, Document, EmbeddingModel, chunk_source_url
from kb.selectors import AnyUser, collections_visible
from kb.usage.reports import Window
from search.query_embedding import query_vector

# Rows per list on the screen (and in the CSV).
REVIEW_LIMIT = 200
# Unanswered questions embedded to find topics; their vectors come from the query cache
# when the questions were asked recently.
TOPIC_QUESTIONS = 200
# Cosine similarity at which two questions count as one topic (greedy, against the
# topic's first question). Chosen by reading the groups on the demo corpus, not measured.
TOPIC_SIMILARITY = 0.7


@dataclass(frozen=True)
class RetrievedPassage:
    document_id: int
    collection_id: int | None
    title: str
    score: float
    url: str
    exists: bool


@dataclass
class ReviewedAnswer:
    """An answer under review, with its question and what retrieval found for it."""

    message_id: str
    conversation_id: str
    question: str
    answer: str
    created_at: datetime
    asked_by: str
    collections: list[str]
    # The one collection asked, if the conversation asked one.
    collection_id: int | None = None
    rating: str = ""
    reason: str = ""
    comment: str = ""
    answerability: float | None = None
    retrieved: list[RetrievedPassage] = field(default_factory=list)


@dataclass
class Topic:
    """Unanswered questions that mean much the same."""

    questions: list[str]

    @property
    def size(self) -> int:
        return len(self.questions)


def _messages(*, user: AnyUser, period: Window,
              collection: Collection | None) -> QuerySet[Message]:
    """The answers of the period the editor may read, of the collection if one is given
    (a conversation asked of it alone or among others)."""
    messages = selectors.messages_for_admin(user=user).filter(
        role=Message.Role.ASSISTANT, created_at__gte=period.since, created_at__lt=period.until)
    if collection is not None:
        messages = messages.filter(Q(conversation__collection=collection)
                                   | Q(conversation__collections=collection)).distinct()
    question = Message.objects.filter(
        conversation=OuterRef("conversation"), role=Message.Role.USER,
        created_at__lte=OuterRef("created_at"),
    ).order_by("-created_at").values("content")[:1]
    return (messages.select_related("conversation__user", "conversation__collection")
            .prefetch_related("conversation__collections")
            .annotate(question=Subquery(question)))


def answers_rated_down(*, user: AnyUser, period: Window,
                       collection: Collection | None = None) -> list[ReviewedAnswer]:
    """Answers someone rated down in the period, the most recent vote first."""
    votes = {
        vote.message_id: vote for vote in AnswerFeedback.objects.filter(
            rating=AnswerFeedback.Rating.DOWN, updated_at__gte=period.since,
            updated_at__lt=period.until,
            message__in=_messages(user=user, period=period, collection=collection),
        ).order_by("-updated_at")[:REVIEW_LIMIT]
    }
    messages = _messages(user=user, period=period, collection=collection).filter(
        pk__in=list(votes))
    reviewed = []
    for message in messages:
        vote = votes[message.pk]
        item = _reviewed(message)
        item.rating, item.reason, item.comment = vote.rating, vote.reason, vote.comment
        reviewed.append((vote.updated_at, item, message.retrieval))
    reviewed.sort(key=lambda row: row[0], reverse=True)
    return _with_documents([(item, retrieval) for _, item, retrieval in reviewed])


def answers_not_covered(*, user: AnyUser, period: Window,
                        collection: Collection | None = None) -> list[ReviewedAnswer]:
    """Answers that said the documents do not cover the question, the most recent first."""
    messages = _messages(user=user, period=period, collection=collection).filter(
        answerable=False).order_by("-created_at")[:REVIEW_LIMIT]
    return _with_documents([(_reviewed(message), message.retrieval) for message in messages])


def _reviewed(message: Message) -> ReviewedAnswer:
    conversation = message.conversation
    if conversation.collection is not None:
        scope = [conversation.collection.slug]
    else:
        scope = sorted(c.slug for c in conversation.collections.all()) or ["all"]
    answerability = (message.retrieval or {}).get("answerability") or {}
    return ReviewedAnswer(
        message_id=str(message.pk), conversation_id=str(conversation.pk),
        question=getattr(message, "question", "") or "", answer=message.content,
        created_at=message.created_at,
        asked_by=conversation.user.get_username() if conversation.user else "",
        collections=scope, collection_id=conversation.collection_id,
        answerability=answerability.get("probability"),
    )


def _with_documents(rows: list[tuple[ReviewedAnswer, dict]]) -> list[ReviewedAnswer]:
    """Each answer with its top retrieved passages and their documents' titles (one query
    for all the documents)."""
    hits = [(item, [hit for hit in (retrieval or {}).get("hits", [])[:5]
                    if isinstance(hit.get("document_id"), int)
                    and isinstance(hit.get("chunk_id"), int)])
            for item, retrieval in rows]
    documents = Document.objects.in_bulk(
        {hit["document_id"] for _, found in hits for hit in found})
    for item, found in hits:
        for hit in found:
            document = documents.get(hit.get("document_id"))
            item.retrieved.append(RetrievedPassage(
                document_id=hit["document_id"],
                collection_id=document.collection_id if document else None,
                title=str(document) if document else f"Document {hit.get('document_id')}",
                score=float(hit.get("score") or 0.0),
                url=chunk_source_url(document_id=hit["document_id"], chunk_id=hit["chunk_id"]),
                exists=document is not None,
            ))
    return [item for item, _ in hits]


def unanswered_topics(*, questions: Sequence[str], limit: int = 10) -> list[Topic]:
    """The questions grouped by meaning, the largest groups first.

    Each question's vector comes from the active embedding model (through the query
    vector cache, and the usage ledger like any query); a question joins the first topic
    whose first question it resembles at TOPIC_SIMILARITY or more.
    """
    model = EmbeddingModel.objects.filter(is_active=True).first()
    texts = list(dict.fromkeys(q.strip() for q in questions if q.strip()))[:TOPIC_QUESTIONS]
    if model is None or not texts:
        return []
    topics: list[tuple[list[float], Topic]] = []
    for text in texts:
        vector = _unit(query_vector(model=model, text=text))
        for anchor, topic in topics:
            if sum(a * b for a, b in zip(anchor, vector, strict=True)) >= TOPIC_SIMILARITY:
                topic.questions.append(text)
                break
        else:
            topics.append((vector, Topic(questions=[text])))
    ranked = sorted((topic for _, topic in topics), key=lambda t: t.size, reverse=True)
    return ranked[:limit]


def _unit(vector: Sequence[float]) -> list[float]:
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [v / norm for v in vector]


def documents_never_cited(*, user: AnyUser, period: Window,
                          collection: Collection | None = None,
                          limit: int = 50) -> list[Document]:
    """Ready documents the editor may read that no answer of the period cited."""
    cited = {row.document_id for row in selectors.documents_most_cited(
        period=period, user=user, limit=100_000)}
    documents = Document.objects.filter(
        status=Document.Status.READY, collection__in=collections_visible(user=user))
    if collection is not None:
        documents = documents.filter(collection=collection)
    return list(documents.exclude(pk__in=cited).select_related("collection")
                .order_by("collection__name", "title", "original_filename")[:limit])


def golden_candidate(answer: ReviewedAnswer) -> tuple[int, list[int]] | None:
    """(collection id, document ids) an editor would start a golden query from: the
    collection asked, else the best retrieved document's; the retrieved documents of that
    collection. None when nothing points to a collection."""
    collection_id = answer.collection_id or next(
        (p.collection_id for p in answer.retrieved if p.collection_id), None)
    if collection_id is None:
        return None
    documents = [p.document_id for p in answer.retrieved
                 if p.exists and p.collection_id == collection_id]
    return collection_id, list(dict.fromkeys(documents))


def golden_initial_for_message(message: Message) -> dict[str, str]:
    """The golden set admin's add form, filled in from one answer as the Quality screen
    does it (the chat admin's answers link there too)."""
    question = (Message.objects.filter(conversation_id=message.conversation_id,
                                       role=Message.Role.USER,
                                       created_at__lte=message.created_at)
                .order_by("-created_at").values_list("content", flat=True).first() or "")
    item = ReviewedAnswer(
        message_id=str(message.pk), conversation_id=str(message.conversation_id),
        question=question, answer=message.content, created_at=message.created_at,
        asked_by="", collections=[], collection_id=message.conversation.collection_id)
    (item,) = _with_documents([(item, message.retrieval)])
    return golden_initial(item, with_documents=message.answerable is not False)


def golden_initial(answer: ReviewedAnswer, *, with_documents: bool = True) -> dict[str, str]:
    """The question, its collection and (for an answer that was not "not covered") the
    documents retrieval found, to keep or drop."""
    initial = {"question": answer.question, "source_message": answer.message_id}
    candidate = golden_candidate(answer)
    if candidate is not None:
        initial["collection"] = str(candidate[0])
        if with_documents:
            initial["documents"] = ",".join(str(pk) for pk in candidate[1])
    return initial


@dataclass
class QualityReport:
    """Everything the Quality screen shows for one period and collection."""

    rated_down: list[ReviewedAnswer]
    not_covered: list[ReviewedAnswer]
    topics: list[Topic]
    most_cited: list
    never_cited: list[Document]


def quality_report(*, user: AnyUser, period: Window,
                   collection: Collection | None = None) -> QualityReport:
    """The Quality screen's lists (the admin page and /api/v1/quality/ show the same)."""
    not_covered = answers_not_covered(user=user, period=period, collection=collection)
    return QualityReport(
        rated_down=answers_rated_down(user=user, period=period, collection=collection),
        not_covered=not_covered,
        topics=unanswered_topics(questions=[a.question for a in not_covered]),
        most_cited=selectors.documents_most_cited(period=period, user=user),
        never_cited=documents_never_cited(user=user, period=period, collection=collection),
    )
