"""Choose KB_SEMANTIC_CACHE_THRESHOLD from labelled question pairs.

    .venv/bin/python benchmarks/semantic_cache_threshold.py [--pairs fixtures/paraphrases.jsonl]

Embeds both questions of every pair with the configured default embedding model (the
bundled all-MiniLM-L6-v2 unless KB_EMBEDDING_MODEL says otherwise), exactly as the chat
pipeline embeds a question (EmbeddingBackend.embed_query), and reports precision and
recall of "same question" at each cosine-similarity threshold.

The chosen threshold is the one with the best recall among those with precision of at
least --min-precision (0.98): a wrong cache hit answers a different question with
confidence, which is worse than a miss, which only costs one model call. Among equal
recalls the higher threshold wins, as the safer one. No database is needed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Row:
    threshold: float
    true_positives: int
    false_positives: int
    false_negatives: int

    @property
    def precision(self) -> float:
        predicted = self.true_positives + self.false_positives
        return self.true_positives / predicted if predicted else 1.0

    @property
    def recall(self) -> float:
        actual = self.true_positives + self.false_negatives
        return self.true_positives / actual if actual else 0.0


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def sweep(scored: list[tuple[float, bool]], thresholds: list[float]) -> list[Row]:
    """Confusion counts of `similarity >= threshold` against the labels, per threshold."""
    rows = []
    for threshold in thresholds:
        tp = sum(1 for s, same in scored if same and s >= threshold)
        fp = sum(1 for s, same in scored if not same and s >= threshold)
        fn = sum(1 for s, same in scored if same and s < threshold)
        rows.append(Row(threshold, tp, fp, fn))
    return rows


def choose(rows: list[Row], *, min_precision: float) -> Row | None:
    """Best recall with precision >= min_precision; the higher threshold on ties."""
    eligible = [row for row in rows if row.precision >= min_precision and row.true_positives]
    if not eligible:
        return None
    return max(eligible, key=lambda row: (row.recall, row.threshold))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=Path, default=ROOT / "fixtures" / "paraphrases.jsonl")
    parser.add_argument("--min-precision", type=float, default=0.98)
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kb.settings")
    # Settings only, no django.setup(): building a backend needs no apps and no database.
    from django.conf import settings

    from kb.providers import registry

    key = settings.KB_DEFAULT_EMBEDDING_MODEL
    backend = registry.embedding_backend(key)
    pairs = [json.loads(line) for line in args.pairs.read_text().splitlines() if line.strip()]
    texts = sorted({text for pair in pairs for text in (pair["a"], pair["b"])})
    vectors = {text: backend.embed_query(text).vectors[0] for text in texts}
    scored = [(cosine(vectors[p["a"]], vectors[p["b"]]), bool(p["paraphrase"])) for p in pairs]

    positives = sorted(s for s, same in scored if same)
    negatives = sorted(s for s, same in scored if not same)
    print(f"model: {key} ({backend.model}); pairs: {len(pairs)} "
          f"({len(positives)} paraphrases, {len(negatives)} different questions)")
    print(f"paraphrase similarity: min {positives[0]:.3f}, median "
          f"{positives[len(positives) // 2]:.3f}; different-question similarity: max "
          f"{negatives[-1]:.3f}, median {negatives[len(negatives) // 2]:.3f}")
    labelled = sorted(zip(scored, pairs, strict=True), key=lambda item: item[0][0])
    print("hardest different questions (a wrong hit above the threshold):")
    for (similarity, _), pair in [item for item in labelled if not item[0][1]][-3:]:
        print(f"  {similarity:.3f}  {pair['a']!r} / {pair['b']!r}")
    print("weakest paraphrases (a miss below the threshold):")
    for (similarity, _), pair in [item for item in labelled if item[0][1]][:3]:
        print(f"  {similarity:.3f}  {pair['a']!r} / {pair['b']!r}")
    print()
    print("threshold  precision  recall  TP  FP  FN")
    rows = sweep(scored, [round(0.70 + i * 0.01, 2) for i in range(30)])
    for row in rows:
        print(f"{row.threshold:9.2f}  {row.precision:9.3f}  {row.recall:6.3f}  "
              f"{row.true_positives:2d}  {row.false_positives:2d}  {row.false_negatives:2d}")
    chosen = choose(rows, min_precision=args.min_precision)
    print()
    if chosen is None:
        print(f"no threshold reaches precision {args.min_precision}")
        return 1
    print(f"chosen threshold: {chosen.threshold:.2f} (precision {chosen.precision:.3f}, "
          f"recall {chosen.recall:.3f}; min precision {args.min_precision})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
