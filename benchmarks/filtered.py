"""The filtered case: a caller who may read one collection holding a share of the chunks.

    KB_PGDATA=... KB_DATA_DIR=... .venv/bin/python benchmarks/filtered.py \\
        [--collection bench-100k] [--share 0.1] [--dataset ../shared/bench/scifact]

On benchmarks/retrieval.py's corpus: every (1/share)-th document of --collection moves to a
collection of its own (`document_move`'s path: the chunks and their BM25 statistics
follow; then ANALYZE), and for each of the dataset's test queries, in turns, the search service runs
hybrid (k=10, rerank off):
- over the whole corpus (both collections);
- over the small collection alone, with pgvector 0.8's iterative scan (the default);
- over the small collection alone with it off (`hnsw.iterative_scan = off`), as pgvector
  before 0.8 behaves: HNSW's ef_search neighbours, then the filter, then the exact re-run
  when fewer than k are left.
The query's vector is computed once beforehand (the in-process cache), so the figures are
retrieval, fusion and reading the hits, without the embedding. Printed: p50/p95 ms and how
often the exact re-run ran. The documents move back at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kb.settings")

from benchmarks.retrieval import BENCH_DATA, percentile  # noqa: E402

SMALL = "bench-filtered"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--collection", default="bench-100k")
    parser.add_argument("--share", type=float, default=0.1)
    parser.add_argument("--dataset", type=Path, default=BENCH_DATA / "scifact")
    parser.add_argument("--bm25-engine", default="auto", choices=["auto", "sql", "pg_textsearch"],
                        help="KB_BM25_ENGINE for the searches (pg_textsearch needs its index).")
    args = parser.parse_args()

    import django

    django.setup()
    from django.db import connection as benchmark_connection

    # The benchmark's own statements (loading, counting postings over all queries, moving
    # a tenth of the corpus) run for minutes at 1M chunks: not under the request timeout.
    with benchmark_connection.cursor() as cursor:
        cursor.execute("SET statement_timeout = 0")
    from django.conf import settings
    from django.db import connection

    from kb.models import Chunk, Collection
    from kb.selectors import SYSTEM
    from search.evaluation import beir_dataset_load
    from search.services import SearchParams, search

    settings.KB_BM25_ENGINE = args.bm25_engine
    big = Collection.objects.get(slug=args.collection)
    small, _ = Collection.objects.get_or_create(slug=SMALL, defaults={"name": "Bench filtered"})
    every = round(1 / args.share)
    started = time.monotonic()
    with connection.cursor() as cursor:
        cursor.execute("UPDATE kb_document SET collection_id = %s "
                       "WHERE collection_id = %s AND id %% %s = 0", [small.pk, big.pk, every])
        # As autovacuum would soon: without it the planner takes the new collection for
        # one row and scans it exactly (44 ms at 10k chunks) instead of using HNSW.
        cursor.execute("ANALYZE kb_chunk, kb_chunkembedding")
    moved_s = time.monotonic() - started
    try:
        total = Chunk.objects.filter(collection__in=[big, small], searchable=True).count()
        in_small = Chunk.objects.filter(collection=small, searchable=True).count()
        print(f"{in_small} of {total} chunks ({in_small / total:.1%}) in {SMALL}, "
              f"moved in {moved_s:.1f} s")
        queries = list(beir_dataset_load(path=args.dataset).queries.values())
        cases = {"whole corpus": (big.slug, small.slug), "small, iterative": (small.slug,),
                 "small, iterative off": (small.slug,)}
        timings: dict[str, list[float]] = {name: [] for name in cases}
        exact_runs = dict.fromkeys(cases, 0)
        for query in queries:  # the vectors, once
            search(params=SearchParams(query=query, k=10), user=SYSTEM, record_usage=False)
        for i, query in enumerate(queries):
            names = list(cases) if i % 2 == 0 else list(reversed(cases))
            for name in names:
                with connection.cursor() as cursor:
                    cursor.execute("SET hnsw.iterative_scan = %s",
                                   ["off" if name.endswith("off") else "relaxed_order"])
                t = time.perf_counter()
                result = search(params=SearchParams(query=query, k=10, collections=cases[name]),
                                user=SYSTEM, record_usage=False)
                timings[name].append((time.perf_counter() - t) * 1000)
                exact_runs[name] += "retrieve_exact" in result.timings_ms
        with connection.cursor() as cursor:
            cursor.execute("SET hnsw.iterative_scan = relaxed_order")
        print(f"{'hybrid search, k=10':<24}{'p50 ms':>9}{'p95 ms':>9}{'exact re-runs':>15}")
        for name in cases:
            print(f"{name:<24}{percentile(timings[name], 50):>9.1f}"
                  f"{percentile(timings[name], 95):>9.1f}{exact_runs[name]:>11}/{len(queries)}")
    finally:
        with connection.cursor() as cursor:
            cursor.execute("UPDATE kb_document SET collection_id = %s WHERE collection_id = %s",
                           [big.pk, small.pk])
        small.delete()


if __name__ == "__main__":
    main()
