"""The chat API: POST /api/v1/chat (SSE or JSON); reading messages; the caller's
conversations (list, read, rename, delete, export).

POST /api/v1/chat is a plain async Django view, not a DRF one: DRF's APIView is sync,
and a stream must be an async generator served by the ASGI handler. It authenticates
itself (API key, or the session with CSRF enforced), validates with a DRF serializer,
and only wraps chat.services.answer_stream. The read endpoints are ordinary DRF views.
"""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING, Any

from asgiref.sync import sync_to_async
from django.contrib.auth.models import User
from django.core.serializers.json import DjangoJSONEncoder
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.http.response import HttpResponseBase
from django.urls import reverse
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_field,
)
from rest_framework import exceptions, generics, serializers, status
from rest_framework.authentication import SessionAuthentication
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from chat import selectors, services
from chat.budgets import BudgetExceeded
from chat.export import conversation_markdown
from chat.feedback import FeedbackRefused, feedback_record, feedback_withdraw
from chat.models import AnswerFeedback, Conversation, Message
from chat.sse import event_stream_response, sse_stream
from kb.api.authentication import ApiKeyAuthentication
from kb.api.conventions import IF_MATCH, etag_of, if_match_check
from kb.api.pagination import RecentActivityCursorPagination
from kb.api.permissions import key_is_narrowed
from kb.api.ratelimits import rate_limit_enforce
from kb.models import ApiKey, Collection

if TYPE_CHECKING:
    from kb.selectors import AnyUser

MAX_MESSAGE_CHARS = 4000


# --- Serializers -----------------------------------------------------------------------------


class ChatRequestSerializer(serializers.Serializer):
    message = serializers.CharField(max_length=MAX_MESSAGE_CHARS)
    conversation_id = serializers.UUIDField(required=False, allow_null=True, default=None)
    collection = serializers.SlugField(
        required=False, allow_null=True, allow_blank=True, default=None, max_length=64
    )
    collections = serializers.ListField(
        child=serializers.SlugField(max_length=64), required=False, default=list,
        max_length=services.MAX_CHAT_COLLECTIONS,
        help_text="Ask several collections at once (with `collection`, if given). Neither: "
                  "every collection the caller can read.",
    )
    stream = serializers.BooleanField(required=False, default=True)


class CitationSerializer(serializers.Serializer):
    n = serializers.IntegerField()
    chunk_id = serializers.IntegerField()
    document_id = serializers.IntegerField()
    document_title = serializers.CharField()
    page = serializers.IntegerField(allow_null=True)
    heading_path = serializers.ListField(child=serializers.CharField())
    text = serializers.CharField()
    url = serializers.CharField()


class FeedbackVoteSerializer(serializers.Serializer):
    rating = serializers.CharField()
    reason = serializers.CharField()
    comment = serializers.CharField()


class MessageSerializer(serializers.ModelSerializer):
    citations = CitationSerializer(many=True, read_only=True)
    cited = serializers.ListField(child=serializers.IntegerField(), read_only=True)
    invalid_citations = serializers.ListField(child=serializers.IntegerField(), read_only=True)

    class Meta:
        model = Message
        fields = ["id", "conversation_id", "role", "content", "status", "mode", "notice",
                  "citations", "cited", "invalid_citations", "answerable", "related",
                  "feedback", "created_at"]

    related = serializers.SerializerMethodField()
    feedback = serializers.SerializerMethodField(
        help_text="The caller's vote on this answer (PUT …/feedback), or null.")

    @extend_schema_field(FeedbackVoteSerializer(allow_null=True))
    def get_feedback(self, message: Message) -> dict | None:
        votes = self.context.get("feedback") or {}
        vote = votes.get(message.pk)
        return FeedbackVoteSerializer(vote).data if vote is not None else None

    @extend_schema_field(CitationSerializer(many=True))
    def get_related(self, message: Message) -> list[dict]:
        """A not-covered answer's closest passages: stored as its citations, cited by nothing."""
        if message.answerable is not False:
            return []
        # many=True builds a ListSerializer, whose data is a list; the stubs type the child's.
        return CitationSerializer(message.citations, many=True).data  # type: ignore[return-value]

    def to_representation(self, message: Message) -> dict:
        data = super().to_representation(message)
        if message.answerable is False:
            data["citations"] = []
        return data


