"""The contracts every model provider implements: one ABC per capability.

Backends are plain Python objects with no ORM access. Accounting (UsageRecord rows,
caches, budgets) happens in the services that call them, so every backend is
accounted the same way and a new backend cannot forget to record its usage.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass


class ProviderError(Exception):
    """A model provider failed after its own retries; safe to show to an operator."""

    def __init__(self, message: str, *, retryable: bool = False, status_code: int | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.status_code = status_code


@dataclass(frozen=True)
class EmbeddingResult:
    vectors: list[list[float]]
    input_tokens: int


@dataclass(frozen=True)
class RerankResult:
    # One score per input document, in input order; higher is more relevant.
    scores: list[float]
    input_tokens: int = 0


@dataclass(frozen=True)
class ChatDelta:
    text: str


@dataclass(frozen=True)
class ChatUsage:
    """Sent once, last, by a chat stream. Token counts are None when the provider gave none."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    model: str | None = None
    finish_reason: str | None = None


@dataclass(frozen=True)
class ChatMessage:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True)
class PromptPassage:
    """One numbered passage of a prompt, as its messages show it.

    A document's own bracketed numbers ("[2]") are shown in fullwidth brackets ("［2］"),
    so that only the prompt's numbers read as citations.
    """

    n: int
    source: str  # "Title › Section, page 3"
    text: str


@dataclass(frozen=True)
class Prompt:
    """What a chat backend is asked (after simonw/llm's Prompt).

    A generative model reads `messages`. An answerer that works from the sources
    themselves reads the `question` and the numbered `passages` the messages were built
    from (both as the messages show them), instead of parsing the messages back.
    A prompt of messages alone (a rewrite, a rerank) has no passages.
    """

    messages: Sequence[ChatMessage]
    question: str = ""
    passages: Sequence[PromptPassage] = ()


class EmbeddingBackend(ABC):
    """Turns texts into vectors. Implementations must be thread-safe for embed_batch."""

    provider_name: str = "unknown"
    batch_size: int = 64
    # Whether embed_batch goes over the network (and so may rate-limit, time out, cost money).
    remote: bool = False

    def __init__(self, *, model: str, **options):
        self.model = model
        self.options = options

    @classmethod
    def unavailable_reason(cls, entry: dict) -> str | None:
        """Why a KB_PROVIDERS entry for this backend cannot work, known without calling it."""
        return None

    @property
    @abstractmethod
    def dimensions(self) -> int:
        """The length of every vector this backend returns."""

    @abstractmethod
    def embed_batch(self, texts: Sequence[str]) -> EmbeddingResult:
        """Embed up to batch_size texts; vectors are L2-normalised, in input order."""

    @abstractmethod
    def count_tokens(self, text: str) -> int:
        """Count tokens the way this model's tokenizer does (used to size chunks)."""

    def embed_query(self, text: str) -> EmbeddingResult:
        """Embed one search query; backends with query instructions override this."""
        return self.embed_batch([text])


class RerankBackend(ABC):
    """Scores (query, passage) pairs; used over the top-N fused candidates."""

    provider_name: str = "unknown"
    remote: bool = False

    def __init__(self, *, model: str = "", **options):
        self.model = model
        self.options = options

    @abstractmethod
    def rerank(self, query: str, documents: Sequence[str]) -> RerankResult:
        """Return one relevance score per document, in input order."""


class ChatBackend(ABC):
    """Streams a chat completion as ChatDelta items followed by exactly one ChatUsage."""

    provider_name: str = "unknown"
    remote: bool = True
    # An extractive backend quotes sources rather than generating; the UI labels it so.
    generative: bool = True

    def __init__(self, *, model: str = "", **options):
        self.model = model
        self.options = options

    @abstractmethod
    def stream(
        self,
        prompt: Prompt,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> AsyncGenerator[ChatDelta | ChatUsage, None]:
        """Yield the answer as it arrives. Raise ProviderError before the first delta on failure.

        An async generator: callers close it (contextlib.aclosing) when they stop early."""

    def count_tokens(self, text: str) -> int:
        """A sensible token count for budgets and prompts: about four characters a token."""
        return max(1, (len(text) + 3) // 4) if text else 0
