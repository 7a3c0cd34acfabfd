"""The contract every provider backend keeps, checked the same way for each (as Wagtail tests its
search backends): one mixin per kind of backend, one test class per backend.

A new backend gets a class here with a `backend` fixture; the mixin's tests then say
whether it keeps what search, ingestion, the ledger and chat rely on.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator

import pytest

from kb.providers.base import (
    ChatBackend,
    ChatDelta,
    ChatMessage,
    ChatUsage,
    EmbeddingBackend,
    Prompt,
    PromptPassage,
    RerankBackend,
)
from kb.providers.extractive import ExtractiveChat
from kb.providers.http_rerank import HTTPReranker
from kb.providers.llm_rerank import LLMReranker
from kb.providers.local import SentenceTransformerEmbeddings
from kb.providers.offline_rerank import SentenceMaxSimReranker
from kb.providers.openai import OpenAIChat, OpenAIEmbeddings
from kb.providers.retrying import failed_attempts_recorded
from tests.fakes.openai_server import FakeOpenAIServer, Fault

TEXTS = ["Backups run every night at 02:00 UTC.", "Restores are tested monthly.",
         "Cats sleep a lot."]
QUERY = "When do backups run?"


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as server:
        yield server


class EmbeddingBackendContract:
    """What ingestion and search rely on from an embedding backend."""

    def test_one_unit_vector_per_text_in_input_order(self, backend: EmbeddingBackend):
        result = backend.embed_batch(TEXTS)

        assert len(result.vectors) == len(TEXTS)
        assert all(len(vector) == backend.dimensions for vector in result.vectors)
        assert all(math.isclose(math.hypot(*vector), 1.0, abs_tol=1e-3)
                   for vector in result.vectors)
        assert result.input_tokens >= 0
        # Input order: each text's own vector, not a neighbour's.
        alone = backend.embed_batch([TEXTS[2]]).vectors[0]
        assert max(range(len(TEXTS)), key=lambda i: _dot(result.vectors[i], alone)) == 2

    def test_a_query_embeds_to_one_vector_of_the_same_size(self, backend: EmbeddingBackend):
        result = backend.embed_query(QUERY)

        assert len(result.vectors) == 1 and len(result.vectors[0]) == backend.dimensions

    def test_tokens_are_counted_without_a_call(self, backend: EmbeddingBackend):
        assert backend.count_tokens("") == 0
        assert backend.count_tokens(TEXTS[0]) > 0

    def test_it_names_its_provider_and_says_whether_it_is_remote(self, backend: EmbeddingBackend):
        assert backend.provider_name and backend.provider_name != "unknown"
        assert isinstance(backend.remote, bool) and backend.batch_size >= 1


class RerankBackendContract:
    """What search's rerank stage relies on from a reranker."""

    def test_one_score_per_document_in_input_order(self, backend: RerankBackend):
        result = backend.rerank(QUERY, TEXTS)

        assert len(result.scores) == len(TEXTS)
        assert all(isinstance(score, float | int) for score in result.scores)
        assert result.scores[0] >= result.scores[2]  # the passage that answers, over the cat

    def test_no_documents_no_scores(self, backend: RerankBackend):
        assert backend.rerank(QUERY, []).scores == []

    def test_it_names_its_provider_and_says_whether_it_is_remote(self, backend: RerankBackend):
        assert backend.provider_name and backend.provider_name != "unknown"
        assert isinstance(backend.remote, bool)