class ConversationListSerializer(serializers.ModelSerializer):
    shared = serializers.SerializerMethodField()
    owner: serializers.SlugRelatedField[User] = serializers.SlugRelatedField(
        source="user", slug_field="username", read_only=True, allow_null=True)

    class Meta:
        model = Conversation
        fields = ["id", "title", "updated_at", "shared", "owner"]

    def get_shared(self, conversation: Conversation) -> bool:
        return conversation.share_token is not None


class ConversationSerializer(serializers.ModelSerializer):
    # Null for a conversation over several collections, or every one the caller can read.
    collection: serializers.SlugRelatedField[Collection] = serializers.SlugRelatedField(
        slug_field="slug", read_only=True, allow_null=True
    )
    collections = serializers.SerializerMethodField()
    share_url = serializers.SerializerMethodField()
    messages = serializers.SerializerMethodField()

    class Meta:
        model = Conversation
        fields = ["id", "title", "collection", "collections", "share_url", "created_at",
                  "updated_at", "messages"]

    def get_collections(self, conversation: Conversation) -> list[str]:
        """The slugs asked of; empty for every collection the caller can read."""
        return selectors.conversation_collection_slugs(conversation=conversation)

    def get_share_url(self, conversation: Conversation) -> str | None:
        return share_path(conversation)

    @extend_schema_field(MessageSerializer(many=True))
    def get_messages(self, conversation: Conversation) -> list[dict]:
        messages = selectors.messages_scoped(
            messages=selectors.message_list(conversation=conversation),
            user=self.context["user"], api_key=self.context["api_key"],
        )
        votes = selectors.conversation_feedback_by_message(conversation=conversation,
                                                           user=self.context["user"])
        # many=True builds a ListSerializer, whose data is a list; the stubs type the child's.
        return MessageSerializer(  # type: ignore[return-value]
            messages, many=True, context={"feedback": votes}).data


# --- POST /api/v1/chat -----------------------------------------------------------------------


def error_response(
    status: int, code: str, message: str, *, fields: dict | None = None,
    headers: dict[str, str] | None = None,
) -> JsonResponse:
    """The API's one error shape: {"error": {"code", "message", "fields"?}}."""
    error: dict[str, Any] = {"code": code, "message": message}
    if fields:
        error["fields"] = fields
    response = JsonResponse({"error": error}, status=status)
    for name, value in (headers or {}).items():
        response[name] = value
    return response


def csrf_failure(request: HttpRequest) -> str | None:
    """Why a session-authenticated request fails CSRF ("CSRF Failed: …"), or None if it passes.

    DRF's public SessionAuthentication.enforce_csrf, so the chat refuses a forged post
    with the same message as the DRF views (search) do.
    """
    try:
        # It reads only what a Django HttpRequest has; the stubs ask for DRF's Request.
        SessionAuthentication().enforce_csrf(request)  # type: ignore[arg-type]
    except exceptions.PermissionDenied as exc:
        return str(exc.detail)
    return None


async def authenticate(
    request: HttpRequest, *, allow_session: bool = True
) -> tuple[AnyUser, ApiKey | None] | JsonResponse:
    """(user, api_key) for a bearer key or (with allow_session) a logged-in session.

    Session callers must pass CSRF: the view is csrf_exempt only so that API-key callers,
    which send no cookie and cannot be forged cross-site, need no token.
    """
    if request.headers.get("Authorization"):
        try:
            result = await sync_to_async(ApiKeyAuthentication().authenticate)(request)
        except exceptions.AuthenticationFailed as exc:
            return error_response(401, "authentication_failed", str(exc.detail),
                                  headers={"WWW-Authenticate": "Bearer"})
        if result is not None:
            return result
    if allow_session:
        user = await request.auser()
        if user.is_authenticated:
            failure = csrf_failure(request)
            if failure:
                return error_response(403, "permission_denied", failure)
            return user, None
    return error_response(401, "not_authenticated", "Authentication credentials were not provided.",
                          headers={"WWW-Authenticate": "Bearer"})


async def enforce_rate_limit(
    request: HttpRequest, *, user: AnyUser, api_key: ApiKey | None
) -> JsonResponse | None:
    """A 429 response if the caller is over the chat rate limit."""
    request.user = user
    request.auth = api_key  # type: ignore[attr-defined]
    try:
        await sync_to_async(rate_limit_enforce)(request, group="chat")
    except exceptions.Throttled as exc:
        wait = int(exc.wait or 60)  # type: ignore[attr-defined]  # set by DRF, not in the stubs
        return error_response(429, "throttled", str(exc.detail), headers={"Retry-After": str(wait)})
    return None


