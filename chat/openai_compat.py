"""An OpenAI-compatible face of the chat pipeline, for tools that already speak that API.

    client = openai.OpenAI(base_url="http://host:8000/v1", api_key="kb_...")
    client.chat.completions.create(model="kb-<collection slug>", messages=[...])

The last user message is the question; earlier user and assistant messages are the
history used to rewrite a follow-up. System messages from the client are ignored: the
pipeline's own system prompt (answer only from the passages, passages are data) is not
negotiable. Citations are [n] markers in the text and a top-level `citations` list (in
the final chunk when streaming). Authentication is by API key only.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, TypedDict

from asgiref.sync import sync_to_async
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.http.response import HttpResponseBase
from django.urls import reverse
from django.views.decorators.csrf import csrf_exempt
from rest_framework import serializers

from chat import api, selectors, services
from chat.budgets import BudgetExceeded
from chat.events import ChatEvent, Citations, Delta, Done, Error, Heartbeat, Meta, Started
from chat.sse import event_stream_response
from kb.models import ApiKey, Collection
from kb.providers.base import ChatMessage

if TYPE_CHECKING:
    from kb.selectors import AnyUser

MODEL_PREFIX = "kb-"


class CompletionRequestSerializer(serializers.Serializer):
    model = serializers.CharField(max_length=200)
    messages = serializers.ListField(child=serializers.DictField(), min_length=1, max_length=200)
    stream = serializers.BooleanField(required=False, default=False)
    stream_options = serializers.DictField(required=False, allow_null=True, default=None)


def openai_error(
    status: int, message: str, *, type_: str = "invalid_request_error", code: str | None = None,
    param: str | None = None, headers: dict[str, str] | None = None,
) -> JsonResponse:
    """An error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""
    response = JsonResponse(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}, status=status
    )
    for name, value in (headers or {}).items():
        response[name] = value
    return response


class _TurnArguments(TypedDict):
    """The keyword arguments of services.answer_complete and answer_stream."""

    question: str
    conversation_id: None
    collection_slug: str
    user: AnyUser
    api_key: ApiKey | None
    request_id: str
    history: list[ChatMessage]


def _from_api_error(response: JsonResponse) -> JsonResponse:
    """Re-shape one of chat.api's {"error": {"code", "message"}} answers the OpenAI way."""
    error = json.loads(response.content)["error"]
    type_ = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}.get(
        response.status_code, "invalid_request_error")
    headers = {
        name: response[name] for name in ("Retry-After", "WWW-Authenticate") if name in response
    }
    return openai_error(response.status_code, error["message"], type_=type_, code=error["code"],
                        headers=headers)


