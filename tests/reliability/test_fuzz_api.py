"""The API fuzzed with schemathesis against its own /api/schema/: no 5xx, answers match it.

A real uvicorn serves the project against the test database (tests.live_server); the
schema is fetched from it over HTTP, and every operation is driven with a bounded number
of schema-conforming (positive) and schema-violating (negative) requests, authenticated
with a real API key of an ordinary user. Two checks run on every response:

- `not_a_server_error`: never a 5xx;
- `response_schema_conformance`: a documented status code comes with a body that matches
  its documented schema.

POST /api/v1/chat and /v1 (OpenAI-compatible) are plain async Django views, described by
chat.schema's postprocessing hook; the two chat operations are fuzzed non-streaming
(`stream` is always false, as an SSE body cannot be validated against a JSON schema).
Every failure is collected, per operation, with
schemathesis' reproduction (a curl command), and reported together.

Bugs the fuzzer found that are not fixed yet are listed in KNOWN_BUGS: a 5xx caused by one
of them is counted, not failed, so the fuzzer keeps looking for new ones, and each has a
deterministic regression below marked xfail(strict=True). When a fix lands, its xfail
turns into a failure (XPASS): remove the marker and the KNOWN_BUGS entry together.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from django.contrib.auth import get_user_model
from django.test import Client
from hypothesis import HealthCheck, Phase, given, settings

# A dev dependency (schemathesis==4.32.5); skipped, not failed, where it is not installed.
pytest.importorskip("schemathesis")
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.openapi import from_dict
from schemathesis.specs.openapi.checks import response_schema_conformance

from kb.models import ApiKey
from kb.services.api_keys import api_key_generate, api_key_hash
from kb.services.collections import collection_get_or_create
from kb.services.uploads import documents_upload
from tests.live_server import running_asgi_server
from tests.reliability.stats import fuzz_count, stat_set

pytestmark = pytest.mark.django_db

# Per generation mode, so up to 50 requests per operation; KB_API_FUZZ_EXAMPLES digs deeper.
EXAMPLES_PER_OPERATION = int(os.environ.get("KB_API_FUZZ_EXAMPLES") or 25)
CHECKS = [not_a_server_error, response_schema_conformance]


# Bugs found by this fuzzer and not fixed yet; each has a regression below.
KNOWN_BUGS: dict[str, Callable[[Any], bool]] = {
    # None open. An entry: "name": lambda case: <True for the cases the bug explains>.
}


def known_bug(case: Any) -> str | None:
    """The KNOWN_BUGS entry that explains a 5xx for this case, if any."""
    for name, matches in KNOWN_BUGS.items():
        try:
            if matches(case):
                return name
        except Exception:
            continue
    return None

HANDBOOK = """# Operations handbook

## Backups

The database is backed up every night at 02:00 UTC. Backups are kept for 30 days.

## Uploads

