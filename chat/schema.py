"""OpenAPI description of POST /api/v1/chat, which drf-spectacular cannot see.

The endpoint is an async Django view (DRF views cannot stream from an async generator), so
it is described here, from docs/CHAT.md, and added to /api/schema/ by a postprocessing
hook. The Citation component it refers to comes from MessageSerializer."""

from __future__ import annotations

from typing import Any

from chat.api import MAX_MESSAGE_CHARS

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


def chat_operation_add(result: dict, generator, request, public) -> dict:
    """drf-spectacular postprocessing hook: describe POST /api/v1/chat."""
    result.setdefault("paths", {})["/api/v1/chat"] = CHAT_OPERATION
    return result
