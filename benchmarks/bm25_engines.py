"""The BM25 engines side by side on a BEIR dataset's collection: agreement and latency.

    KB_PGDATA=... KB_DATA_DIR=... .venv/bin/python benchmarks/bm25_engines.py \\
        --dataset ../shared/bench/scifact [--limit 100] [--json FILE]

The collection is the one `kb_eval --dataset` prepared (run it first; nDCG@10 per engine
comes from `KB_BM25_ENGINE=... kb_eval`). pg_textsearch's index must exist
(`manage.py kb_textsearch_index create`). For each test query, in turn (interleaved, so
the machine's drift falls on every engine alike), each engine ranks the collection's
chunks for BM25 alone, through search.retrieval.retrieve_candidates:
- sql: the portable reference (exact Okapi BM25, per-collection statistics);
- kb_bm25: the C function over the same postings (same scores);
- pg_textsearch: its own index and ranking, as it is (no exact engine behind it);
- pg_textsearch+fallback: what KB_BM25_ENGINE=pg_textsearch serves: the exact engine
  answers instead when pg_textsearch returns fewer than --limit rows.
Printed: top-10 agreement with sql (share of sql's top 10 in the engine's top 10), the
share of queries where pg_textsearch returned fewer than --limit rows (and so the fallback
ran), and p50/p95 latency of each, in ms.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kb.settings")

from benchmarks.retrieval import percentile  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=100,
                        help="Candidates asked of BM25, as search asks (KB_SEARCH_CANDIDATES).")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import django

    django.setup()
    from django.db import connection
    from django.test.utils import override_settings

    from kb.models import Chunk, Collection
    from search import bm25
    from search.evaluation import beir_dataset_load, eval_collection_slug
    from search.filters import SearchFilters
    from search.retrieval import retrieve_candidates
    from search.textsearch import textsearch_index_ready

    dataset = beir_dataset_load(path=args.dataset)
    collection = Collection.objects.get(slug=eval_collection_slug(dataset=dataset))
    if not textsearch_index_ready(connection):
        sys.exit("No pg_textsearch index: run `manage.py kb_textsearch_index create` first.")
    filters = SearchFilters(collection_ids=(collection.pk,))
    engines = {"sql": bm25.SQL_ENGINE, "kb_bm25": bm25.KB_BM25_FUNCTION,
               "pg_textsearch": bm25.PG_TEXTSEARCH, "pg_textsearch+fallback": None}
    timings: dict[str, list[float]] = {name: [] for name in engines}
    agreement: dict[str, list[float]] = {name: [] for name in engines}
    short = 0
    queries = list(dataset.queries.values())
    with override_settings(KB_BM25_ENGINE="pg_textsearch"):
        for text in queries:
            tops = {}
            for name, engine in engines.items():
                started = time.perf_counter()
                retrieved = retrieve_candidates(query=text, query_vector=None, filters=filters,
                                                use_bm25=True, limit=args.limit, bm25=engine)
                timings[name].append((time.perf_counter() - started) * 1000)
                ranked = sorted(retrieved.candidates, key=lambda c: c.bm25_rank)
                tops[name] = [c.chunk_id for c in ranked[:10]]
                if name == "pg_textsearch" and retrieved.bm25_count < args.limit:
                    short += 1
            for name in engines:
                if tops["sql"]:
                    agreement[name].append(len(set(tops["sql"]) & set(tops[name]))
                                           / len(tops["sql"]))
    chunks = Chunk.objects.filter(collection=collection, searchable=True).count()
    result = {
        "dataset": dataset.name, "queries": len(queries), "chunks": chunks,
        "limit": args.limit,
        "pg_textsearch_short_share": round(short / len(queries), 3),
        "engines": {
            name: {"top10_agreement_with_sql": round(statistics.mean(agreement[name]), 4),
                   "p50_ms": round(percentile(timings[name], 50), 2),
                   "p95_ms": round(percentile(timings[name], 95), 2)}
            for name in engines
        },
    }
    print(f"{dataset.name}: {len(queries)} queries, {chunks} chunks, limit {args.limit}; "
          f"pg_textsearch gave fewer than {args.limit} rows for "
          f"{result['pg_textsearch_short_share']:.1%} of queries (the fallback ran)")
    print(f"{'engine':<24}{'top-10 agreement':>18}{'p50 ms':>9}{'p95 ms':>9}")
    for name, figures in result["engines"].items():
        print(f"{name:<24}{figures['top10_agreement_with_sql']:>18.4f}"
              f"{figures['p50_ms']:>9.2f}{figures['p95_ms']:>9.2f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
