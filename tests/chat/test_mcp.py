"""The MCP server at /mcp, driven by the official `mcp` client as an agent would, through a
real uvicorn: the tools answer with the same access rules as the REST API."""

from __future__ import annotations

import json

import httpx
import httpx2
import pytest
from asgiref.sync import async_to_sync
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from kb.models import ApiKey, UsageRecord
from kb.services.api_keys import api_key_generate, api_key_hash
from kb.services.collections import collection_get_or_create
from tests.live_server import running_asgi_server

pytestmark = pytest.mark.django_db(transaction=True)

PUBLIC = "# Cafeteria\n\nThe cafeteria opens at 11:30 and serves soup every day.\n"
PRIVATE = "# Salary bands\n\nThe B4 salary band starts at 71,500 euros for senior engineers.\n"


def key_for(user, *, collections=()) -> str:
    raw, prefix = api_key_generate()
    key = ApiKey.objects.create(name="agent", prefix=prefix, hashed_key=api_key_hash(raw),
                                user=user)
    key.collections.set(collections)
    return raw


@pytest.fixture
def world(django_user_model, ingest_one):
    general = collection_get_or_create(slug="general")
    salaries = collection_get_or_create(slug="salaries")
    salaries.is_public = False
    salaries.save()
    reader = django_user_model.objects.create_user("reader")
    salaries.allowed_users.add(reader)
    outsider = django_user_model.objects.create_user("outsider")
    ingest_one(general, "cafeteria.md", PUBLIC)
    private_doc = ingest_one(salaries, "salaries.md", PRIVATE)
    with running_asgi_server() as base:
        yield {"base": base, "reader": key_for(reader), "outsider": key_for(outsider),
               "narrowed": key_for(reader, collections=[general]), "private_doc": private_doc}


def call(base: str, key: str, tool: str, arguments: dict) -> tuple[bool, object]:
    """(is_error, the tool's structured result or its error text), over streamable HTTP."""

    async def run():
        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=60)
        async with http, Client(streamable_http_client(f"{base}/mcp", http_client=http)) as client:
            result = await client.call_tool(tool, arguments)
        text = "".join(getattr(part, "text", "") for part in result.content)
        if result.is_error:
            return True, text
        return False, result.structured_content or json.loads(text)

    return async_to_sync(run)()


def tools(base: str, key: str) -> set[str]:
    async def run():
        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=60)
        async with http, Client(streamable_http_client(f"{base}/mcp", http_client=http)) as client:
            return {tool.name for tool in (await client.list_tools()).tools}

    return async_to_sync(run)()


def test_an_agent_lists_searches_reads_and_asks(world):
    base, key = world["base"], world["reader"]
    assert tools(base, key) == {"list_collections", "search", "get_chunk", "get_document",
                                "ask"}
    error, collections = call(base, key, "list_collections", {})
    assert not error
    slugs = {row["slug"] for row in collections["result"]}
    assert {"general", "salaries"} <= slugs

    error, found = call(base, key, "search", {"query": "salary band senior engineers"})
    assert not error
    top = found["passages"][0]
    assert "71,500" in top["text"] and top["url"].startswith("/documents/")
    error, chunk = call(base, key, "get_chunk", {"chunk_id": top["chunk_id"]})
    assert not error and chunk["text"] == top["text"]
    error, document = call(base, key, "get_document", {"document_id": top["document_id"]})
    assert not error and "71,500" in document["text"] and document["collection"] == "salaries"

    error, answer = call(base, key, "ask", {"question": "What does the B4 band start at?",
                                            "collections": ["salaries"]})
    assert not error and "71,500" in answer["answer"] and answer["citations"]
    assert UsageRecord.objects.filter(kind=UsageRecord.Kind.SEARCH).exists()


def test_a_key_never_reads_past_its_user_or_its_scope(world):
    private = world["private_doc"]
    for key in (world["outsider"], world["narrowed"]):
        error, found = call(world["base"], key, "search", {"query": "salary band"})
        assert not error and "71,500" not in json.dumps(found)
        error, text = call(world["base"], key, "search",
                           {"query": "salary", "collections": ["salaries"]})
        assert error and "No collection you can read: salaries" in text
        error, text = call(world["base"], key, "get_document", {"document_id": private.pk})
        assert error and "71,500" not in text
        error, text = call(world["base"], key, "ask", {"question": "B4 salary band?",
                                                        "collections": ["salaries"]})
        assert error and "71,500" not in text


