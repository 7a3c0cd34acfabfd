"""Agents and editors through `serve` and its workers: an MCP client searches and asks with
a reader's key, and an outsider's key is refused the restricted collection; a reader's
thumbs-down shows on the Quality screen with what was retrieved, and the editor turns it
into a golden set that kb_eval --golden runs."""

from __future__ import annotations

import json
import re
import time

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
    # Its own outsider: the session's server is shared with the other acceptance tests.
    kb_server.manage("shell", "-c", "from django.contrib.auth import get_user_model; "
                                    "get_user_model().objects.create_user('mcp-outsider')")
    keys = {name: kb_server.manage("kb_apikey", "create", "--user", username).strip()
            for name, username in (("reader", "reader"), ("outsider", "mcp-outsider"))}
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


HARBOUR_NOTES = {
    "tug-roster": "The harbour tug roster pairs two tugs with every tanker over 80,000 tonnes.",
    "dredging": "Maintenance dredging of the north channel happens every second August.",
    "berth-lights": "Berth lights are green for a free berth and flashing amber for a closing one.",
    "fog-signals": "In fog the pier horn sounds two long blasts every ninety seconds.",
    "waste-oil": "Waste oil from visiting ships goes to the barge moored at quay four.",
    "customs": "Customs officers board foreign vessels within two hours of arrival.",
    "fenders": "Quay fenders are inspected after every storm with winds above force nine.",
    "cranes": "The container cranes stop working when gusts exceed 55 knots.",
}


def test_the_quality_gate_refuses_to_switch_search_to_random_vectors(kb_server, runbook):
    """A re-embedding with a model of random vectors, asked to activate when complete, runs
    in the workers and ends ready but not active, with the gate's verdict; search keeps
    serving the bundled model."""
    admin_key = kb_server.manage("kb_apikey", "create", "--user", "admin").strip()
    with httpx.Client(base_url=kb_server.base, timeout=60,
                      headers={"Authorization": f"Bearer {admin_key}"}) as api:
        # A collection with enough distinct documents for the comparison to mean something.
        assert api.post("/api/v1/collections/", json={
            "slug": "harbour-notes", "name": "Harbour notes"}).status_code == 201
        for name, text in HARBOUR_NOTES.items():
            assert api.post("/api/v1/documents/", json={
                "title": name.replace("-", " ").title(), "text": f"# {name}\n\n{text}\n",
                "collection": "harbour-notes", "filename": f"{name}.md"}).status_code == 202
        documents_wait_ready(kb_server, collection="harbour-notes", count=len(HARBOUR_NOTES))
        started = api.post("/api/v1/embedding-models/", json={"key": "custom",
                                                               "activate": True})
        assert started.status_code == 202, started.text
        deadline = time.monotonic() + 300
        # Ready comes first, then the activation the job was asked for runs the gate.
        while not ((job := api.get(started.headers["Location"]).json())["quality_gate"]
                   or job["is_active"] or job["status"] not in {"building", "ready"}):
            assert time.monotonic() < deadline, (job, kb_server.log()[-3000:])
            time.sleep(1)
        assert job["status"] == "ready" and job["is_active"] is False, job
        assert job["quality_gate"]["outcome"] == "refused", job["quality_gate"]
        assert "searches worse" in job["error_message"]
        listed = api.get("/api/v1/embedding-models/").json()
        assert [m["key"] for m in listed if m["is_active"]] == ["minilm-int8"]
