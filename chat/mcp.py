"""The knowledge base as an MCP server at /mcp (streamable HTTP), for agents.

Built on the official `mcp` SDK's MCPServer (docs/CHAT.md says why). Its tools call the
same services as the REST API, as the same caller: every request must carry
`Authorization: Bearer <API key>`, and each tool authenticates that key again, then
applies the REST API's rate limit groups, collection access and key scope; budgets and
the usage ledger come with the services themselves (search, chat.services).

The SDK's Starlette app runs beside Django, not inside it: `mcp_mount` sends /mcp to it
and everything else to Django. It runs stateless (each HTTP request is a whole MCP
exchange), so no session outlives the key that opened it, and the SDK's session manager
is started on the first request, because `serve` runs uvicorn without lifespan events.
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.conf import settings
from django.db import connections
from django.http import HttpRequest
from django.http.request import split_domain_port, validate_host
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from rest_framework import exceptions

from chat import services as chat_services
from chat.budgets import BudgetExceeded
from kb.api.authentication import ApiKeyAuthentication
from kb.api.ratelimits import rate_limit_enforce
from kb.models import ApiKey, Chunk, chunk_source_url
from kb.selectors import collections_visible, collections_with_counts, documents_visible
from search import services as search_services

logger = logging.getLogger(__name__)

MCP_PATH = "/mcp"
MAX_K = 50
# What get_document returns of a document's text, at most: an agent's context is finite.
DOCUMENT_TEXT_LIMIT = 100_000

server = MCPServer(
    name="knowledge-base",
    instructions=(
        "Search the organisation's knowledge base and get cited answers from it. Cite "
        "passages by their url. list_collections shows what you may read."
    ),
)


# --- The caller --------------------------------------------------------------------------


class Caller:
    """The API key's user and the key, with a Django request for the rate limiter."""

    def __init__(self, request: HttpRequest) -> None:
        self.request = request
        self.user = request.user
        self.api_key: ApiKey = request.auth  # type: ignore[attr-defined]


def _authenticate(headers: dict[str, str]) -> Caller:
    """The caller a bearer key names; AuthenticationFailed for none or a bad one."""
    request = HttpRequest()
    request.method = "POST"
    # Rate limits count by key (kb.api.ratelimits.caller_key), never by address.
    request.META = {"HTTP_AUTHORIZATION": headers.get("authorization", "")}
    result = ApiKeyAuthentication().authenticate(request)
    if result is None:
        raise exceptions.AuthenticationFailed("Send Authorization: Bearer <API key>.")
    request.user, request.auth = result  # type: ignore[attr-defined]
    return Caller(request)


@asynccontextmanager
async def _database() -> AsyncIterator[None]:
    """One tool call's database work in its own thread, its connections closed after, as
    Django does for a request (chat.services relies on that thread)."""
    async with ThreadSensitiveContext():
        try:
            yield
        finally:
            await sync_to_async(connections.close_all)()


async def _call(ctx: Context, group: str,
                work: Callable[[Caller], Awaitable[Any]]) -> Any:
    """Authenticate the request's key, count it against `group`'s rate limit, run `work`."""
    headers = {name.lower(): value for name, value in (ctx.headers or {}).items()}

    def checked() -> Caller:
        caller = _authenticate(headers)
        rate_limit_enforce(caller.request, group=group)
        return caller

    async with _database():
        try:
            return await work(await sync_to_async(checked)())
        except exceptions.Throttled as exc:
            wait = int(getattr(exc, "wait", None) or 60)  # set by DRF, not in the stubs
            raise ToolError(f"{exc.detail} Retry after {wait} s.") from None
        except exceptions.APIException as exc:
            raise ToolError(str(exc.detail)) from None


def _readable_slugs(caller: Caller, slugs: list[str] | None) -> tuple[str, ...]:
    """The named collections, all of which the caller must be able to read."""
    wanted = sorted(set(slugs or []))
    if not wanted:
        return ()
    readable = set(collections_visible(user=caller.user, api_key=caller.api_key)
                   .filter(slug__in=wanted).values_list("slug", flat=True))
    missing = [slug for slug in wanted if slug not in readable]
    if missing:
        # Unknown and unreadable alike: a collection's name is not the caller's to learn.
        raise ToolError(f"No collection you can read: {', '.join(missing)}. "
                        "list_collections shows the ones you can.")
    return tuple(wanted)