def chat_error_response(exc: Exception) -> JsonResponse:
    """The JSON answer for an error raised before the first event."""
    if isinstance(exc, BudgetExceeded):
        return error_response(429, "budget_exceeded", str(exc),
                              headers={"Retry-After": str(exc.retry_after)})
    assert isinstance(exc, services.ChatError)
    if exc.field:
        return error_response(exc.status, exc.code, "Some parameters are invalid.",
                              fields={exc.field: [str(exc)]})
    return error_response(exc.status, exc.code, str(exc))


def request_id_for(request: HttpRequest) -> str:
    """The request's id (set from a sane X-Request-ID by kb.ops.observability), else a new one."""
    return (getattr(request, "request_id", "") or uuid.uuid4().hex)[:64]


@csrf_exempt
async def chat(request: HttpRequest) -> HttpResponseBase:
    """POST /api/v1/chat: answer a question, as an SSE stream or (stream: false) JSON."""
    if request.method != "POST":
        return error_response(405, "method_not_allowed", "Use POST.", headers={"Allow": "POST"})
    auth = await authenticate(request)
    if isinstance(auth, HttpResponse):
        return auth
    user, api_key = auth
    try:
        body = json.loads(request.body or b"{}")
    except (ValueError, UnicodeDecodeError):
        return error_response(400, "parse_error", "The request body is not valid JSON.")
    serializer = ChatRequestSerializer(data=body if isinstance(body, dict) else {})
    if not isinstance(body, dict) or not serializer.is_valid():
        fields = serializer.errors if isinstance(body, dict) else {
            "non_field_errors": ["Expected a JSON object."]}
        return error_response(400, "invalid", "Some parameters are invalid.", fields=fields)
    limited = await enforce_rate_limit(request, user=user, api_key=api_key)
    if limited is not None:
        return limited
    data = serializer.validated_data
    arguments = {
        "question": data["message"],
        "conversation_id": data["conversation_id"],
        "collection_slug": data["collection"] or None,
        "collection_slugs": data["collections"],
        "user": user,
        "api_key": api_key,
        "request_id": request_id_for(request),
    }
    if not data["stream"]:
        try:
            result = await services.answer_complete(**arguments)
        except (services.ChatError, BudgetExceeded) as exc:
            return chat_error_response(exc)
        if result.error is not None:
            status = 503 if result.error.code == "database_unavailable" else 502
            return error_response(status, result.error.code, result.error.message)
        return JsonResponse({
            "conversation_id": result.conversation_id,
            "message_id": result.message_id,
            "answer": result.answer,
            "mode": result.mode,
            "notice": result.notice,
            "citations": result.citations,
            "cited": result.cited,
            "invalid_citations": result.invalid_citations,
            "usage": result.usage,
            "answerable": result.answerable,
            "related": result.related,
        })
    events = services.answer_stream(**arguments)
    try:
        # Runs validation, the budget check and message creation: refusals are plain JSON.
        await anext(events)
    except (services.ChatError, BudgetExceeded) as exc:
        return chat_error_response(exc)
    return event_stream_response(sse_stream(events))


# --- Reading messages and conversations ------------------------------------------------------


def _api_key(request: Request) -> ApiKey | None:
    """The key that authenticated the request (its scope narrows every read), or None."""
    return request.auth if isinstance(request.auth, ApiKey) else None



class MessageDetail(APIView):
    """GET /api/v1/chat/messages/<id>: one message, e.g. to load an answer after a disconnect."""

    @extend_schema(
        responses={200: MessageSerializer, 404: OpenApiResponse(description="Not found")}
    )
    def get(self, request: Request, pk: uuid.UUID) -> Response:
        api_key = _api_key(request)
        message = selectors.message_get(user=request.user, pk=pk, api_key=api_key)
        if message is None:
            raise exceptions.NotFound("No such message.")
        (message,) = selectors.messages_scoped(
            messages=[message], user=request.user, api_key=api_key
        )
        vote = selectors.message_feedback_get(message=message, user=request.user)
        return Response(MessageSerializer(
            message, context={"feedback": {message.pk: vote} if vote else {}}).data)


OWNER_ANY = OpenApiParameter(
    "owner", str, enum=["me", "any"],
    description="any: everyone's conversations that the admin would show you (needs “Can "
                "view conversation”, and a key not narrowed to collections). Default: yours.")


