"""The quality gate on activating an embedding model: a random-vector model is refused, a
genuine one passes, an editor may override with a reason; golden sets are used where they
exist, generated queries where not, and the verdict says which."""

from __future__ import annotations

import pytest

from kb import embeddings
from kb.models import EmbeddingModel
from search import golden
from search.quality_gate import quality_gate_latest
from tests.kb.test_management_api import client_for, user_with
from tests.search.test_golden import TOPICS

pytestmark = pytest.mark.django_db


@pytest.fixture
def candidates(settings):
    settings.KB_PROVIDERS = {**settings.KB_PROVIDERS, "embedding": {
        **settings.KB_PROVIDERS["embedding"],
        "random": {"BACKEND": "tests.fakes.random_embeddings.RandomEmbeddings",
                   "MODEL": "random-32"},
        # The same bundled model under another key: a genuine model that measures the same.
        "minilm-int8-again": {**settings.KB_PROVIDERS["embedding"]["minilm-int8"]},
    }}


@pytest.fixture
def harbour(collection, ingest_one):
    return {name: ingest_one(collection, name, f"# {name[:-3].title()}\n\n{text}\n")
            for name, (text, _) in TOPICS.items()}


def built(key: str) -> EmbeddingModel:
    model = embeddings.reembed_start(key=key)
    return embeddings.reembed_run(model_id=model.pk, activate=False)


def test_a_random_vector_model_is_refused_and_stays_ready(harbour, candidates):
    candidate = built("random")
    assert candidate.status == EmbeddingModel.Status.READY
    with pytest.raises(embeddings.QualityGateRefused, match="searches worse"):
        embeddings.embedding_model_activate(model=candidate)
    candidate.refresh_from_db()
    run = quality_gate_latest(model=candidate)
    assert not candidate.is_active and run.outcome == "refused"
    (verdict,) = run.verdict["collections"]
    assert verdict["source"].startswith("generated from") and verdict["worse"]
    assert "generated queries, not a golden set" in run.summary
    assert EmbeddingModel.objects.get(is_active=True).key == "minilm-int8"


def test_a_genuine_model_passes(harbour, candidates):
    candidate = embeddings.embedding_model_activate(model=built("minilm-int8-again"))
    assert candidate.is_active and quality_gate_latest(model=candidate).outcome == "passed"


def test_the_golden_set_is_used_where_there_is_one(harbour, collection, candidates):
    for name, (_, question) in TOPICS.items():
        golden.golden_query_save(collection=collection, question=question,
                                 documents=[harbour[name]])
    candidate = built("random")
    with pytest.raises(embeddings.QualityGateRefused):
        embeddings.embedding_model_activate(model=candidate)
    (verdict,) = quality_gate_latest(model=candidate).verdict["collections"]
    assert verdict["source"] == "golden set v5" and verdict["queries"] == 5
    assert verdict["current"]["vector"]["recall@10"] == 1.0


def test_an_override_with_a_reason_activates_and_is_kept(harbour, candidates):
    candidate = embeddings.embedding_model_activate(
        model=built("random"), override_reason="Testing the new provider for a day.")
    assert candidate.is_active
    run = quality_gate_latest(model=candidate)
    assert (run.outcome, run.override_reason) == ("overridden",
                                                  "Testing the new provider for a day.")


def test_a_reembed_asked_to_activate_leaves_a_refused_model_ready(harbour, candidates):
    model = embeddings.reembed_start(key="random")
    model = embeddings.reembed_run(model_id=model.pk, activate=True)
    assert model.status == EmbeddingModel.Status.READY and not model.is_active
    assert "searches worse" in model.error_message


def test_the_api_says_why_and_takes_an_override(harbour, candidates, django_user_model):
    candidate = built("random")
    api, _ = client_for(user_with(django_user_model, "operator", "view_embeddingmodel",
                                  "change_embeddingmodel"))
    refused = api.post(f"/api/v1/embedding-models/{candidate.key}/activate/")
    assert refused.status_code == 400
    assert "searches worse" in refused.json()["error"]["fields"]["quality_gate"][0]
    forced = api.post(f"/api/v1/embedding-models/{candidate.key}/activate/",
                      {"override_reason": "Benchmarking"}, format="json")
    assert forced.status_code == 200 and forced.json()["is_active"] is True
    assert forced.json()["quality_gate"]["override_reason"] == "Benchmarking"


def test_a_settings_change_is_checked_before_it_is_made(harbour, collection, settings):
    import io
    import json

    from django.core.management import call_command
    from django.core.management.base import CommandError

    for name, (_, question) in TOPICS.items():
        golden.golden_query_save(collection=collection, question=question,
                                 documents=[harbour[name]])
    out = io.StringIO()
    call_command("kb_quality_gate", "--rrf-k", "30", "--bm25-engine", "sql", "--json",
                 stdout=out)
    verdict = json.loads(out.getvalue())
    assert verdict["passed"] and "at least as well" in verdict["summary"]
    (measured,) = verdict["collections"]
    assert measured["source"] == "golden set v5" and set(measured["candidate"]) == {
        "bm25", "hybrid"}
    # Five distinct documents score the same under any sane setting; a tolerance below
    # zero makes an equal figure a loss, to show what a refusal does.
    settings.KB_QUALITY_GATE_TOLERANCE = -0.01
    with pytest.raises(CommandError, match="refuses"):
        call_command("kb_quality_gate", "--rrf-k", "30", stdout=io.StringIO())


def test_a_chunking_change_is_measured_on_a_temporary_copy(harbour, collection):
    import io
    import json

    from django.core.management import call_command

    from kb.models import Collection, Document

    for name, (_, question) in TOPICS.items():
        golden.golden_query_save(collection=collection, question=question,
                                 documents=[harbour[name]])
    before = set(Collection.objects.values_list("slug", flat=True))
    out = io.StringIO()
    call_command("kb_quality_gate", "--chunk-max-tokens", "64", "--chunk-overlap-tokens", "8",
                 "--json", stdout=out)
    verdict = json.loads(out.getvalue())
    (measured,) = verdict["collections"]
    assert measured["source"] == "golden set v5"
    assert measured["candidate"]["hybrid"]["recall@10"] == 1.0 and verdict["passed"]
    assert "chunks of 64 tokens with 8 of overlap" in verdict["summary"]
    # The copy is gone, documents and all.
    assert set(Collection.objects.values_list("slug", flat=True)) == before
    assert Document.objects.count() == len(TOPICS)