Uploaded PDF files are limited to 50 MB each. Zip archives are unpacked.
"""

def corpus_and_key(settings, on_commit=contextlib.nullcontext) -> str:
    """A small corpus (a public and a restricted collection) and an ordinary user's key.

    on_commit: in a test transaction, django_capture_on_commit_callbacks, so the queued
    ingestion runs (with transactional_db it runs at commit anyway)."""
    from tests.chat.conftest import EXTRACTIVE_ENTRY

    settings.KB_PROVIDERS = {**settings.KB_PROVIDERS, "chat": [EXTRACTIVE_ENTRY]}
    docs = collection_get_or_create(slug="docs", name="Docs")
    collection_get_or_create(slug="default", name="Default")
    private = collection_get_or_create(slug="private", name="Private")
    private.is_public = False
    private.save()
    for collection, name in ((docs, "handbook.md"), (private, "secret.md")):
        with on_commit(execute=True) if on_commit is not contextlib.nullcontext else on_commit():
            (outcome,) = documents_upload(collection=collection, filename=name,
                                                   data=HANDBOOK.encode())
        outcome.document.refresh_from_db()
        assert outcome.document.status == "ready", outcome.document.error_message

    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Permission

    user = get_user_model().objects.create_user("fuzzer", password="pw-fuzzer-123")
    # An editor's key, so uploads are fuzzed past the permission check.
    user.user_permissions.add(Permission.objects.get(codename="add_document"))
    raw, prefix = api_key_generate()
    ApiKey.objects.create(name="fuzz", prefix=prefix, hashed_key=api_key_hash(raw), user=user)
    return raw


@pytest.fixture
def api(transactional_db, settings) -> Iterator[tuple[str, str, dict]]:
    """(base URL, raw API key, ids of a real conversation and message) of a served app."""
    raw = corpus_and_key(settings)
    with running_asgi_server() as url:
        # One conversation with messages, so the read endpoints have something to return.
        answer = requests.post(url + "/api/v1/chat", timeout=60,
                               headers={"Authorization": f"Bearer {raw}"},
                               json={"message": "When are backups made?", "collection": "docs",
                                     "stream": False})
        assert answer.status_code == 200, answer.text
        ids = {"conversation": answer.json()["conversation_id"],
               "message": answer.json()["message_id"]}
        yield url, raw, ids


def load_schema(url: str) -> dict:
    """The served schema as a dict."""
    response = requests.get(url + "/api/schema/", params={"format": "json"}, timeout=30)
    response.raise_for_status()
    return response.json()


def fuzz_operation(operation, mode: GenerationMode, *, url: str, headers: dict[str, str],
                   statuses: Counter[int]) -> None:
    """Drive one operation with EXAMPLES_PER_OPERATION cases of one mode; raise on a failure."""
    label = operation.label

    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate, Phase.shrink],
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case):
        if (label in {"POST /api/v1/chat", "POST /v1/chat/completions"}
                and isinstance(case.body, dict)):
            case.body["stream"] = False  # an SSE body has no JSON schema to check
        response = case.call(base_url=url, headers=headers, timeout=60)
        statuses[response.status_code] += 1
        fuzz_count(f"API {label}", f"{mode.value} {response.status_code}")
        if response.status_code >= 500 and (bug := known_bug(case)):
            fuzz_count(f"API {label}", f"known bug {bug}")
            return
        case.validate_response(response, checks=CHECKS, headers=headers)

    run()


def fuzz_operations(operations: list, *, url: str, failures: dict[str, list[str]],
                    statuses: dict[str, Counter[int]],
                    headers_for: Callable[[str], dict[str, str]]) -> None:
    """Both generation modes on each operation; failures collected per operation label."""
    for operation in operations:
        statuses[operation.label] = Counter()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                fuzz_operation(operation, mode, url=url, headers=headers_for(operation.label),
                               statuses=statuses[operation.label])
            except (Exception, BaseExceptionGroup) as exc:
                # A FailureGroup (with a curl repro), or a crash.
                failures.setdefault(operation.label, []).append(f"[{mode.value}] {exc}")


def known_good_cases(schema, ids: dict) -> list:
    """Requests the fuzzer cannot guess (real ids), so 200 answers are checked too."""
    from kb.models import Chunk, Document

    document = Document.objects.filter(collection__slug="docs").first()
    chunk = Chunk.objects.filter(document=document, searchable=True).first()
    wanted = [
        ("GET /api/v1/conversations/{id}", {"id": ids["conversation"]}),
        ("GET /api/v1/chat/messages/{id}", {"id": ids["message"]}),
        ("GET /api/v1/documents/{id}/", {"id": document.pk}),
        ("GET /api/v1/chunks/{id}/", {"id": chunk.pk}),
    ]
    cases = []
    for label, path_parameters in wanted:
        operation = schema.find_operation_by_label(label)
        assert operation is not None, label
        cases.append(operation.Case(path_parameters=path_parameters))
    return cases


@pytest.mark.slow
def test_every_operation_survives_fuzzing_without_5xx_and_matches_the_schema(api):
    """25 positive + 25 negative cases per operation: no 5xx, every documented answer valid."""
    url, raw_key, ids = api
    raw_schema = load_schema(url)
    schema = from_dict(raw_schema)
    headers = {"Authorization": f"Bearer {raw_key}"}
    failures: dict[str, list[str]] = {}
    statuses: dict[str, Counter[int]] = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 11

    # Revoking keys is fuzzed with a key of another user: a guessed id could otherwise be
    # the fuzzer's own key, and every later request would be a 401.
    spare_user = get_user_model().objects.create_user("fuzz-spare", password="pw-spare-123")
    spare_raw, spare_prefix = api_key_generate()
    ApiKey.objects.create(name="spare", prefix=spare_prefix, hashed_key=api_key_hash(spare_raw),
                          user=spare_user)
    own_key = {"Authorization": f"Bearer {spare_raw}"}

    fuzz_operations(operations, url=url, failures=failures, statuses=statuses,
                    headers_for=lambda label: own_key if label == "DELETE /api/v1/keys/{id}/"
                    else headers)
    for case in known_good_cases(schema, ids):
        response = case.call(base_url=url, headers=headers, timeout=60)
        assert response.status_code == 200, (case.operation.label, response.text)
        statuses[case.operation.label][200] += 1
        try:
            case.validate_response(response, checks=CHECKS, headers=headers)
        except (Exception, BaseExceptionGroup) as exc:
            failures.setdefault(case.operation.label, []).append(f"[known good] {exc}")

    stat_set("api_fuzz", {
        "operations": len(operations),
        "requests": sum(sum(counter.values()) for counter in statuses.values()),
        "statuses": {label: dict(counter) for label, counter in statuses.items()},
        "failures": {label: len(items) for label, items in failures.items()},
    })
    assert not failures, "\n\n".join(
        f"== {label}\n" + "\n".join(items) for label, items in failures.items())


# The management operations behind model permissions: fuzzed again as a superuser, so the
# cases reach validation and the database instead of stopping at a 403.
OPERATOR_PATHS = ("/api/v1/collections/", "/api/v1/budgets/", "/api/v1/usage/",
                  "/api/v1/answer-cache/", "/api/v1/embedding-models/",
                  "/api/v1/golden-queries/")


@pytest.mark.slow
def test_management_operations_survive_fuzzing_as_a_superuser(api):
    url, _, _ = api
    schema = from_dict(load_schema(url))
    root = get_user_model().objects.create_superuser("fuzz-root", password="pw-fuzz-root-1")
    raw, prefix = api_key_generate()
    ApiKey.objects.create(name="root", prefix=prefix, hashed_key=api_key_hash(raw), user=root)
    operations = [operation for result in schema.get_all_operations()
                  if (operation := result.ok()).path.startswith(OPERATOR_PATHS)]
    assert len(operations) >= 15
    failures: dict[str, list[str]] = {}
    statuses: dict[str, Counter[int]] = {}
    fuzz_operations(operations, url=url, failures=failures, statuses=statuses,
                    headers_for=lambda label: {"Authorization": f"Bearer {raw}"})
    assert not failures, "\n\n".join(
        f"== {label}\n" + "\n".join(items) for label, items in failures.items())


def test_the_served_schema_describes_the_chat_endpoint():
    """POST /api/v1/chat is an async Django view; chat.schema describes it all the same."""
    from drf_spectacular.generators import SchemaGenerator

    paths = SchemaGenerator().get_schema(request=None, public=True)["paths"]
    operation = paths["/api/v1/chat"]["post"]
    request_schema = operation["requestBody"]["content"]["application/json"]["schema"]
    assert request_schema["required"] == ["message"]
    assert set(operation["responses"]["200"]["content"]) == {
        "application/json", "text/event-stream",
    }


# --- Regressions for the bugs the fuzzer found ---


@pytest.fixture
def client(db, settings, django_capture_on_commit_callbacks) -> Client:
    raw = corpus_and_key(settings, on_commit=django_capture_on_commit_callbacks)
    return Client(HTTP_AUTHORIZATION=f"Bearer {raw}")


@pytest.mark.parametrize("path", ["/api/v1/collections/", "/api/v1/documents/",
                                  "/api/v1/chunks/", "/api/v1/conversations"])
def test_a_huge_page_limit_is_not_a_server_error(client, path):
    """?limit= past bigint is clamped (or refused), never a DataError 500."""
    # An empty list never reaches the SQL slice: give the caller a conversation too.
    asked = client.post("/api/v1/chat", content_type="application/json",
                        data=json.dumps({"message": "When are backups made?", "stream": False}))
    assert asked.status_code == 200
    response = client.get(path, {"limit": str(2**63)})
    assert response.status_code < 500


@pytest.mark.parametrize("metadata", [{"key\x00": "v"}, {"key": "v\x00"}, {"key": "\ud800"}])
def test_a_nul_in_a_metadata_filter_is_a_400(client, metadata):
    """jsonb cannot hold NUL or lone surrogates: the API refuses them as a field error."""
    response = client.post("/api/v1/search", content_type="application/json",
                           data=json.dumps({"query": "backups", "filters": {"metadata": metadata}}))
    assert response.status_code == 400


@pytest.mark.parametrize("body", ["false", "[]", "3", '"text"'])
def test_an_upload_with_a_json_body_that_is_not_an_object_is_a_400(client, body):
    """POST /api/v1/documents/ with JSON that is not an object is a field error, not a 500."""
    response = client.post("/api/v1/documents/", data=body, content_type="application/json")
    assert response.status_code == 400


@pytest.mark.parametrize("params", [{"collection": "docs\x00"}, {"status": "ready\x00"}])
def test_a_nul_in_a_document_list_filter_is_not_a_server_error(client, params):
    """The document list's ?collection= and ?status= filters refuse NUL instead of a 500."""
    response = client.get("/api/v1/documents/", params)
    assert response.status_code < 500


def test_a_conversation_over_all_collections_matches_the_schema(client):
    """A conversation asked without a collection has "collection": null; the schema must
    say the field is nullable (SlugRelatedField(..., allow_null=True))."""
    from drf_spectacular.generators import SchemaGenerator

    answer = client.post("/api/v1/chat", content_type="application/json",
                         data=json.dumps({"message": "When are backups made?", "stream": False}))
    assert answer.status_code == 200, answer.content
    detail = client.get(f"/api/v1/conversations/{answer.json()['conversation_id']}")
    assert detail.json()["collection"] is None
    schema = SchemaGenerator().get_schema(request=None, public=True)
    assert schema["components"]["schemas"]["Conversation"]["properties"]["collection"].get(
        "nullable") is True