def _reads_everyones_conversations(request: Request) -> bool:
    """Whether the caller may read others' conversations as the conversation admin does."""
    return request.user.has_perm("chat.view_conversation") and not key_is_narrowed(request)


class ConversationList(generics.ListAPIView):
    """GET /api/v1/conversations: the caller's conversations, most recent first; with
    ?owner=any, everyone's that the conversation admin shows the caller."""

    serializer_class = ConversationListSerializer
    pagination_class = RecentActivityCursorPagination

    def get_queryset(self) -> QuerySet[Conversation]:
        owner = self.request.query_params.get("owner", "me")
        if owner not in {"me", "any"}:
            raise exceptions.ValidationError({"owner": ["Choose me or any."]})
        if owner == "any":
            if not _reads_everyones_conversations(self.request):
                raise exceptions.PermissionDenied(
                    "Reading others' conversations needs “Can view conversation” and a key "
                    "that is not narrowed to collections.")
            return selectors.conversations_for_admin(user=self.request.user).select_related("user")
        return selectors.conversation_list(user=self.request.user, api_key=_api_key(self.request))

    @extend_schema(parameters=[OWNER_ANY])
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().get(request, *args, **kwargs)


class ConversationRenameSerializer(serializers.Serializer):
    title = serializers.CharField(max_length=200, allow_blank=False, trim_whitespace=True)


def share_path(conversation: Conversation) -> str | None:
    """The read-only page of a shared conversation, or None while it is not shared."""
    if conversation.share_token is None:
        return None
    return reverse("chat-shared", kwargs={"token": conversation.share_token})


def _conversation_etag(conversation: Conversation) -> str:
    return etag_of({"title": conversation.title})


def _conversation(request: Request, pk: uuid.UUID) -> Conversation:
    conversation = selectors.conversation_get(user=request.user, pk=pk, api_key=_api_key(request))
    if conversation is None:
        raise exceptions.NotFound("No such conversation.")
    return conversation


class ConversationDetail(APIView):
    """GET /api/v1/conversations/<id>: a conversation with all its messages (its JSON
    export); also someone else's for a holder of “Can view conversation”, as in the admin.
    PATCH renames it and DELETE deletes it with its messages: the owner's only."""

    @extend_schema(responses={200: ConversationSerializer,
                              404: OpenApiResponse(description="Not found")})
    def get(self, request: Request, pk: uuid.UUID) -> Response:
        conversation = selectors.conversation_get(user=request.user, pk=pk,
                                                  api_key=_api_key(request))
        if conversation is None and _reads_everyones_conversations(request):
            # Someone else's, read as the conversation admin would show it (read-only).
            conversation = selectors.conversations_for_admin(user=request.user).filter(
                pk=pk).select_related("collection").prefetch_related("collections").first()
        if conversation is None:
            raise exceptions.NotFound("No such conversation.")
        context = {"user": request.user, "api_key": _api_key(request)}
        return Response(ConversationSerializer(conversation, context=context).data,
                        headers={"ETag": _conversation_etag(conversation)})

    @extend_schema(request=ConversationRenameSerializer, parameters=[IF_MATCH],
                   responses={200: ConversationListSerializer,
                              404: OpenApiResponse(description="Not found")})
    def patch(self, request: Request, pk: uuid.UUID) -> Response:
        conversation = _conversation(request, pk)
        if_match_check(request, lambda: _conversation_etag(conversation))
        serializer = ConversationRenameSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        services.conversation_rename(conversation=conversation,
                                     title=serializer.validated_data["title"])
        return Response(ConversationListSerializer(conversation).data,
                        headers={"ETag": _conversation_etag(conversation)})

    @extend_schema(responses={204: None, 404: OpenApiResponse(description="Not found")})
    def delete(self, request: Request, pk: uuid.UUID) -> Response:
        services.conversation_delete(conversation=_conversation(request, pk))
        return Response(status=status.HTTP_204_NO_CONTENT)