# --- Tools -------------------------------------------------------------------------------


@server.tool(description="The collections you may read, with how many documents and "
                         "passages each holds.")
async def list_collections(ctx: Context) -> list[dict]:
    """The collections you may read, with how many documents and passages each holds."""

    def work(caller: Caller) -> list[dict]:
        rows = collections_with_counts(
            collections_visible(user=caller.user, api_key=caller.api_key)).order_by("name")
        return [{"slug": row["slug"], "name": row["name"], "description": row["description"],
                 "documents": row["ready_count"], "passages": row["chunk_count"]}
                # The counts are collections_with_counts' annotations, unknown to the stubs.
                for row in rows.values("slug", "name", "description",  # type: ignore[misc]
                                       "ready_count", "chunk_count")]

    return await _call(ctx, "search", sync_to_async(work))


@server.tool(description=(
    "Hybrid search (BM25 and vectors, fused) over the collections named (`collections`, or "
    "one `collection`), or all you may read. mode: hybrid, bm25 or vector. Each passage has "
    "its text and a url to cite."))
async def search(ctx: Context, query: str, collections: list[str] | None = None,
                 collection: str | None = None, mode: str = "hybrid", k: int = 10) -> dict:
    """Hybrid search over the named collections, or all the caller may read."""
    collections = [*(collections or []), *([collection] if collection else [])]
    if not query.strip():
        raise ToolError("Give a query.")
    if mode not in search_services.MODES:
        raise ToolError(f"mode is one of {', '.join(search_services.MODES)}.")
    k = max(1, min(int(k), MAX_K))

    def work(caller: Caller) -> dict:
        params = search_services.SearchParams(
            query=query[:2000], k=k, mode=mode, rerank=None,
            collections=_readable_slugs(caller, collections))
        result = search_services.search(params=params, user=caller.user,
                                        api_key=caller.api_key)
        return {"query": query, "mode": result.mode, "notices": result.notices,
                "passages": [_passage(hit) for hit in result.hits]}

    return await _call(ctx, "search", sync_to_async(work))


def _passage(hit: search_services.SearchHit) -> dict:
    return {"chunk_id": hit.chunk_id, "document_id": hit.document_id,
            "document_title": hit.document_title, "text": hit.text, "score": hit.score,
            "heading_path": hit.heading_path, "page": hit.page_start,
            "url": chunk_source_url(document_id=hit.document_id,
                                              chunk_id=hit.chunk_id)}


@server.tool(description="One passage by id (from search), with its document.")
async def get_chunk(ctx: Context, chunk_id: int) -> dict:
    """One passage by id, with its document."""

    def work(caller: Caller) -> dict:
        chunk = (Chunk.objects.select_related("document")
                 .filter(pk=chunk_id, searchable=True,
                         document__in=documents_visible(user=caller.user,
                                                        api_key=caller.api_key))
                 .first())
        if chunk is None:
            raise ToolError(f"No passage {chunk_id} that you can read.")
        return {"chunk_id": chunk.pk, "document_id": chunk.document_id,
                "document_title": chunk.document.title or chunk.document.original_filename,
                "text": chunk.text, "heading_path": chunk.heading_path,
                "page": chunk.page_start,
                "url": chunk_source_url(document_id=chunk.document_id,
                                                  chunk_id=chunk.pk)}

    return await _call(ctx, "search", sync_to_async(work))


@server.tool(description=(
    "A document's metadata and text: its passages in reading order, up to 100,000 "
    "characters (`truncated` says when there is more)."))
async def get_document(ctx: Context, document_id: int) -> dict:
    """A document's metadata and text."""

    def work(caller: Caller) -> dict:
        document = (documents_visible(user=caller.user, api_key=caller.api_key)
                    .select_related("collection").filter(pk=document_id).first())
        if document is None:
            raise ToolError(f"No document {document_id} that you can read.")
        texts, size, truncated = [], 0, False
        for text in (Chunk.objects.filter(document=document, searchable=True)
                     .order_by("ordinal").values_list("text", flat=True).iterator()):
            if size + len(text) > DOCUMENT_TEXT_LIMIT:
                truncated = True
                break
            texts.append(text)
            size += len(text)
        return {"document_id": document.pk, "title": document.title,
                "filename": document.original_filename, "collection": document.collection.slug,
                "status": document.status, "updated_at": document.updated_at.isoformat(),
                "text": "\n\n".join(texts), "truncated": truncated,
                "url": document.get_absolute_url()}

    return await _call(ctx, "search", sync_to_async(work))


