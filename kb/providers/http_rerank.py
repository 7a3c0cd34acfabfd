"""A reranker behind an HTTP /rerank endpoint: Cohere, Jina, or a self-hosted TEI server."""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from typing import Any

import httpx

from kb.providers.base import ProviderError, RerankBackend, RerankResult
from kb.providers.retrying import RetryPolicy, call_with_retries

# The score of a document the server did not return (a server-side top_n cap). Not
# -inf: that is not valid JSON (json.dumps writes "-Infinity", which JSON.parse and
# Postgres reject) and it turns score arithmetic such as fusion or normalisation into
# nan. -1e9 still sorts below any real score: Cohere and Jina return [0, 1], and TEI's
# raw logits stay within about +-20.
MISSING_SCORE = -1e9


class HTTPReranker(RerankBackend):
    """POSTs {"query", "documents"} to a rerank URL and returns scores in input order.

    Options: url (the full endpoint URL, required), api_key (sent as a Bearer token),
    api ("cohere", the default, for Cohere/Jina/Voyage request bodies; "tei" sends TEI's
    {"query", "texts"}), top_n, batch_size (TEI rejects more than 32 texts by default),
    timeout, max_attempts.
    """

    provider_name = "http"
    remote = True

    def __init__(self, *, model: str = "", **options: Any) -> None:
        super().__init__(model=model, **options)
        url = options.get("url")
        if not url:
            raise ProviderError("HTTPReranker needs a `url` option (the full /rerank URL)")
        self.url: str = url
        self.api_key: str | None = options.get("api_key") or None
        self.api: str = options.get("api") or "cohere"
        if self.api not in ("cohere", "tei"):
            raise ProviderError(f"HTTPReranker: unknown api {self.api!r}; use 'cohere' or 'tei'")
        self.top_n: int | None = int(options["top_n"]) if options.get("top_n") else None
        self.batch_size: int | None = (
            int(options["batch_size"]) if options.get("batch_size") else None
        )
        self.policy = RetryPolicy(
            max_attempts=int(options.get("max_attempts") or 5),
            timeout=float(options.get("timeout") or 30.0),
        )
        self._client: httpx.Client | None = None
        self._lock = threading.Lock()

    def rerank(self, query: str, documents: Sequence[str]) -> RerankResult:
        """Return one relevance score per document, in input order."""
        scores: list[float] = []
        input_tokens = 0
        size = self.batch_size or max(1, len(documents))
        for start in range(0, len(documents), size):
            batch = list(documents[start : start + size])
            body = call_with_retries(
                functools.partial(self._post, query, batch),
                policy=self.policy,
                describe=self._describe,
            )
            scores.extend(self._scores_from(body, count=len(batch)))
            input_tokens += _billed_units(body)
        return RerankResult(scores=scores, input_tokens=input_tokens)

    def close(self) -> None:
        """Close the HTTP connection pool; the next call opens a new one."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    @property
    def _describe(self) -> str:
        model = f" {self.model!r}" if self.model else ""
        return f"rerank{model} at {self.url}"

    def _get_client(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                headers = {"Accept": "application/json"}
                if self.api_key:
                    headers["Authorization"] = f"Bearer {self.api_key}"
                self._client = httpx.Client(
                    headers=headers, timeout=self.policy.timeout, follow_redirects=True
                )
            return self._client

    def _post(self, query: str, documents: list[str]) -> Any:
        payload: dict[str, Any]
        if self.api == "tei":
            payload = {"query": query, "texts": documents}
        else:
            # top_n defaults to every document: a missing score is worth less than the
            # few bytes saved, since the caller already chose which candidates to send.
            payload = {"query": query, "documents": documents, "top_n": len(documents)}
            if self.top_n is not None:
                payload["top_n"] = min(self.top_n, len(documents))
            if self.model:
                payload["model"] = self.model
        response = self._get_client().post(self.url, json=payload)
        response.raise_for_status()
        return response.json()

    def _scores_from(self, body: Any, *, count: int) -> list[float]:
        # Cohere and Jina wrap results in {"results": [...]}; TEI returns the bare list.
        if isinstance(body, dict) and isinstance(body.get("results"), list):
            items = body["results"]
        elif isinstance(body, list):
            items = body
        else:
            raise ProviderError(f"{self._describe}: response has no results list")
        scores = [MISSING_SCORE] * count
        for item in items:
            index = item.get("index") if isinstance(item, dict) else None
            score = item.get("relevance_score", item.get("score")) if index is not None else None
            if (not (isinstance(index, int) and 0 <= index < count) or isinstance(score, bool)
                    or not isinstance(score, int | float)):
                raise ProviderError(f"{self._describe}: malformed result {item!r:.100}")
            scores[index] = float(score)
        return scores


def _billed_units(body: Any) -> int:
    """Cohere's billed search units, or Jina's token usage, or 0 when neither is given."""
    if not isinstance(body, dict):
        return 0
    meta = body.get("meta")
    billed = meta.get("billed_units") if isinstance(meta, dict) else None
    units = billed.get("search_units") if isinstance(billed, dict) else None
    if not isinstance(units, int):
        usage = body.get("usage")
        units = usage.get("total_tokens") if isinstance(usage, dict) else None
    return units if isinstance(units, int) else 0