class ConversationExport(APIView):
    """GET /api/v1/conversations/<id>/export?as=markdown|json: the conversation as a file to
    download (Markdown by default, with each answer's cited sources linked)."""

    @extend_schema(
        parameters=[OpenApiParameter("as", str, enum=["markdown", "json"],
                                     description="markdown (default) or json.")],
        responses={(200, "text/markdown"): OpenApiTypes.STR,
                   (200, "application/json"): ConversationSerializer,
                   404: OpenApiResponse(description="Not found")},
    )
    def get(self, request: Request, pk: uuid.UUID) -> HttpResponseBase:
        kind = request.query_params.get("as", "markdown")
        if kind not in {"markdown", "json"}:
            raise exceptions.ValidationError({"as": ["Choose markdown or json."]})
        conversation = _conversation(request, pk)
        api_key = _api_key(request)
        messages = selectors.messages_scoped(
            messages=selectors.message_list(conversation=conversation), user=request.user,
            api_key=api_key)
        name = f"conversation-{conversation.pk}"
        if kind == "json":
            body = json.dumps(ConversationSerializer(
                conversation, context={"user": request.user, "api_key": api_key}).data,
                cls=DjangoJSONEncoder, ensure_ascii=False, indent=2)
            response = HttpResponse(body, content_type="application/json; charset=utf-8")
            response["Content-Disposition"] = f'attachment; filename="{name}.json"'
            return response
        text = conversation_markdown(conversation=conversation, messages=messages,
                                     base_url=request.build_absolute_uri("/").rstrip("/"))
        response = HttpResponse(text, content_type="text/markdown; charset=utf-8")
        response["Content-Disposition"] = f'attachment; filename="{name}.md"'
        return response


class ShareSerializer(serializers.Serializer):
    share_url = serializers.CharField(help_text="Path of the read-only page.")


class ConversationShare(APIView):
    """POST /api/v1/conversations/<id>/share: a link to a read-only copy of the conversation
    (the same link again if it is already shared). Only people who may read every collection
    it cites can open it. DELETE stops sharing: the link no longer opens."""

    @extend_schema(request=None, responses={200: ShareSerializer,
                                            404: OpenApiResponse(description="Not found")})
    def post(self, request: Request, pk: uuid.UUID) -> Response:
        conversation = services.conversation_share(conversation=_conversation(request, pk))
        return Response({"share_url": request.build_absolute_uri(share_path(conversation))})

    @extend_schema(responses={204: None, 404: OpenApiResponse(description="Not found")})
    def delete(self, request: Request, pk: uuid.UUID) -> Response:
        services.conversation_unshare(conversation=_conversation(request, pk))
        return Response(status=status.HTTP_204_NO_CONTENT)


class FeedbackSerializer(serializers.Serializer):
    rating = serializers.ChoiceField(choices=AnswerFeedback.Rating.choices)
    reason = serializers.ChoiceField(choices=AnswerFeedback.Reason.choices, required=False,
                                     allow_blank=True, default="")
    comment = serializers.CharField(required=False, allow_blank=True, max_length=4000,
                                    default="")
    updated_at = serializers.DateTimeField(read_only=True)


class MessageFeedback(APIView):
    """/api/v1/chat/messages/<id>/feedback: your vote on one of your answers. PUT sets it
    (up or down, with an optional reason and comment; a second PUT replaces the first),
    GET reads it (404 when you have not voted), DELETE withdraws it."""

    def _answer(self, request: Request, pk: uuid.UUID) -> Message:
        message = selectors.message_get(user=request.user, pk=pk, api_key=_api_key(request))
        if message is None or message.role != Message.Role.ASSISTANT:
            raise exceptions.NotFound("No such answer.")
        return message

    @extend_schema(responses={200: FeedbackSerializer,
                              404: OpenApiResponse(description="No vote, or no such answer")})
    def get(self, request: Request, pk: uuid.UUID) -> Response:
        feedback = selectors.message_feedback_get(message=self._answer(request, pk),
                                                  user=request.user)
        if feedback is None:
            raise exceptions.NotFound("You have not rated this answer.")
        return Response(FeedbackSerializer(feedback).data)

    @extend_schema(request=FeedbackSerializer, responses={200: FeedbackSerializer})
    def put(self, request: Request, pk: uuid.UUID) -> Response:
        message = self._answer(request, pk)
        serializer = FeedbackSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        try:
            feedback = feedback_record(message=message, user=request.user,
                                       api_key=_api_key(request), **serializer.validated_data)
        except FeedbackRefused as exc:
            raise exceptions.PermissionDenied(str(exc)) from None
        return Response(FeedbackSerializer(feedback).data)

    @extend_schema(responses={204: None})
    def delete(self, request: Request, pk: uuid.UUID) -> Response:
        feedback_withdraw(message=self._answer(request, pk), user=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)
