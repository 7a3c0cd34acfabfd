"""Agents and editors through `serve` and its workers: an MCP client searches and asks with
a reader's key, and an outsider's key is refused the restricted collection; a reader's
thumbs-down shows on the Quality screen with what was retrieved, and the editor turns it
into a golden set that kb_eval --golden runs."""

from __future__ import annotations

import json
import re

import httpx
import httpx2
import pytest
from asgiref.sync import async_to_sync
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.acceptance.conftest import ADMIN_PASSWORD, RESTRICTED, documents_wait_ready

pytestmark = pytest.mark.slow

RUNBOOK = ("# Pilot boarding\n\nPilots board inbound tankers at the Outer Mark buoy, two "
           "nautical miles south of the breakwater.\n")
QUESTION = "Where do pilots board inbound tankers?"


@pytest.fixture(scope="module")
def runbook(kb_server) -> dict:
    with kb_server.api() as api:
        response = api.post("/api/v1/documents/", json={
            "title": "Pilot boarding", "text": RUNBOOK, "format": "markdown",
            "collection": RESTRICTED, "filename": "pilot-boarding.md"})
    assert response.status_code == 202, response.text
    documents = documents_wait_ready(kb_server, collection=RESTRICTED, count=1)
    keys = {}
    for username in ("reader", "outsider"):
        if username == "outsider":
            kb_server.manage("shell", "-c", "from django.contrib.auth import get_user_model; "
                                            "get_user_model().objects.create_user('outsider')")
        keys[username] = kb_server.manage("kb_apikey", "create", "--user", username).strip()
    document = next(d for d in documents if d["original_filename"] == "pilot-boarding.md")
    return {"keys": keys, "document": document}


def mcp_call(base: str, key: str, tool: str, arguments: dict) -> tuple[bool, str]:
    async def run():
        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=120)
        async with http, Client(streamable_http_client(f"{base}/mcp", http_client=http)) as client:
            result = await client.call_tool(tool, arguments)
        return result.is_error, "".join(getattr(part, "text", "") for part in result.content)

    return async_to_sync(run)()


def test_an_agent_searches_and_asks_over_mcp_and_an_outsider_is_refused(kb_server, runbook):
    reader, outsider = runbook["keys"]["reader"], runbook["keys"]["outsider"]
    error, text = mcp_call(kb_server.base, reader, "search",
                           {"query": "pilots board tankers", "collections": [RESTRICTED]})
    assert not error and "Outer Mark buoy" in text
    error, text = mcp_call(kb_server.base, reader, "ask",
                           {"question": QUESTION, "collections": [RESTRICTED]})
    assert not error and "Outer Mark" in json.loads(text)["answer"]
    error, text = mcp_call(kb_server.base, outsider, "search",
                           {"query": "pilots board tankers", "collections": [RESTRICTED]})
    assert error and "No collection you can read" in text and "Outer Mark" not in text
    response = httpx.post(f"{kb_server.base}/mcp", json={})
    assert response.status_code == 401


def _admin_sign_in(web: httpx.Client) -> None:
    web.get("/admin/login/")
    signed_in = web.post("/admin/login/?next=/admin/", data={
        "username": "admin", "password": ADMIN_PASSWORD,
        "csrfmiddlewaretoken": web.cookies["csrftoken"]})
    assert signed_in.status_code == 302, signed_in.text[:2000]


def test_a_thumbs_down_becomes_a_golden_set_that_kb_eval_runs(kb_server, runbook):
    reader = httpx.Client(base_url=kb_server.base, timeout=120,
                          headers={"Authorization": f"Bearer {runbook['keys']['reader']}"})
    with reader:
        answer = reader.post("/api/v1/chat", json={"message": QUESTION, "stream": False,
                                                   "collection": RESTRICTED})
        assert answer.status_code == 200, answer.text
        vote = reader.put(f"/api/v1/chat/messages/{answer.json()['message_id']}/feedback",
                          json={"rating": "down", "reason": "incomplete",
                                "comment": "Say which channel, too."})
        assert vote.status_code == 200, vote.text

    with httpx.Client(base_url=kb_server.base, timeout=60) as web:
        _admin_sign_in(web)
        page = web.get("/admin/quality/")
        assert page.status_code == 200
        assert QUESTION in page.text and "Say which channel, too." in page.text
        assert "pilot-boarding" in page.text.lower() or "Pilot boarding" in page.text
        link = re.search(r'href="([^"]+)" data-testid="add-to-golden-set"', page.text)
        assert link, page.text[:3000]
        form_url = link.group(1).replace("&amp;", "&")
        assert web.get(form_url).status_code == 200
        added = web.post(form_url, data={
            "csrfmiddlewaretoken": web.cookies["csrftoken"], "question": QUESTION,
            "collection": re.search(r"collection=(\d+)", form_url).group(1),
            "documents": [str(runbook["document"]["id"])]})
        assert added.status_code == 302, added.text[:3000]

    report = kb_server.manage("kb_eval", "--golden", RESTRICTED, "--modes", "bm25,hybrid")
    assert "golden set v1, 1 questions" in report
    hybrid = next(line for line in report.splitlines() if line.startswith("hybrid"))
    assert float(hybrid.split()[1]) == 1.0  # recall@10: the runbook is found
