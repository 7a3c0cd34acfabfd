"""/api/schema/ describes the chat endpoints drf-spectacular cannot see (chat.schema)."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

pytestmark = pytest.mark.django_db


@pytest.fixture
def schema() -> dict:
    response = APIClient().get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert response.status_code == 200
    return response.json()


def test_openai_compatible_endpoints_are_in_the_schema(schema):
    """/v1/models (GET) and /v1/chat/completions (POST) are documented, key-authenticated."""
    models = schema["paths"]["/v1/models"]["get"]
    completions = schema["paths"]["/v1/chat/completions"]["post"]
    assert models["security"] == [{"ApiKey": []}] == completions["security"]
    request = completions["requestBody"]["content"]["application/json"]["schema"]
    assert set(request["required"]) == {"model", "messages"}
    assert {"model", "messages", "stream", "stream_options"} <= set(request["properties"])
    answer = completions["responses"]["200"]["content"]
    assert {"application/json", "text/event-stream"} <= set(answer)
    listed = models["responses"]["200"]["content"]["application/json"]["schema"]
    assert listed["properties"]["data"]["items"]["properties"]["id"]["example"] == "kb-demo"


def test_every_reference_in_the_schema_resolves(schema):
    """The hand-written operations refer only to components that exist (Citation, ApiKey)."""
    import json
    import re

    text = json.dumps(schema)
    for name in set(re.findall(r'"#/components/schemas/([^"]+)"', text)):
        assert name in schema["components"]["schemas"], name
    for path in ("/v1/models", "/v1/chat/completions", "/api/v1/chat"):
        for operation in schema["paths"][path].values():
            for requirement in operation["security"]:
                assert set(requirement) <= set(schema["components"]["securitySchemes"])


def test_swagger_page_lists_the_openai_compatible_tag(client, django_user_model):
    """The Swagger UI page is served (from the sidecar), and the schema it loads tags /v1."""
    response = client.get("/api/docs/")
    assert response.status_code == 200
    tags = {tag for path in ("/v1/models", "/v1/chat/completions")
            for operation in APIClient().get("/api/schema/", HTTP_ACCEPT="application/json")
            .json()["paths"][path].values() for tag in operation["tags"]}
    assert tags == {"openai-compatible"}
