"""OpenAPI description of the chat endpoints drf-spectacular cannot see: POST /api/v1/chat
and the OpenAI-compatible GET /v1/models and POST /v1/chat/completions.

They are async Django views (DRF views cannot stream from an async generator), so they are
described here, from docs/CHAT.md and chat.openai_compat, and added to /api/schema/ by a
postprocessing hook. The Citation component they refer to comes from MessageSerializer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from chat.api import MAX_MESSAGE_CHARS
from chat.services import MAX_CHAT_COLLECTIONS

if TYPE_CHECKING:
    from drf_spectacular.generators import SchemaGenerator
    from rest_framework.request import Request

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["code", "message"],
        "properties": {"code": {"type": "string"}, "message": {"type": "string"},
                       "fields": {"type": "object", "additionalProperties": True}},
    }},
}

CHAT_REQUEST_SCHEMA = {
    "type": "object",
    "required": ["message"],
    "properties": {
        "message": {"type": "string", "minLength": 1, "maxLength": MAX_MESSAGE_CHARS},
        "conversation_id": {"type": "string", "format": "uuid", "nullable": True,
                            "description": "Continue this conversation; a new one when null."},
        "collection": {"type": "string", "nullable": True, "maxLength": 64,
                       "pattern": "^[-a-zA-Z0-9_]*$",
                       "description": "Answer from this collection; every readable one when null."},
        "collections": {"type": "array", "maxItems": MAX_CHAT_COLLECTIONS,
                        "items": {"type": "string", "maxLength": 64, "minLength": 1,
                                  "pattern": "^[-a-zA-Z0-9_]+$"},
                        "description": "Answer from these collections (with `collection`, if "
                                       "given); every readable one when both are empty."},
        "stream": {"type": "boolean", "default": True,
                   "description": "Server-sent events (true) or one JSON answer (false)."},
    },
}

CHAT_ANSWER_SCHEMA = {
    "type": "object",
    "required": ["conversation_id", "message_id", "answer", "mode", "notice", "citations",
                 "cited", "invalid_citations", "usage", "answerable", "related"],
    "properties": {
        "conversation_id": {"type": "string", "format": "uuid"},
        "message_id": {"type": "string", "format": "uuid"},
        "answer": {"type": "string"},
        "mode": {"type": "string", "enum": ["generated", "extracted"]},
        "notice": {"type": "string", "nullable": True},
        "citations": {"type": "array", "items": {"$ref": "#/components/schemas/Citation"}},
        "cited": {"type": "array", "items": {"type": "integer"}},
        "invalid_citations": {"type": "array", "items": {"type": "integer"}},
        "usage": {"type": "object", "additionalProperties": True},
        "answerable": {"type": "boolean",
                       "description": "False: the documents do not cover the question; the "
                                      "answer says so, cites nothing, and no model was asked."},
        "related": {"type": "array", "items": {"$ref": "#/components/schemas/Citation"},
                    "description": "A not-covered answer's closest passages (not citations)."},
    },
}

SSE_DESCRIPTION = (
    "With `stream: true`, `text/event-stream` events: `meta`, `citations`, `delta` (many), "
    "then `done` with usage, or `error`. See docs/CHAT.md."
)


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": ERROR_SCHEMA}}}


CHAT_OPERATION = {
    "post": {
        "operationId": "chat_create",
        "summary": "Ask a question; the answer streams with citations.",
        "description": SSE_DESCRIPTION,
        "tags": ["chat"],
        "security": [{"ApiKey": []}, {"cookieAuth": []}],
        "requestBody": {"required": True,
                        "content": {"application/json": {"schema": CHAT_REQUEST_SCHEMA}}},
        "responses": {
            "200": {"description": "The answer: one JSON object, or an event stream.",
                    "content": {"application/json": {"schema": CHAT_ANSWER_SCHEMA},
                                "text/event-stream": {"schema": {"type": "string"}}}},
            "400": _error("Invalid fields"),
            "401": _error("No valid credentials"),
            "403": _error("CSRF check failed (session authentication)"),
            "404": _error("Unknown conversation or collection"),
            "429": _error("Rate limit or budget exceeded; see Retry-After"),
            "502": _error("The model failed midway (non-streaming)"),
            "503": _error("Database unavailable"),
        },
    }
}


# --- /v1: OpenAI's shapes (chat.openai_compat), so its SDKs and tools work unchanged -------

OPENAI_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": "string", "nullable": True},
                       "code": {"type": "string", "nullable": True}},
    }},
}

OPENAI_MESSAGE_SCHEMA = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {
        "role": {"type": "string", "enum": ["system", "user", "assistant"],
                 "description": "System messages are ignored: the knowledge base's own prompt "
                                "applies."},
        "content": {"oneOf": [
            {"type": "string"},
            {"type": "array", "items": {"type": "object", "properties": {
                "type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}}},
        ]},
    },
}

COMPLETION_REQUEST_SCHEMA = {
    "type": "object",
    "required": ["model", "messages"],
    "properties": {
        "model": {"type": "string", "example": "kb-demo",
                  "description": "`kb-<collection slug>`, as listed by GET /v1/models."},
        "messages": {"type": "array", "minItems": 1, "maxItems": 200,
                     "items": OPENAI_MESSAGE_SCHEMA,
                     "description": "The last must be a user message: the question "
                                    f"(first {MAX_MESSAGE_CHARS} characters). Earlier user and "
                                    "assistant messages are the history."},
        "stream": {"type": "boolean", "default": False},
        "stream_options": {"type": "object", "nullable": True,
                           "properties": {"include_usage": {"type": "boolean"}}},
    },
}

KB_EXTRA_SCHEMA = {
    "type": "object",
    "description": "The knowledge base's own fields: where the answer is stored and how it "
                   "was made.",
    "properties": {
        "conversation_id": {"type": "string", "format": "uuid"},
        "message_id": {"type": "string", "format": "uuid"},
        "mode": {"type": "string", "enum": ["generated", "extracted"]},
        "notice": {"type": "string", "nullable": True},
        "cited": {"type": "array", "items": {"type": "integer"}},
        "invalid_citations": {"type": "array", "items": {"type": "integer"}},
    },
}

COMPLETION_SCHEMA = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices", "usage"],
    "properties": {
        "id": {"type": "string"},
        "object": {"type": "string", "enum": ["chat.completion"]},
        "created": {"type": "integer"},
        "model": {"type": "string"},
        "choices": {"type": "array", "items": {"type": "object", "properties": {
            "index": {"type": "integer"},
            "message": {"type": "object", "properties": {
                "role": {"type": "string", "enum": ["assistant"]},
                "content": {"type": "string", "description": "The answer, with [n] citations."},
                "refusal": {"type": "string", "nullable": True}}},
            "logprobs": {"type": "object", "nullable": True},
            "finish_reason": {"type": "string"},
        }}},
        "usage": {"type": "object", "properties": {
            "prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"},
            "total_tokens": {"type": "integer"}}},
        "system_fingerprint": {"type": "string", "nullable": True},
        "citations": {"type": "array", "items": {"$ref": "#/components/schemas/Citation"},
                      "description": "What each [n] in the answer refers to."},
        "kb": KB_EXTRA_SCHEMA,
    },
}

MODEL_LIST_SCHEMA = {
    "type": "object",
    "required": ["object", "data"],
    "properties": {
        "object": {"type": "string", "enum": ["list"]},
        "data": {"type": "array", "items": {"type": "object", "properties": {
            "id": {"type": "string", "example": "kb-demo"},
            "object": {"type": "string", "enum": ["model"]},
            "created": {"type": "integer"},
            "owned_by": {"type": "string"},
        }}},
    },
}


def _openai_error(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": OPENAI_ERROR_SCHEMA}}}


OPENAI_COMPLETIONS_OPERATION = {
    "post": {
        "operationId": "openai_chat_completions_create",
        "summary": "OpenAI-compatible chat over one collection (model `kb-<slug>`).",
        "description": (
            "Point an OpenAI client at `/v1` with an API key. With `stream: true` the answer "
            "comes as `chat.completion.chunk` server-sent events ending with `data: [DONE]`; "
            "the final chunk carries `citations` and `kb`."
        ),
        "tags": ["openai-compatible"],
        "security": [{"ApiKey": []}],
        "requestBody": {"required": True,
                        "content": {"application/json": {"schema": COMPLETION_REQUEST_SCHEMA}}},
        "responses": {
            "200": {"description": "The answer: one chat.completion, or an event stream.",
                    "content": {"application/json": {"schema": COMPLETION_SCHEMA},
                                "text/event-stream": {"schema": {"type": "string"}}}},
            "400": _openai_error("Invalid request"),
            "401": _openai_error("No valid API key"),
            "404": _openai_error("Unknown model, or a collection the key may not read"),
            "429": _openai_error("Rate limit or budget exceeded; see Retry-After"),
            "502": _openai_error("The model failed (non-streaming)"),
            "503": _openai_error("Database unavailable"),
        },
    }
}

OPENAI_MODELS_OPERATION = {
    "get": {
        "operationId": "openai_models_list",
        "summary": "The collections the key may ask about, as OpenAI models `kb-<slug>`.",
        "tags": ["openai-compatible"],
        "security": [{"ApiKey": []}],
        "responses": {
            "200": {"description": "One model per readable collection.",
                    "content": {"application/json": {"schema": MODEL_LIST_SCHEMA}}},
            "401": _openai_error("No valid API key"),
        },
    }
}


def chat_operation_add(
    result: dict, generator: SchemaGenerator, request: Request | None, public: bool
) -> dict:
    """drf-spectacular postprocessing hook: describe the chat endpoints it cannot see."""
    paths = result.setdefault("paths", {})
    paths["/api/v1/chat"] = CHAT_OPERATION
    paths["/v1/models"] = OPENAI_MODELS_OPERATION
    paths["/v1/chat/completions"] = OPENAI_COMPLETIONS_OPERATION
    return result
