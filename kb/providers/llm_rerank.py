"""A reranker that asks the configured chat model to grade passages, a batch per prompt.

Listwise grading in one prompt per batch (rather than one call per passage) keeps a
50-passage rerank to a handful of calls. The model's reply is parsed leniently (JSON,
a bare list, or "[3] 7" lines); a reply that cannot be read keeps the input (fused)
order rather than guessing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import re
from collections.abc import Callable, Coroutine, Sequence
from contextlib import aclosing
from functools import partial
from typing import Any

from kb.providers import registry
from kb.providers.base import (
    ChatBackend,
    ChatDelta,
    ChatMessage,
    ChatUsage,
    Prompt,
    ProviderError,
    RerankBackend,
    RerankResult,
)

logger = logging.getLogger(__name__)


MAX_GRADE = 10.0

SYSTEM_PROMPT = (
    "You grade search results. For each numbered passage, judge how well it answers or "
    "supports the query, from 0 (irrelevant) to 10 (directly and fully relevant). "
    "Judge each passage on its own. Reply with JSON only."
)


def rerank_messages(query: str, passages: Sequence[str]) -> list[ChatMessage]:
    """The prompt for one batch: the query, numbered passages, and the reply format."""
    numbered = "\n\n".join(f"[{i}] {' '.join(p.split())}" for i, p in enumerate(passages, start=1))
    user = (
        f"Query: {' '.join(query.split())}\n\nPassages:\n{numbered}\n\n"
        f'Reply as {{"scores": [s1, ..., s{len(passages)}]}}: exactly {len(passages)} '
        "numbers from 0 to 10, in passage order."
    )
    return [
        ChatMessage(role="system", content=SYSTEM_PROMPT),
        ChatMessage(role="user", content=user),
    ]


def scores_parse(text: str, count: int) -> list[float] | None:
    """Scores for `count` passages from a model reply, or None when it cannot be read."""
    text = re.sub(r"```(?:json)?", " ", text or "")
    for candidate in _json_candidates(text):
        scores = _scores_from_json(candidate, count)
        if scores is not None:
            return scores
    # "[1] 7", "1: 7", "Passage 1 - 7/10" lines
    found: dict[int, float] = {}
    for match in re.finditer(
        r"(?im)^[^\w\[]*(?:passage\s*)?(?:\[(\d{1,3})\]\s*[:=\-–)]?|(\d{1,3})\s*[:=\-–)])"
        r"\s*(-?\d+(?:\.\d+)?)",
        text,
    ):
        found.setdefault(int(match.group(1) or match.group(2)), float(match.group(3)))
    if set(found) == set(range(1, count + 1)):
        return [_clamp(found[i]) for i in range(1, count + 1)]
    return None


def _json_candidates(text: str) -> list[Any]:
    decoder = json.JSONDecoder()
    values = []
    for start, char in enumerate(text):
        if char in "[{":
            try:
                value, _ = decoder.raw_decode(text, start)
            except ValueError:
                continue
            values.append(value)
    return values


def _scores_from_json(value: Any, count: int) -> list[float] | None:
    if isinstance(value, dict):
        for key in ("scores", "grades", "ratings", "relevance"):
            if key in value:
                return _scores_from_json(value[key], count)
        return None
    if not isinstance(value, list) or len(value) != count:
        return None
    if all(_is_number(v) for v in value):
        return [_clamp(float(v)) for v in value]
    if all(isinstance(v, dict) for v in value):
        by_index: dict[int, float] = {}
        for item in value:
            index = item.get("index", item.get("id", item.get("passage")))
            score = item.get("score", item.get("relevance"))
            if isinstance(index, str) and index.strip("[] ").isdigit():
                index = int(index.strip("[] "))
            if not isinstance(index, int) or not _is_number(score):
                return None
            by_index[index] = float(score)
        for base in (1, 0):
            if set(by_index) == set(range(base, count + base)):
                return [_clamp(by_index[i]) for i in range(base, count + base)]
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


def _clamp(value: float) -> float:
    return min(MAX_GRADE, max(0.0, value))


def run_coroutine[T](factory: Callable[[], Coroutine[object, object, T]]) -> T:
    """Run `factory()`'s coroutine to completion from sync code, even under a running loop.

    asyncio.run refuses to nest, so from inside an event loop (an async view calling
    sync code directly) the coroutine runs in a fresh loop on a helper thread.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


class LLMReranker(RerankBackend):
    """Grades passages 0–10 with the first generative backend of KB_PROVIDERS['chat'].

    Options: batch_size (passages per prompt, default 10), max_passage_chars (default
    1500), max_tokens (reply budget, default 200), timeout (seconds per batch, default 60).
    """

    provider_name = "llm"
    remote = True

    def __init__(self, *, model: str = "", **options: Any) -> None:
        super().__init__(model=model, **options)
        self.batch_size = max(1, int(options.get("batch_size") or 10))
        self.max_passage_chars = int(options.get("max_passage_chars") or 1500)
        self.max_tokens = int(options.get("max_tokens") or 200)
        self.timeout = float(options.get("timeout") or 60.0)

    def chat_backend(self) -> ChatBackend:
        """The first generative chat backend configured; the extractive answerer cannot grade."""
        for backend in registry.chat_backends():
            if backend.generative:
                if not self.model:
                    self.model = backend.model
                return backend
        raise ProviderError("LLMReranker needs a generative chat provider in KB_PROVIDERS['chat'].")

    def rerank(self, query: str, documents: Sequence[str]) -> RerankResult:
        if not documents:
            return RerankResult(scores=[])
        backend = self.chat_backend()
        passages = [document[: self.max_passage_chars] for document in documents]
        scores: list[float] = []
        input_tokens = 0
        for start in range(0, len(passages), self.batch_size):
            batch = passages[start : start + self.batch_size]
            reply, usage = run_coroutine(partial(self._ask, backend, query, batch))
            input_tokens += (usage.input_tokens or 0) if usage else 0
            parsed = scores_parse(reply, len(batch))
            if parsed is None:
                logger.warning(
                    "LLM reranker reply could not be read; keeping the fused order: %.200r", reply
                )
                return RerankResult(scores=_input_order(len(documents)), input_tokens=input_tokens)
            scores.extend(parsed)
        return RerankResult(scores=scores, input_tokens=input_tokens)

    async def _ask(
        self, backend: ChatBackend, query: str, batch: list[str]
    ) -> tuple[str, ChatUsage | None]:
        parts: list[str] = []
        usage: ChatUsage | None = None

        async def collect() -> None:
            nonlocal usage
            stream = backend.stream(Prompt(messages=rerank_messages(query, batch)),
                                    max_tokens=self.max_tokens,
                                    temperature=0.0)
            async with aclosing(stream):
                async for item in stream:
                    if isinstance(item, ChatDelta):
                        parts.append(item.text)
                    elif isinstance(item, ChatUsage):
                        usage = item

        try:
            await asyncio.wait_for(collect(), self.timeout)
        except ProviderError:
            raise
        except TimeoutError as exc:
            raise ProviderError(
                f"LLM reranker: no reply within {self.timeout:g}s", retryable=True
            ) from exc
        except Exception as exc:
            # Search turns a ProviderError into a notice and keeps the fused order.
            raise ProviderError(f"LLM reranker: {exc.__class__.__name__}: {exc}") from exc
        return "".join(parts), usage


def _input_order(count: int) -> list[float]:
    # Strictly decreasing, so sorting by score keeps the order the passages came in.
    return [float(count - i) for i in range(count)]