class ChatBackendContract:
    """What chat's cascade relies on from a chat backend."""

    def test_streams_deltas_then_exactly_one_usage_last(self, backend: ChatBackend):
        items = asyncio.run(_collect(backend.stream(_prompt(), max_tokens=200)))

        deltas = [item for item in items if isinstance(item, ChatDelta)]
        usages = [item for item in items if isinstance(item, ChatUsage)]
        assert deltas and "".join(d.text for d in deltas).strip()
        assert len(usages) == 1 and items[-1] is usages[0]

    def test_tokens_are_counted_without_a_call(self, backend: ChatBackend):
        assert backend.count_tokens("") == 0
        assert backend.count_tokens(TEXTS[0]) > 0

    def test_it_says_whether_it_generates_and_whether_it_is_remote(self, backend: ChatBackend):
        assert backend.provider_name and backend.provider_name != "unknown"
        assert isinstance(backend.generative, bool) and isinstance(backend.remote, bool)


class RemoteBackendContract:
    """What the usage ledger relies on from a backend that calls a server: its retries go
    through the shared retry loop, which reports each retried attempt (a request sent and
    billed) to the ledger's sink."""

    def test_a_retried_request_reaches_the_ledgers_sink(self, backend, fake_openai):
        fake_openai.enqueue(Fault(status=503, retry_after=0.01))

        with failed_attempts_recorded() as retried:
            self.remote_call(backend)

        assert [attempt.error for attempt in retried] == ["retried: HTTP 503"]

    def remote_call(self, backend) -> None:
        raise NotImplementedError


class TestSentenceTransformerEmbeddings(EmbeddingBackendContract):
    @pytest.fixture
    def backend(self):
        pytest.importorskip("sentence_transformers", reason="the torch backend needs the "
                            "torch extra: pip install -e '.[dev,torch]'")
        return SentenceTransformerEmbeddings(model="bundled:all-MiniLM-L6-v2")


class TestOpenAIEmbeddings(EmbeddingBackendContract, RemoteBackendContract):
    @pytest.fixture
    def backend(self, fake_openai):
        backend = OpenAIEmbeddings(model="fake-embedding", base_url=fake_openai.base_url,
                                   timeout=5.0)
        yield backend
        backend.close()

    def remote_call(self, backend) -> None:
        backend.embed_batch(TEXTS)


class TestHTTPReranker(RerankBackendContract, RemoteBackendContract):
    @pytest.fixture
    def backend(self, fake_openai):
        backend = HTTPReranker(model="rerank-v3.5", url=fake_openai.rerank_url, timeout=5.0)
        yield backend
        backend.close()

    def remote_call(self, backend) -> None:
        backend.rerank(QUERY, TEXTS)


class TestSentenceMaxSimReranker(RerankBackendContract):
    @pytest.fixture
    def backend(self):
        return SentenceMaxSimReranker()


class TestLLMReranker(RerankBackendContract):
    @pytest.fixture
    def backend(self, settings):
        # Grades the passage that shares words with the question highest.
        with FakeOpenAIServer(chat_reply="[9, 5, 0]") as server:
            settings.KB_PROVIDERS = {
                **settings.KB_PROVIDERS,
                "chat": [{"BACKEND": "kb.providers.openai.OpenAIChat", "MODEL": "fake-chat",
                          "base_url": server.base_url, "api_key": "test", "max_attempts": 1}],
            }
            yield LLMReranker(batch_size=10)


class TestOpenAIChat(ChatBackendContract, RemoteBackendContract):
    @pytest.fixture
    def backend(self, fake_openai):
        return OpenAIChat(model="fake-chat", base_url=fake_openai.base_url, api_key="test")

    def remote_call(self, backend) -> None:
        asyncio.run(_collect(backend.stream(_prompt(), max_tokens=200)))


class TestExtractiveChat(ChatBackendContract):
    @pytest.fixture
    def backend(self):
        return ExtractiveChat(model="extractive")


def _prompt() -> Prompt:
    passages = [PromptPassage(n=n, source=f"handbook.md › Section {n}", text=text)
                for n, text in enumerate(TEXTS, start=1)]
    return Prompt(
        messages=[ChatMessage(role="system", content="Answer from the passages."),
                  ChatMessage(role="user", content=QUERY)],
        question=QUERY, passages=passages,
    )


async def _collect(stream) -> list:
    return [item async for item in stream]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))