@server.tool(description=(
    "A cited answer from the collections named (`collections`, or one `collection`), or all "
    "you may read; it says so when the documents do not cover the question. Each citation "
    "has the passage and its url."))
async def ask(ctx: Context, question: str, collections: list[str] | None = None,
              collection: str | None = None) -> dict:
    """A cited answer from the named collections, or all the caller may read."""
    collections = [*(collections or []), *([collection] if collection else [])]

    async def work(caller: Caller) -> dict:
        slugs = await sync_to_async(_readable_slugs)(caller, collections)
        try:
            result = await chat_services.answer_complete(
                question=question, conversation_id=None, collection_slug=None,
                collection_slugs=slugs, user=caller.user, api_key=caller.api_key)
        except BudgetExceeded as exc:
            raise ToolError(str(exc)) from None
        except chat_services.ChatError as exc:
            raise ToolError(str(exc)) from None
        if result.error is not None:
            raise ToolError(result.error.message)
        cited = set(result.cited)
        return {"answer": result.answer, "answerable": result.answerable,
                "notice": result.notice, "mode": result.mode,
                "conversation_id": result.conversation_id,
                "citations": [citation for citation in result.citations
                              if citation.get("n") in cited]}

    return await _call(ctx, "chat", work)


# --- Serving it beside Django ------------------------------------------------------------


class _McpApp:
    """The SDK's app for /mcp: the Host is checked as Django checks it (ALLOWED_HOSTS), a
    request without a usable key gets a 401 before it reaches the SDK, and the SDK's app
    and session manager are made and started on an event loop's first request (a test
    process serves the app on several loops, one after the other)."""

    def __init__(self) -> None:
        # Per loop: the app once started, and the task that keeps its session manager open.
        self._apps: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, tuple[asyncio.Future, asyncio.Task]
        ] = weakref.WeakKeyDictionary()

    async def _app(self) -> Callable:
        loop = asyncio.get_running_loop()
        if loop not in self._apps:
            started = loop.create_future()
            self._apps[loop] = (started, loop.create_task(self._run(started)))
        return await asyncio.shield(self._apps[loop][0])

    async def _run(self, started: asyncio.Future) -> None:
        try:
            app = server.streamable_http_app(
                streamable_http_path=MCP_PATH, stateless_http=True, json_response=True,
                # The Host is checked in __call__, against ALLOWED_HOSTS.
                transport_security=TransportSecuritySettings(
                    enable_dns_rebinding_protection=False),
            )
            async with server.session_manager.run():
                started.set_result(app)
                await asyncio.Event().wait()  # for the life of the loop
        except Exception as exc:
            if not started.done():
                started.set_exception(exc)
            raise

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        headers = {key.decode("latin-1").lower(): value.decode("latin-1")
                   for key, value in scope.get("headers", [])}
        host, _ = split_domain_port(headers.get("host", ""))
        if not host or not validate_host(host, settings.ALLOWED_HOSTS):
            await _json(send, 400, {"error": {"code": "bad_host",
                                              "message": "This host is not allowed."}})
            return
        try:
            async with _database():
                await sync_to_async(_authenticate)(headers)
        except exceptions.AuthenticationFailed as exc:
            await _json(send, 401, {"error": {"code": "authentication_failed",
                                              "message": str(exc.detail)}},
                        extra=[(b"www-authenticate", b"Bearer")])
            return
        await (await self._app())(scope, receive, send)


async def _json(send: Callable, status: int, body: dict,
                extra: list[tuple[bytes, bytes]] | None = None) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()), *(extra or [])]})
    await send({"type": "http.response.body", "body": payload})


def mcp_mount(django_app: Callable) -> Callable:
    """An ASGI app that serves /mcp with the MCP server and everything else with Django."""
    mcp_app = _McpApp()

    async def application(scope: dict, receive: Callable, send: Callable) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and (path == MCP_PATH or path.startswith(MCP_PATH + "/")):
            await mcp_app(scope, receive, send)
        else:
            await django_app(scope, receive, send)

    return application
