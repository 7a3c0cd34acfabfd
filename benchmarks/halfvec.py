"""halfvec storage for the vector index, measured before anything is adopted.

    KB_PGDATA=... KB_DATA_DIR=... .venv/bin/python benchmarks/halfvec.py \\
        --dataset ../shared/bench/scifact [--ef-search 200] [--collection SLUG]

On the collection `kb_eval --dataset` prepared, with the active embedding model, for each
test query (embedded once):
- exact: the top 100 chunks by cosine distance over every vector (no index);
- vector: an HNSW index over `embedding::vector(d)` (4 bytes a dimension; search's until
  issue 20);
- halfvec: an HNSW index over `embedding::halfvec(d)` (2 bytes a dimension, pgvector ≥ 0.7;
  search's since);
both built here with search's parameters (m 16, ef_construction 64), in one transaction
that is rolled back at the end, so the model's own index comes back as it was (the table
is locked meanwhile: use a data directory of its own).
Printed for vector and halfvec: recall@10 against exact, nDCG@10 on the dataset's qrels
(a document at its best chunk, as kb_eval counts it), p50/p95 latency (interleaved), and
the index size. With --collection (e.g. bench-100k, benchmarks/retrieval.py's corpus) the
dataset gives only the queries, and nDCG is not computed. The issue's bar: adopt halfvec
only if recall@10 and nDCG@10 stay within 0.002 of the vector index's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kb.settings")

from benchmarks.retrieval import percentile  # noqa: E402

INDEXES = {"vector": "bench_vector_hnsw", "halfvec": "bench_halfvec_hnsw"}



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--ef-search", type=int, default=200)
    parser.add_argument("--collection", help="Another collection than the dataset's own.")
    args = parser.parse_args()

    import django

    django.setup()
    from django.db import transaction

    from kb.models import Collection, EmbeddingModel
    from search.evaluation import beir_dataset_load, eval_collection_slug, eval_doc_ids_by_document

    dataset = beir_dataset_load(path=args.dataset)
    collection = Collection.objects.get(
        slug=args.collection or eval_collection_slug(dataset=dataset))
    model = EmbeddingModel.objects.get(is_active=True)
    doc_ids = ({} if args.collection
               else eval_doc_ids_by_document(dataset=dataset, collection=collection))
    with transaction.atomic():
        measured = measure(args, model, collection, dataset, doc_ids)
        transaction.set_rollback(True)
    recall, ndcg, timings, sizes, build_s = measured

    print(f"{dataset.name}: {len(dataset.queries)} queries, ef_search {args.ef_search}")
    print(f"{'index':<10}{'recall@10':>11}{'nDCG@10':>10}{'p50 ms':>9}{'p95 ms':>9}"
          f"{'size MB':>9}{'build s':>9}")
    for name in INDEXES:
        print(f"{name:<10}{statistics.mean(recall[name]):>11.4f}{ndcg[name]:>10.4f}"
              f"{percentile(timings[name], 50):>9.2f}{percentile(timings[name], 95):>9.2f}"
              f"{sizes[name] / 2**20:>9.1f}{build_s[name]:>9.1f}")
    print(f"{'exact':<10}{1.0:>11.4f}{ndcg['exact']:>10.4f}")


def measure(args, model, collection, dataset, doc_ids):
    from django.db import connection

    from kb import embeddings
    from search.evaluation import metrics_compute, ranked_doc_ids, run_from_rankings
    from search.vector import vector_literal

    d = model.dimensions
    where = (f"e.embedding_model_id = {int(model.pk)} AND c.searchable "
             f"AND c.collection_id = {int(collection.pk)}")
    with connection.cursor() as cursor:
        cursor.execute(f"SET LOCAL hnsw.ef_search = {int(args.ef_search)}")
        cursor.execute("SET LOCAL maintenance_work_mem = '512MB'")
        # Only these two indexes may serve the measurement (the model's own is one of them).
        cursor.execute(f"DROP INDEX IF EXISTS {model.hnsw_index_name}")
        build_s, sizes = {}, {}
        for kind, index in INDEXES.items():
            started = time.monotonic()
            cursor.execute(
                f"CREATE INDEX {index} ON kb_chunkembedding USING hnsw "
                f"((embedding::{kind}({d})) {kind}_cosine_ops) "
                f"WITH (m = 16, ef_construction = 64) WHERE embedding_model_id = {int(model.pk)}"
            )
            build_s[kind] = time.monotonic() - started
            cursor.execute("SELECT pg_relation_size(%s)", [index])
            sizes[kind] = cursor.fetchone()[0]

    statements = {
        "vector": (f"SELECT c.id, c.document_id FROM kb_chunkembedding e "
                   f"JOIN kb_chunk c ON c.id = e.chunk_id WHERE {where} "
                   f"ORDER BY (e.embedding::vector({d})) <=> %s::vector({d}) LIMIT 100"),
        "halfvec": (f"SELECT c.id, c.document_id FROM kb_chunkembedding e "
                    f"JOIN kb_chunk c ON c.id = e.chunk_id WHERE {where} "
                    f"ORDER BY (e.embedding::halfvec({d})) <=> %s::halfvec({d}) LIMIT 100"),
        # + 0: no index can serve it, so every vector is compared.
        "exact": (f"SELECT c.id, c.document_id FROM kb_chunkembedding e "
                  f"JOIN kb_chunk c ON c.id = e.chunk_id WHERE {where} "
                  f"ORDER BY ((e.embedding::vector({d})) <=> %s::vector({d})) + 0 LIMIT 100"),
    }
    rankings: dict[str, dict[str, list[str]]] = {name: {} for name in statements}
    recall: dict[str, list[float]] = {"vector": [], "halfvec": []}
    timings: dict[str, list[float]] = {"vector": [], "halfvec": []}
    for i, (qid, text) in enumerate(dataset.queries.items()):
        qvec = vector_literal(embeddings.embed_query(model=model, text=text))
        rows = {}
        order = list(statements) if i % 2 == 0 else ["halfvec", "vector", "exact"]
        with connection.cursor() as cursor:
            for name in order:
                started = time.perf_counter()
                cursor.execute(statements[name], [qvec])
                rows[name] = cursor.fetchall()
                if name in timings:
                    timings[name].append((time.perf_counter() - started) * 1000)
        exact_top = {chunk_id for chunk_id, _ in rows["exact"][:10]}
        for name in recall:
            recall[name].append(len(exact_top & {c for c, _ in rows[name][:10]}) / 10)
        for name in statements:
            rankings[name][qid] = ranked_doc_ids(
                document_ids=[document_id for _, document_id in rows[name]],
                doc_ids_by_document=doc_ids)
    ndcg = {name: (metrics_compute(qrels=dataset.qrels, run=run_from_rankings(rankings[name]),
                                   metrics=["ndcg@10"])["ndcg@10"] if doc_ids else float("nan"))
            for name in statements}
    return recall, ndcg, timings, sizes, build_s


if __name__ == "__main__":
    main()
