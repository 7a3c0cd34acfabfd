"""The default embedding model against the torch reference: how close its vectors are, and
how fast it embeds one query, in one run.

    KB_DATA_DIR=/tmp/kb-bench-fidelity .venv/bin/python benchmarks/embedding_fidelity.py \\
        [--limit 0] [--queries 300]

Needs the torch extra (the reference is all-MiniLM-L6-v2 on sentence-transformers). Over
../shared/bench/scifact beside the repository (--dataset overrides):

1. fidelity: every corpus entry (title and text, as kb_eval ingests them) embedded by the
   reference and by the default backend, as ingestion embeds chunks (embed_batch, batches
   of 64); the cosine of each pair, mean, 1st percentile and minimum. Also the default's
   queries (embed_query) against the reference's, for the first --queries queries.
2. query latency: each query embedded by today's query path of the torch model (its
   ONNX Runtime twin, KB_LOCAL_QUERY_RUNTIME=onnxruntime) and by the default backend's
   embed_query, alternating query by query, one intra-op thread each as in the web
   process; p50 and p95, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kb.settings")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATASET = Path(__file__).resolve().parents[2] / "shared" / "bench" / "scifact"
BATCH = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=DATASET)
    parser.add_argument("--limit", type=int, default=0, help="Corpus entries (0: all).")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    args = parser.parse_args()

    import django

    django.setup()
    import numpy as np

    from kb.providers.local import SentenceTransformerEmbeddings, torch_installed
    from kb.providers.onnx_embeddings import OnnxEmbeddings

    if not torch_installed():
        sys.exit("The reference needs the torch extra: pip install -e '.[torch]'")
    texts = []
    with (args.dataset / "corpus.jsonl").open() as handle:
        for line in handle:
            entry = json.loads(line)
            texts.append(f"{entry.get('title') or ''}\n{entry.get('text') or ''}".strip())
            if args.limit and len(texts) >= args.limit:
                break
    with (args.dataset / "queries.jsonl").open() as handle:
        queries = [json.loads(line)["text"] for line in handle if line.strip()][: args.queries]

    reference = SentenceTransformerEmbeddings(query_runtime="torch")
    default = OnnxEmbeddings()

    def embedded(backend, items):
        vectors = []
        for start in range(0, len(items), BATCH):
            vectors.extend(backend.embed_batch(items[start : start + BATCH]).vectors)
        return np.array(vectors)

    started = time.perf_counter()
    theirs = embedded(reference, texts)
    reference_seconds = time.perf_counter() - started
    started = time.perf_counter()
    ours = embedded(default, texts)
    default_seconds = time.perf_counter() - started
    cosines = (ours * theirs).sum(axis=1)
    query_cosines = np.array([
        float(np.dot(default.embed_query(q).vectors[0], reference.embed_batch([q]).vectors[0]))
        for q in queries
    ])

    # One intra-op thread, as in the web process (KB_WEB_TORCH_THREADS): both sessions
    # read the setting when they load.
    from django.conf import settings

    settings.KB_TORCH_THREADS = 1
    single = OnnxEmbeddings()
    twin_single = SentenceTransformerEmbeddings(query_runtime="onnxruntime")
    if twin_single.query_encoder is None:
        sys.exit("The torch model's ONNX twin did not load; see the log.")
    for warm in queries[:10]:
        single.embed_query(warm)
        twin_single.embed_query(warm)
    twin_ms, default_ms = [], []
    for query in queries:
        for backend, sink in ((twin_single, twin_ms), (single, default_ms)):
            started = time.perf_counter()
            backend.embed_query(query)
            sink.append((time.perf_counter() - started) * 1000)

    def p(values, q):
        return statistics.quantiles(values, n=100)[q - 1]

    figures = {
        "entries": len(texts), "queries": len(queries),
        "cosine_mean": round(float(cosines.mean()), 5),
        "cosine_p1": round(float(np.percentile(cosines, 1)), 5),
        "cosine_min": round(float(cosines.min()), 5),
        "query_cosine_mean": round(float(query_cosines.mean()), 5),
        "query_cosine_min": round(float(query_cosines.min()), 5),
        "reference_entries_per_s": round(len(texts) / reference_seconds, 2),
        "default_entries_per_s": round(len(texts) / default_seconds, 2),
        "twin_query_p50_ms": round(statistics.median(twin_ms), 2),
        "twin_query_p95_ms": round(p(twin_ms, 95), 2),
        "default_query_p50_ms": round(statistics.median(default_ms), 2),
        "default_query_p95_ms": round(p(default_ms, 95), 2),
    }
    figures["query_p50_ratio"] = round(
        figures["default_query_p50_ms"] / figures["twin_query_p50_ms"], 3)
    print(f"{len(texts)} corpus entries, {len(queries)} queries ({args.dataset.name})")
    print(f"chunks' vectors vs the torch reference: cosine mean {figures['cosine_mean']:.5f}, "
          f"p1 {figures['cosine_p1']:.5f}, min {figures['cosine_min']:.5f}")
    print(f"queries' vectors vs the torch reference: cosine mean "
          f"{figures['query_cosine_mean']:.5f}, min {figures['query_cosine_min']:.5f}")
    print(f"batch throughput: reference {figures['reference_entries_per_s']} entries/s, "
          f"default {figures['default_entries_per_s']} entries/s")
    print(f"one query, one thread: torch model's ONNX twin p50 {figures['twin_query_p50_ms']} ms "
          f"p95 {figures['twin_query_p95_ms']} ms; default p50 "
          f"{figures['default_query_p50_ms']} ms p95 {figures['default_query_p95_ms']} ms; "
          f"p50 ratio {figures['query_p50_ratio']}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