def _text(content: Any) -> str:
    """A message's content as text: a string, or the text parts of a content array."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            str(part.get("text", "")) for part in content
            if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""


def _visible_collection(
    *, user: AnyUser, api_key: ApiKey | None, slug: str
) -> Collection | None:
    return selectors.collections_for_chat(user=user, api_key=api_key).filter(slug=slug).first()


@csrf_exempt
async def chat_completions(request: HttpRequest) -> HttpResponseBase:
    """POST /v1/chat/completions over the knowledge base; model `kb-<collection slug>`."""
    if request.method != "POST":
        return openai_error(405, "Use POST.", code="method_not_allowed")
    auth = await api.authenticate(request, allow_session=False)
    if isinstance(auth, HttpResponse):
        return _from_api_error(auth)
    user, api_key = auth
    parsed = await _completion_request(request, user=user, api_key=api_key)
    if isinstance(parsed, HttpResponse):
        return parsed
    data, collection, turns = parsed
    limited = await api.enforce_rate_limit(request, user=user, api_key=api_key)
    if limited is not None:
        return _from_api_error(limited)
    arguments: _TurnArguments = {
        "question": turns[-1].content[: api.MAX_MESSAGE_CHARS],
        "conversation_id": None,
        "collection_slug": collection.slug,
        "user": user,
        "api_key": api_key,
        "request_id": api.request_id_for(request),
        "history": turns[:-1],
    }
    created = int(time.time())
    model = data["model"]
    if not data["stream"]:
        try:
            result = await services.answer_complete(**arguments)
        except (services.ChatError, BudgetExceeded) as exc:
            return _from_api_error(api.chat_error_response(exc))
        return _completion(result, model=model, created=created)
    events = services.answer_stream(**arguments)
    try:
        started = await anext(events)
    except (services.ChatError, BudgetExceeded) as exc:
        return _from_api_error(api.chat_error_response(exc))
    assert isinstance(started, Started)
    include_usage = bool((data.get("stream_options") or {}).get("include_usage"))
    return event_stream_response(
        _chunks(events, started=started, model=model, created=created, include_usage=include_usage)
    )


async def _completion_request(
    request: HttpRequest, *, user: AnyUser, api_key: ApiKey | None
) -> tuple[dict[str, Any], Collection, list[ChatMessage]] | JsonResponse:
    """The validated body, the collection its model names and the conversation's turns, or
    the OpenAI-shaped error that refuses it."""
    try:
        body = json.loads(request.body or b"{}")
    except (ValueError, UnicodeDecodeError):
        return openai_error(400, "The request body is not valid JSON.", code="parse_error")
    serializer = CompletionRequestSerializer(data=body if isinstance(body, dict) else {})
    if not isinstance(body, dict) or not serializer.is_valid():
        errors = serializer.errors if isinstance(body, dict) else {"body": ["Expected an object."]}
        param, messages = next(iter(errors.items()))
        return openai_error(400, f"{param}: {' '.join(map(str, messages))}", param=param,
                            code="invalid_value")
    data = serializer.validated_data
    model = data["model"]
    slug = model.removeprefix(MODEL_PREFIX) if model.startswith(MODEL_PREFIX) else None
    collection = (
        await sync_to_async(_visible_collection)(user=user, api_key=api_key, slug=slug)
        if slug else None
    )
    if collection is None:
        return openai_error(
            404, f"The model `{model}` does not exist or you do not have access to it.",
            code="model_not_found", param="model",
        )
    turns = [
        ChatMessage(role=m.get("role", ""), content=_text(m.get("content")))
        for m in data["messages"]
        if m.get("role") in {"user", "assistant"}
    ]
    if not turns or turns[-1].role != "user" or not turns[-1].content.strip():
        return openai_error(400, "The last message must be a non-empty user message.",
                            param="messages", code="invalid_value")
    return data, collection, turns


def _completion(result: services.AnswerResult, *, model: str, created: int) -> JsonResponse:
    """A whole answer as a chat.completion (or the OpenAI-shaped error it ended with)."""
    if result.error is not None:
        status = 503 if result.error.code == "database_unavailable" else 502
        return openai_error(status, result.error.message, type_="server_error",
                            code=result.error.code)
    return JsonResponse({
        "id": _completion_id(result.message_id),
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": result.answer, "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }],
        "usage": _usage(result.usage),
        "system_fingerprint": None,
        "citations": result.citations,
        "kb": {"conversation_id": result.conversation_id, "message_id": result.message_id,
               "mode": result.mode, "notice": result.notice, "cited": result.cited,
               "invalid_citations": result.invalid_citations, "answerable": result.answerable,
               "related": result.related, "feedback_url": _feedback_url(result.message_id)},
    })


async def _chunks(
    events: AsyncGenerator[ChatEvent, None], *, started: Started, model: str,
    created: int, include_usage: bool,
) -> AsyncGenerator[str, None]:
    """The pipeline's events as chat.completion.chunk SSE lines, ending with [DONE]."""
    completion_id = _completion_id(started.message_id)

    def chunk(delta: dict, finish_reason: str | None = None, **extra: Any) -> str:
        payload = {
            "id": completion_id, "object": "chat.completion.chunk", "created": created,
            "model": model, "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None,
                         "finish_reason": finish_reason}],
            **extra,
        }
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    citations: list[dict] = []
    related: list[dict] = []
    meta: Meta | None = None
    async with aclosing(events):
        yield chunk({"role": "assistant", "content": ""})
        async for event in events:
            if isinstance(event, Heartbeat):
                yield ": ping\n\n"
            elif isinstance(event, Meta):
                meta = event
            elif isinstance(event, Citations):
                citations, related = event.citations, event.related
            elif isinstance(event, Delta):
                yield chunk({"content": event.text})
            elif isinstance(event, Done):
                kb = {"conversation_id": started.conversation_id, "message_id": event.message_id,
                      "mode": meta.mode if meta else "", "notice": meta.notice if meta else None,
                      "cited": event.cited, "invalid_citations": event.invalid_citations,
                      "answerable": event.answerable, "related": related,
                      "feedback_url": _feedback_url(event.message_id)}
                yield chunk({}, "stop", citations=citations, kb=kb)
                if include_usage:
                    payload = {"id": completion_id, "object": "chat.completion.chunk",
                               "created": created, "model": model, "system_fingerprint": None,
                               "choices": [], "usage": _usage(event.usage)}
                    yield f"data: {json.dumps(payload)}\n\n"
                yield "data: [DONE]\n\n"
            elif isinstance(event, Error):
                # The SDKs raise on a chunk carrying "error"; no [DONE] follows an error.
                error = {"message": event.message, "type": "server_error", "param": None,
                         "code": event.code}
                yield f"data: {json.dumps({'error': error}, ensure_ascii=False)}\n\n"


def _feedback_url(message_id: str) -> str:
    """Where a client may PUT the user's vote on the answer (an extension clients ignore)."""
    return reverse("chat-message-feedback", args=[message_id])


def _completion_id(message_id: str) -> str:
    return "chatcmpl-" + message_id.replace("-", "")


def _usage(usage: dict) -> dict:
    prompt = int(usage.get("input_tokens") or 0)
    completion = int(usage.get("output_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _models_for(user: AnyUser, api_key: ApiKey | None) -> list[dict]:
    return [
        {"id": f"{MODEL_PREFIX}{c.slug}", "object": "model",
         "created": int(c.created_at.timestamp()), "owned_by": "kb"}
        for c in selectors.collections_for_chat(user=user, api_key=api_key)
    ]


@csrf_exempt
async def models(request: HttpRequest) -> HttpResponse:
    """GET /v1/models: one model `kb-<slug>` per collection the key may read."""
    if request.method != "GET":
        return openai_error(405, "Use GET.", code="method_not_allowed")
    auth = await api.authenticate(request, allow_session=False)
    if isinstance(auth, HttpResponse):
        return _from_api_error(auth)
    user, api_key = auth
    data = await sync_to_async(_models_for)(user=user, api_key=api_key)
    return JsonResponse({"object": "list", "data": data})
