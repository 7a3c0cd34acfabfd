"""A deliberately useless embedding model: random unit vectors, whatever the text. The
quality gate must refuse to let search switch to it (tests/search/test_quality_gate.py)."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from kb.providers.base import EmbeddingBackend, EmbeddingResult


class RandomEmbeddings(EmbeddingBackend):
    provider_name = "random"

    def __init__(self, *, model: str, dimensions: int = 32, **options: object) -> None:
        super().__init__(model=model, **options)
        self._dimensions = int(dimensions)
        self._random = random.Random(7)

    @property
    def dimensions(self) -> int:
        return self._dimensions

    def embed_batch(self, texts: Sequence[str]) -> EmbeddingResult:
        vectors = []
        for _ in texts:
            vector = [self._random.gauss(0.0, 1.0) for _ in range(self._dimensions)]
            norm = math.sqrt(sum(v * v for v in vector))
            vectors.append([v / norm for v in vector])
        return EmbeddingResult(vectors=vectors, input_tokens=sum(len(t.split()) for t in texts))

    def count_tokens(self, text: str) -> int:
        return len(text.split())