@pytest.mark.parametrize("authorization", [None, "Bearer kb_not_a_key", "Basic abc"])
def test_without_a_valid_key_the_endpoint_is_a_401(world, authorization):
    headers = {"Accept": "application/json, text/event-stream",
               **({"Authorization": authorization} if authorization else {})}
    response = httpx.post(f"{world['base']}/mcp", headers=headers, json={
        "jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}})
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"


def test_an_unknown_host_is_refused(world):
    response = httpx.post(f"{world['base']}/mcp", headers={"Host": "evil.example",
                                                           "Authorization": "Bearer x"})
    assert response.status_code == 400


def test_revoked_keys_and_deactivated_users_get_a_401(world, django_user_model):
    from django.utils import timezone

    leaver = django_user_model.objects.create_user("leaver")
    leavers_key = key_for(leaver)
    leaver.is_active = False
    leaver.save()
    revoked = key_for(django_user_model.objects.get(username="reader"))
    ApiKey.objects.filter(prefix=revoked.split("_")[1]).update(revoked_at=timezone.now())
    for key in (leavers_key, revoked):
        response = httpx.post(f"{world['base']}/mcp", json={}, headers={
            "Authorization": f"Bearer {key}", "Accept": "application/json, text/event-stream"})
        assert response.status_code == 401, key


def test_the_rest_apis_rate_limits_apply(world, settings):
    settings.RATELIMIT_ENABLE = True
    ApiKey.objects.filter(prefix=world["reader"].split("_")[1]).update(rate_limit="2/m")
    outcomes = [call(world["base"], world["reader"], "search", {"query": "cafeteria"})[0]
                for _ in range(3)]
    assert outcomes == [False, False, True]
    error, text = call(world["base"], world["reader"], "search", {"query": "cafeteria"})
    assert error and "Rate limit for search reached (2/m)" in text


def test_one_collection_by_its_singular_name_narrows_like_the_list(world):
    """`collection`, as the REST API spells it, is not silently ignored."""
    error, found = call(world["base"], world["reader"], "search",
                        {"query": "salary band senior engineers", "collection": "general"})
    assert not error and "71,500" not in json.dumps(found)
    error, text = call(world["base"], world["outsider"], "ask",
                       {"question": "B4 band?", "collection": "salaries"})
    assert error and "No collection you can read: salaries" in text


def test_access_matrix_of_the_mcp_tools(world, django_user_model):
    """Every role × every tool, over the restricted collection: what each may read, and
    that no refused answer carries its text. (tests/kb/test_access_matrix.py drives Django's
    test client, which cannot reach the ASGI mount; this is the same matrix for /mcp.)"""
    from django.utils import timezone

    from kb.models import Chunk

    root = django_user_model.objects.create_superuser("root", password="pw-root-1111")
    revoked = key_for(root)
    ApiKey.objects.filter(prefix=revoked.split("_")[1]).update(revoked_at=timezone.now())
    keys = {"superuser": key_for(root), "reader": world["reader"],
            "narrowed": world["narrowed"], "outsider": world["outsider"]}
    private = world["private_doc"]
    chunk = Chunk.objects.filter(document=private, searchable=True).first()
    calls = {
        "search": {"query": "salary band senior engineers", "collections": ["salaries"]},
        "ask": {"question": "Where does the B4 band start?", "collections": ["salaries"]},
        "get_document": {"document_id": private.pk},
        "get_chunk": {"chunk_id": chunk.pk},
    }
    allowed = {"superuser", "reader"}
    failures = []
    for role, key in keys.items():
        for tool, arguments in calls.items():
            error, body = call(world["base"], key, tool, arguments)
            text = json.dumps(body) if not isinstance(body, str) else body
            readable = not error and "71,500" in text
            if readable != (role in allowed) or (error and "71,500" in text):
                failures.append(f"{role} {tool}: error={error} {text[:120]}")
        error, body = call(world["base"], key, "list_collections", {})
        listed = {row["slug"] for row in body["result"]} if not error else set()
        if ("salaries" in listed) != (role in allowed):
            failures.append(f"{role} list_collections: {sorted(listed)}")
    for key in (revoked, None):
        headers = {"Accept": "application/json, text/event-stream",
                   **({"Authorization": f"Bearer {key}"} if key else {})}
        response = httpx.post(f"{world['base']}/mcp", headers=headers, json={
            "jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}})
        if response.status_code != 401:
            failures.append(f"{'revoked' if key else 'anonymous'}: {response.status_code}")
    assert failures == [], "\n".join(failures)
