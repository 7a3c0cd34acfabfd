"""Retrieval at 100k chunks: BM25 vs ts_rank vs in-memory BM25, HNSW recall, API latency.

    KB_PGDATA=/tmp/kb-bench-pgdata KB_DATA_DIR=/tmp/kb-bench \\
        .venv/bin/python benchmarks/retrieval.py [--chunks 100000] [--json FILE] [--bench-data DIR]

Corpus: the scifact abstracts (title as context) replicated with variation until there are
--chunks chunks. Replica r > 0 of a passage drops 15% of its words and shuffles the rest
within windows of five, so tsvectors differ; its vector is the original's plus gaussian
noise (σ=0.02 per dimension, cosine ≈ 0.93 to the original), renormalised. The model
embeds each abstract once (cached in KB_DATA_DIR) and the queries, never 100k texts.
Chunks go in with COPY, so the triggers build the BM25 postings and statistics exactly as
ingestion does, in 10k-row statements; the HNSW index is built after loading.

One run reports, for scifact's 300 test queries:
- our BM25 top-10 (search.retrieval, one statement) against Postgres ts_rank over the
  same tsvectors and matches (search.bm25.ts_rank_top); goal ratio ≤ 1.0;
- rank_bm25 and bm25s in memory over the same lexemes: index build time, query latency,
  and bm25s' top-10 overlap with ours (the same Lucene formula, so ≈ 1.0);
- HNSW recall@10 against an exact scan, and latency, at a few ef_search values;
- `/api/v1/search` hybrid end to end over HTTP against uvicorn on 127.0.0.1, with query
  embedding (every query is new to the server) and rerank off: p50, p95 and requests/s
  at 1 and --concurrency clients, each phase bounded by --duration and --max-requests.

Use a data dir of its own (KB_PGDATA above): the corpus is ~1 GB and stays for re-runs
(--rebuild drops it). Loopback only; nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kb.settings")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The shared benchmark data sits beside the repository (--bench-data overrides).
BENCH_DATA = ROOT.parent / "shared" / "bench"
# In-memory baselines hold every chunk's tokens as Python strings: ~10 GB at 1M chunks.
IN_MEMORY_MAX_CHUNKS = 300_000
CHUNKS_PER_DOCUMENT = 20
COPY_BATCH = 10_000
NOISE_SIGMA = 0.02


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = (len(ordered) - 1) * q / 100
    low, high = int(index), min(int(index) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (index - low)


def summary(latencies_ms: list[float]) -> dict:
    return {
        "p50_ms": round(percentile(latencies_ms, 50), 2),
        "p95_ms": round(percentile(latencies_ms, 95), 2),
        "mean_ms": round(statistics.fmean(latencies_ms), 2) if latencies_ms else None,
        "n": len(latencies_ms),
    }


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return (time.perf_counter() - started) * 1000, result


def vary(words: list[str], rng: random.Random) -> str:
    """Drop 15% of the words and shuffle the rest within windows of five."""
    kept = [w for w in words if rng.random() >= 0.15] or words[:1]
    out = []
    for start in range(0, len(kept), 5):
        window = kept[start : start + 5]
        rng.shuffle(window)
        out.extend(window)
    return " ".join(out)


def load_scifact(scifact: Path) -> tuple[list[dict], list[str]]:
    corpus = [json.loads(line) for line in (scifact / "corpus.jsonl").open() if line.strip()]
    judged = {line.split("\t")[0] for line in list((scifact / "qrels" / "test.tsv").open())[1:]}
    queries = [json.loads(line) for line in (scifact / "queries.jsonl").open() if line.strip()]
    test = [q["text"] for q in queries if q["_id"] in judged]
    others = [q["text"] for q in queries if q["_id"] not in judged]
    return corpus, test + others


def base_vectors(backend, corpus: list[dict], cache_dir: Path):
    """The model's vector for each abstract (title as context), cached on disk."""
    import numpy

    from kb.ingestion.chunking import embedding_input

    texts = [
        embedding_input(title=d.get("title") or "", heading_path=(), text=d["text"]) for d in corpus
    ]
    digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]
    path = cache_dir / f"scifact-base-vectors-{digest}.npy"
    if path.exists():
        return numpy.load(path)
    print(f"Embedding {len(texts)} base passages once (cached in {path})…", flush=True)
    vectors = []
    for start in range(0, len(texts), backend.batch_size):
        vectors.extend(backend.embed_batch(texts[start : start + backend.batch_size]).vectors)
        if start % (backend.batch_size * 10) == 0:
            print(f"  {start + backend.batch_size}/{len(texts)}", flush=True)
    array = numpy.asarray(vectors, dtype=numpy.float32)
    cache_dir.mkdir(parents=True, exist_ok=True)
    numpy.save(path, array)
    return array


def corpus_slug(chunks: int) -> str:
    """bench-100k, bench-1000k: the collection each corpus size loads into."""
    return f"bench-{chunks // 1000}k"


def corpus_build(*, target: int, corpus: list[dict], vectors, model, rebuild: bool):
    """The bench collection with `target` searchable chunks and their vectors; and, where
    the server has pg_textsearch, its index, built after the load and timed."""
    import numpy
    from django.db import connection, transaction
    from django.utils import timezone
    from pgvector.psycopg import register_vector

    from kb import embeddings
    from kb.models import Collection, Document
    from kb.services.collections import collection_get_or_create
    from search import textsearch
    from search.models import CollectionStatistic

    slug = corpus_slug(target)
    existing = Collection.objects.filter(slug=slug).first()
    if existing is not None and not rebuild:
        stat = CollectionStatistic.objects.filter(collection=existing).first()
        if stat is not None and stat.chunk_count == target:
            print(f"Reusing {slug}: {target} chunks.")
            return existing, indexes_build_missing(model)
    if existing is not None:
        print(f"Dropping the old {slug}…", flush=True)
        # One transaction, so a failure leaves the corpus whole; chunks by 1,000 documents
        # (20,000 chunks): the statistics trigger gathers a statement's deleted rows into
        # arrays, and a million in one statement pass PostgreSQL's 1 GB array limit.
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("DELETE FROM kb_chunkembedding e USING kb_chunk c "
                           "WHERE c.id = e.chunk_id AND c.collection_id = %s", [existing.pk])
            document_ids = list(Document.objects.filter(collection=existing)
                                .order_by("pk").values_list("pk", flat=True))
            for start in range(0, len(document_ids), 1000):
                cursor.execute("DELETE FROM kb_chunk WHERE document_id = ANY(%s)",
                               [document_ids[start:start + 1000]])
            existing.delete()
    collection = collection_get_or_create(slug=slug, name=f"Benchmark {target:,} chunks")
    timings = {}
    rng = random.Random(42)
    noise = numpy.random.default_rng(42)
    now = timezone.now()
    documents = Document.objects.bulk_create([
        Document(collection=collection, title=f"bench {i}", original_filename=f"bench-{i}.txt",
                 content_hash=hashlib.sha256(f"bench-{i}".encode()).hexdigest(),
                 status=Document.Status.READY, stage=Document.Stage.DONE, chunk_generation=1,
                 metadata={"bench": True})
        for i in range((target + CHUNKS_PER_DOCUMENT - 1) // CHUNKS_PER_DOCUMENT)
    ])
    embeddings.embedding_model_index_drop(model=model)
    # Built after the load, as one would for a bulk import, so its build time is its own.
    textsearch.textsearch_index_drop()
    raw = connection.connection
    register_vector(raw)
    started = time.perf_counter()
    columns = ("document_id, collection_id, generation, ordinal, text, embedding_input_hash, "
               "token_count, heading_path, char_start, char_end, search_context, searchable, "
               "created_at")
    chunk_vectors: list = []
    for batch_start in range(0, target, COPY_BATCH):
        rows = []
        for i in range(batch_start, min(target, batch_start + COPY_BATCH)):
            base = corpus[i % len(corpus)]
            replica = i // len(corpus)
            words = base["text"].split()
            text = base["text"] if replica == 0 else vary(words, rng)
            vector = vectors[i % len(corpus)]
            if replica:
                vector = vector + noise.normal(0, NOISE_SIGMA, vector.shape).astype(numpy.float32)
                vector /= numpy.linalg.norm(vector)
            chunk_vectors.append(vector)
            rows.append((documents[i // CHUNKS_PER_DOCUMENT].pk, collection.pk, 1,
                         i % CHUNKS_PER_DOCUMENT, text,
                         hashlib.sha256(f"{i}:{text}".encode()).hexdigest(), len(words), "[]", 0,
                         len(text), base.get("title") or "", True, now))
        with transaction.atomic(), raw.cursor() as cursor, \
                cursor.copy(f"COPY kb_chunk ({columns}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        print(f"  chunks {min(target, batch_start + COPY_BATCH)}/{target}", flush=True)
    timings["chunks_copy_s"] = round(time.perf_counter() - started, 1)
    with connection.cursor() as cursor:
        cursor.execute("SELECT id, document_id, ordinal FROM kb_chunk WHERE collection_id = %s",
                       [collection.pk])
        position = {pk: i for i, pk in enumerate(d.pk for d in documents)}
        ids = sorted(cursor.fetchall(), key=lambda r: (position[r[1]], r[2]))
    started = time.perf_counter()
    with transaction.atomic(), raw.cursor() as cursor, cursor.copy(
        "COPY kb_chunkembedding (chunk_id, embedding_model_id, embedding) "
        "FROM STDIN WITH (FORMAT BINARY)"
    ) as copy:
        copy.set_types(["int8", "int8", "vector"])
        for (chunk_id, _, _), vector in zip(ids, chunk_vectors, strict=True):
            copy.write_row((chunk_id, model.pk, vector))
    timings["vectors_copy_s"] = round(time.perf_counter() - started, 1)
    # Both indexes were dropped before the load: built now, as the product builds them.
    timings.update(indexes_build_missing(model))
    return collection, timings


def indexes_build_missing(model) -> dict[str, float]:
    """Build the HNSW and pg_textsearch indexes the corpus lacks (after a load, or a load
    stopped after its rows were in), as the product builds them
    (kb.ops.database.index_build_settings: no statement timeout, maintenance_work_mem =
    KB_INDEX_BUILD_MEMORY; at 1M chunks the half-precision graph needs about 1.1 GB, so the
    1M runs set it to 2GB); their build times."""
    from django.conf import settings
    from django.db import connection

    from kb import embeddings
    from search import textsearch

    timings = {}
    with connection.cursor() as cursor:
        # Missing, or left invalid by a failed build (which the build itself replaces).
        cursor.execute("SELECT coalesce((SELECT NOT indisvalid FROM pg_index "
                       "WHERE indexrelid = to_regclass(%s)), true)", [model.hnsw_index_name])
        missing = cursor.fetchone()[0]
    if missing:
        print("Building the missing HNSW index…", flush=True)
        started = time.perf_counter()
        embeddings.embedding_model_index_create(model=model)
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE kb_chunk; ANALYZE kb_chunkembedding; "
                           "ANALYZE search_posting; ANALYZE search_termstatistic")
        timings["hnsw_build_s"] = round(time.perf_counter() - started, 1)
    status = textsearch.textsearch_status()
    if status["available"] and status["preloaded"] and not status["indexed"]:
        print("Building the missing pg_textsearch index…", flush=True)
        started = time.perf_counter()
        textsearch.textsearch_index_create(k1=float(settings.KB_BM25_K1),
                                           b=float(settings.KB_BM25_B))
        timings["pg_textsearch_build_s"] = round(time.perf_counter() - started, 1)
    return timings


def index_sizes(model) -> dict[str, int]:
    """Bytes on disk of what each engine reads: our postings and term statistics (kb_bm25
    and SQL), pg_textsearch's index, the model's HNSW index, and the chunks themselves."""
    from django.db import connection

    from search.textsearch import INDEX_NAME

    relations = {
        "bm25_postings (search_posting, with indexes)": "search_posting",
        "bm25_term_statistics (search_termstatistic, with indexes)": "search_termstatistic",
        "pg_textsearch index": INDEX_NAME,
        "hnsw index": model.hnsw_index_name,
        "kb_chunk (with indexes)": "kb_chunk",
        "kb_chunkembedding (with indexes)": "kb_chunkembedding",
    }
    sizes = {}
    with connection.cursor() as cursor:
        for label, relation in relations.items():
            cursor.execute("SELECT pg_total_relation_size(to_regclass(%s))", [relation])
            size = cursor.fetchone()[0]
            if size is not None:
                sizes[label] = int(size)
    return sizes


def backend_memory(queries: list[str], collection, report: dict) -> None:
    """Each BM25 engine's server process after 100 queries on a connection of its own:
    RSS (shared buffers it touched included) and USS (its private memory)."""
    import psutil
    from django.conf import settings
    from django.db import connection

    from search.filters import SearchFilters
    from search.retrieval import retrieve_candidates
    from search.textsearch import textsearch_index_ready

    filters = SearchFilters(collection_ids=(collection.pk,))
    engines = ["auto", "sql"] + (["pg_textsearch"] if textsearch_index_ready(connection)
                                    else [])
    report["bm25_backend_memory_mb"] = {}
    for engine in engines:
        connection.close()
        settings.KB_BM25_ENGINE = engine
        for query in queries[:100]:
            retrieve_candidates(query=query, query_vector=None, filters=filters, use_bm25=True,
                                limit=10)
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            memory = psutil.Process(cursor.fetchone()[0]).memory_full_info()
        report["bm25_backend_memory_mb"][engine] = {"rss": round(memory.rss / 2**20, 1),
                                                    "uss": round(memory.uss / 2**20, 1)}
        print(f"BM25 {engine:<14} server process after 100 queries: "
              f"RSS {memory.rss / 2**20:7.1f} MB, USS {memory.uss / 2**20:6.1f} MB")
    settings.KB_BM25_ENGINE = "auto"
    connection.close()


def tsvector_tokens(collection_id: int) -> tuple[list[int], list[list[str]]]:
    """Each chunk's lexemes, repeated as often as they occur: the same tokens BM25 sees."""
    from django.db import connection

    pattern = re.compile(r"'((?:[^']|'')*)'(?::([0-9A-D,]+))?")
    with connection.cursor() as cursor:
        cursor.execute("SELECT id, search_vector::text FROM kb_chunk "
                       "WHERE collection_id = %s AND searchable ORDER BY id", [collection_id])
        ids, docs = [], []
        for chunk_id, text in cursor.fetchall():
            tokens = []
            for lexeme, positions in pattern.findall(text or ""):
                occurrences = positions.count(",") + 1 if positions else 1
                tokens.extend([lexeme.replace("''", "'")] * occurrences)
            ids.append(chunk_id)
            docs.append(tokens)
    return ids, docs


def bench_bm25(collection, queries: list[str], report: dict) -> None:
    from django.conf import settings
    from django.db import connection

    from search.bm25 import query_lexemes, ts_rank_top
    from search.filters import SearchFilters
    from search.retrieval import retrieve_candidates

    filters = SearchFilters(collection_ids=(collection.pk,))

    def ours(q):
        return retrieve_candidates(query=q, query_vector=None, filters=filters, use_bm25=True,
                                   limit=10)

    engine = "kb_bm25 C function" if ours(queries[0]).bm25_engine == "kb_bm25" else "SQL"

    def ts_rank(q):
        return ts_rank_top(query=q, collection_id=collection.pk, limit=10)

    # ts_rank reads every matching chunk's tsvector: seconds a query at 1M chunks, so there
    # it runs for the first 30 queries only (ours still runs for all).
    rank_queries = len(queries) if report["chunks"] <= IN_MEMORY_MAX_CHUNKS else 30
    for q in queries[:20]:  # warm both: same pages in shared buffers
        ours(q)
        ts_rank(q)
    our_ms, rank_ms, our_top = [], [], {}
    for i, q in enumerate(queries):
        pair = [(ours, our_ms)] + ([(ts_rank, rank_ms)] if i < rank_queries else [])
        for fn, sink in (pair if i % 2 == 0 else pair[::-1]):
            ms, result = timed(fn, q)
            sink.append(ms)
            if fn is ours:
                our_top[i] = [c.chunk_id for c in result.candidates]
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT avg(n) FROM (SELECT count(*) AS n FROM unnest(%s::text[]) AS q(query) "
            "JOIN LATERAL (SELECT DISTINCT lexeme FROM unnest(to_tsvector('english', q.query))) l "
            "ON TRUE "
            "JOIN search_posting p ON p.collection_id = %s AND p.lexeme = l.lexeme "
            "GROUP BY q.query) t",
            [queries, collection.pk],
        )
        postings = float(cursor.fetchone()[0] or 0)
    report["bm25"] = {"ours": summary(our_ms), "ts_rank": summary(rank_ms),
                      "ratio_p50": round(percentile(our_ms, 50) / percentile(rank_ms, 50), 3),
                      "ratio_p95": round(percentile(our_ms, 95) / percentile(rank_ms, 95), 3),
                      "avg_postings_per_query": round(postings), "engine": engine}
    print(f"BM25 top-10 (ours, {engine})")
    print(f"BM25 top-10 (ours)     p50 {report['bm25']['ours']['p50_ms']:7.1f} ms  "
          f"p95 {report['bm25']['ours']['p95_ms']:7.1f} ms")
    print(f"ts_rank top-10         p50 {report['bm25']['ts_rank']['p50_ms']:7.1f} ms  "
          f"p95 {report['bm25']['ts_rank']['p95_ms']:7.1f} ms  ({len(rank_ms)} queries)")
    print(f"ratio ours/ts_rank     p50 {report['bm25']['ratio_p50']:.2f}  "
          f"p95 {report['bm25']['ratio_p95']:.2f}"
          f"  (goal ≤ 1.0; {postings:.0f} postings per query on average)")

    # The SQL engine (what a server without the extension runs) against the default, in
    # turns; and pg_textsearch's index where `kb_textsearch_index create` made it.
    from search.textsearch import textsearch_index_ready

    if engine != "SQL":
        sql_ms, native_ms, textsearch_ms = [], [], []
        runs = [("sql", sql_ms), ("auto", native_ms)]
        if textsearch_index_ready(connection):
            runs.append(("pg_textsearch", textsearch_ms))
        for i, q in enumerate(queries):
            for setting, sink in (runs if i % 2 == 0 else runs[::-1]):
                settings.KB_BM25_ENGINE = setting
                sink.append(timed(ours, q)[0])
        settings.KB_BM25_ENGINE = "auto"
        report["bm25"]["ours_sql_engine"] = summary(sql_ms)
        report["bm25"]["ours_c_engine_same_run"] = summary(native_ms)
        print(f"BM25 top-10, SQL engine p50 {percentile(sql_ms, 50):7.1f} ms  "
              f"p95 {percentile(sql_ms, 95):7.1f} ms"
              f"  (C function in the same turns: {percentile(native_ms, 50):.1f} / "
              f"{percentile(native_ms, 95):.1f})")
        if textsearch_ms:
            report["bm25"]["pg_textsearch_same_run"] = summary(textsearch_ms)
            print(f"BM25 top-10, pg_textsearch p50 {percentile(textsearch_ms, 50):7.1f} ms  "
                  f"p95 {percentile(textsearch_ms, 95):7.1f} ms (same turns)")

    # Users type short queries more often than scifact's claims: each query's first
    # one and two words that have a lexeme, through the same statement.
    for words in (1, 2):
        short = [q for q in (short_query(query, words, collection.pk) for query in queries) if q]
        short_ms = [timed(ours, q)[0] for q in short]
        report["bm25"][f"ours_{words}_word"] = summary(short_ms)
        print(f"BM25 top-10, {words} word{'s' if words > 1 else ' '}  "
              f"p50 {percentile(short_ms, 50):7.1f} ms  "
              f"p95 {percentile(short_ms, 95):7.1f} ms  ({len(short)} queries)")

    # In-memory baselines over exactly the same lexemes.
    if report["chunks"] > IN_MEMORY_MAX_CHUNKS:
        print(f"In-memory baselines skipped above {IN_MEMORY_MAX_CHUNKS:,} chunks (memory).")
        return
    ids, docs = tsvector_tokens(collection.pk)
    query_tokens = [query_lexemes(query=q, collection_ids=(collection.pk,)) for q in queries]
    k1, b = float(settings.KB_BM25_K1), float(settings.KB_BM25_B)
    import bm25s
    import numpy
    from rank_bm25 import BM25Okapi

    build_ms, retriever = timed(lambda: _bm25s_index(bm25s, docs, k1, b))
    bm25s_ms, overlap = [], []
    for i, tokens in enumerate(query_tokens):
        if not tokens:
            continue
        ms, (found, _) = timed(retriever.retrieve, [tokens], k=10, show_progress=False, n_threads=1)
        bm25s_ms.append(ms)
        theirs = {ids[j] for j in found[0]}
        if our_top.get(i):
            overlap.append(len(theirs & set(our_top[i])) / len(our_top[i]))
    rank_build_ms, okapi = timed(BM25Okapi, docs, k1=k1, b=b)
    okapi_ms = []
    deadline = time.perf_counter() + 60
    for tokens in query_tokens:
        if time.perf_counter() > deadline:
            break
        ms, _ = timed(lambda t=tokens: numpy.argpartition(-okapi.get_scores(t), 10)[:10])
        okapi_ms.append(ms)
    overlap_mean = round(statistics.fmean(overlap), 4) if overlap else None
    report["bm25s"] = {"build_s": round(build_ms / 1000, 1), **summary(bm25s_ms),
                       "top10_overlap_with_ours": overlap_mean}
    report["rank_bm25"] = {"build_s": round(rank_build_ms / 1000, 1), **summary(okapi_ms)}
    print(f"bm25s (in memory)      p50 {report['bm25s']['p50_ms']:7.1f} ms  "
          f"p95 {report['bm25s']['p95_ms']:7.1f} ms"
          f"  build {report['bm25s']['build_s']} s, top-10 overlap with ours "
          f"{report['bm25s']['top10_overlap_with_ours']}")
    print(f"rank_bm25 (in memory)  p50 {report['rank_bm25']['p50_ms']:7.1f} ms  "
          f"p95 {report['rank_bm25']['p95_ms']:7.1f} ms  build {report['rank_bm25']['build_s']} s "
          f"({len(okapi_ms)} queries, 60 s budget)")


def short_query(query: str, words: int, collection_id: int) -> str:
    """The query's first `words` words that each reduce to a lexeme ('' if it has fewer)."""
    from search.bm25 import query_lexemes

    kept = []
    for word in query.split():
        if query_lexemes(query=word, collection_ids=(collection_id,)):
            kept.append(word)
            if len(kept) == words:
                return " ".join(kept)
    return ""


def _bm25s_index(bm25s, docs, k1, b):
    retriever = bm25s.BM25(k1=k1, b=b, method="lucene")
    retriever.index(docs, show_progress=False)
    return retriever


def bench_hnsw(collection, model, query_vectors, report: dict) -> None:
    from django.conf import settings
    from django.db import connection

    from search.filters import SearchFilters
    from search.retrieval import retrieve_candidates

    filters = SearchFilters(collection_ids=(collection.pk,))

    def top(vector, exact):
        return [(c.chunk_id, c.vector_similarity) for c in retrieve_candidates(
            query="", query_vector=vector, filters=filters, use_bm25=False, model_id=model.pk,
            dimensions=model.dimensions, limit=10, exact_vector=exact).candidates]

    # Recall by id counts a neighbour as missed when HNSW returns another one just as near.
    # On this corpus every passage has ~N/5,183 perturbed copies (193 at 1M) within cosine
    # 0.86 of each other, so the exact top 10 are near-ties among copies, and id recall
    # measures tie-breaking. ε-recall (ann-benchmarks' "epsilon" measure) counts a result
    # whose distance is within (1 + ε) of the exact 10th neighbour's, with ε = 0.01.
    epsilon = 0.01
    exact_ms, exact_top, exact_tenth = [], [], []
    for vector in query_vectors:
        ms, found = timed(top, vector, True)
        exact_ms.append(ms)
        exact_top.append({chunk_id for chunk_id, _ in found})
        exact_tenth.append(1 - found[-1][1] if found else 0.0)
    report["hnsw"] = {"exact": summary(exact_ms), "by_ef_search": {}}
    print(f"exact vector top-10    p50 {percentile(exact_ms, 50):7.1f} ms  "
          f"p95 {percentile(exact_ms, 95):7.1f} ms")
    sweep = {40, int(settings.KB_HNSW_EF_SEARCH), 200}
    if report["chunks"] > IN_MEMORY_MAX_CHUNKS:
        sweep |= {400, 800}
    for ef in sorted(sweep):
        with connection.cursor() as cursor:
            cursor.execute("SET hnsw.ef_search = %s", [ef])
        for vector in query_vectors[:20]:
            top(vector, False)
        latencies, recalls, epsilon_recalls = [], [], []
        for vector, truth, tenth in zip(query_vectors, exact_top, exact_tenth, strict=True):
            ms, found = timed(top, vector, False)
            latencies.append(ms)
            recalls.append(len(truth & {chunk_id for chunk_id, _ in found}) / max(1, len(truth)))
            near = sum(1 for _, similarity in found if 1 - similarity <= (1 + epsilon) * tenth)
            epsilon_recalls.append(min(near, 10) / max(1, len(truth)))
        report["hnsw"]["by_ef_search"][ef] = {
            "recall@10": round(statistics.fmean(recalls), 4),
            "epsilon_recall@10": round(statistics.fmean(epsilon_recalls), 4), **summary(latencies)}
        print(f"HNSW ef_search={ef:<4}     p50 {percentile(latencies, 50):7.1f} ms  "
              f"p95 {percentile(latencies, 95):7.1f} ms  recall@10 {statistics.fmean(recalls):.4f}"
              f"  ε-recall@10 {statistics.fmean(epsilon_recalls):.4f}"
              f"{'  (default)' if ef == settings.KB_HNSW_EF_SEARCH else ''}")
    with connection.cursor() as cursor:
        cursor.execute("SET hnsw.ef_search = %s", [int(settings.KB_HNSW_EF_SEARCH)])


def bench_http(queries: list[str], *, concurrency: int, duration: float, max_requests: int,
               report: dict, engine: str = "auto") -> None:
    """The hybrid API over HTTP, with the server's BM25 engine set to `engine`."""
    import httpx
    from django.contrib.auth import get_user_model
    from django.db import connection

    from kb.models import ApiKey
    from kb.services.api_keys import api_key_generate, api_key_hash

    user, _ = get_user_model().objects.get_or_create(username="bench")
    raw_key, prefix = api_key_generate()
    ApiKey.objects.create(name="benchmark", prefix=prefix, hashed_key=api_key_hash(raw_key),
                          user=user)
    connection.close()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "KB_BM25_ENGINE": engine, "KB_RATELIMIT_ENABLE": "false",
           "PYTHONUNBUFFERED": "1",
           "LOG_LEVEL": "WARNING"}
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "kb.asgi:application", "--host", "127.0.0.1",
         "--port", str(port), "--lifespan", "off", "--log-level", "warning", "--no-access-log"],
        cwd=ROOT, env=env,
    )
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {raw_key}"}
    try:
        with httpx.Client(timeout=30) as client:
            for _ in range(300):
                try:
                    if client.get(f"{base}/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            for q in ("warm up the embedding model", "and the database connection"):
                response = client.post(
                    f"{base}/api/v1/search",
                    json={"query": q, "k": 10, "mode": "hybrid", "rerank": False},
                    headers=headers,
                )
                response.raise_for_status()
        report.setdefault("http", {})[engine] = {}
        pool = iter(queries)
        lock = threading.Lock()
        for clients in sorted({1, concurrency}):
            latencies: list[float] = []
            errors: list[str] = []
            deadline = time.perf_counter() + duration

            def worker(deadline=deadline, latencies=latencies, errors=errors):
                with httpx.Client(timeout=30, headers=headers) as client:
                    while time.perf_counter() < deadline:
                        with lock:
                            if len(latencies) + len(errors) >= max_requests:
                                return
                            query = next(pool, None)
                        if query is None:
                            return
                        started = time.perf_counter()
                        try:
                            response = client.post(f"{base}/api/v1/search", json={
                                "query": query, "k": 10, "mode": "hybrid", "rerank": False})
                            ok = response.status_code == 200
                        except httpx.HTTPError as exc:
                            ok, response = False, exc
                        elapsed = (time.perf_counter() - started) * 1000
                        with lock:
                            (latencies.append(elapsed) if ok
                             else errors.append(str(response)[:200]))

            threads = [threading.Thread(target=worker) for _ in range(clients)]
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            wall = time.perf_counter() - started
            report["http"][engine][clients] = {**summary(latencies),
                                       "requests_per_s": round(len(latencies) / wall, 1),
                                       "errors": len(errors)}
            print(f"API hybrid ({engine}), {clients} client{'s' if clients > 1 else ' '}   "
                  f"p50 {percentile(latencies, 50):7.1f} ms  "
                  f"p95 {percentile(latencies, 95):7.1f} ms  {len(latencies) / wall:6.1f} req/s  "
                  f"({len(latencies)} requests, {len(errors)} errors"
                  f"{'; ' + errors[0] if errors else ''})")
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=300,
                        help="scifact test queries for BM25/HNSW.")
    parser.add_argument("--recall-queries", type=int, default=0,
                        help="Queries whose exact top-10 (a full scan each, ~1.5 s at 1M "
                             "chunks) measures HNSW recall (0: all --queries).")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--duration", type=float, default=20.0, help="Seconds per HTTP phase.")
    parser.add_argument("--max-requests", type=int, default=500,
                        help="Requests per HTTP phase at most.")
    parser.add_argument("--base-docs", type=int, default=0,
                        help="Replicate only the first N scifact abstracts (0: all 5,183).")
    parser.add_argument("--rebuild", action="store_true",
                        help="Rebuild the corpus even if it exists.")
    parser.add_argument("--skip", default="",
                        help="Comma-separated: bm25, memory, hnsw, http.")
    parser.add_argument("--http-engines", default="auto,pg_textsearch",
                        help="BM25 engines the HTTP phase runs the server with, in turn "
                             "(pg_textsearch only where its index exists).")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--bench-data", type=Path, default=BENCH_DATA,
                        help="The shared benchmark data, with scifact/ in it "
                             f"(default: {BENCH_DATA}).")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    import django

    django.setup()
    from django.db import connection as benchmark_connection

    # The benchmark's own statements (loading, counting postings over all queries, moving
    # a tenth of the corpus) run for minutes at 1M chunks: not under the request timeout.
    with benchmark_connection.cursor() as cursor:
        cursor.execute("SET statement_timeout = 0")
    from django.conf import settings
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)
    from kb import embeddings

    corpus, all_queries = load_scifact(args.bench_data / "scifact")
    corpus = corpus[: args.base_docs or None]
    model = embeddings.embedding_model_active_or_bootstrap()
    backend = embeddings.backend_for(model)
    vectors = base_vectors(backend, corpus, Path(settings.KB_DATA_DIR) / "bench")
    collection, build = corpus_build(target=args.chunks, corpus=corpus, vectors=vectors,
                                     model=model, rebuild=args.rebuild)
    report: dict = {"chunks": args.chunks, "build": build, "k1": settings.KB_BM25_K1,
                    "b": settings.KB_BM25_B, "ef_search": settings.KB_HNSW_EF_SEARCH,
                    "cpus": os.cpu_count()}
    if build:
        print(f"built: {build}")
    report["sizes_bytes"] = index_sizes(model)
    for label, size in report["sizes_bytes"].items():
        print(f"{label:<58} {size / 2**20:9.1f} MB")
    queries = all_queries[: args.queries]
    if "bm25" not in skip:
        bench_bm25(collection, queries, report)
    if "memory" not in skip:
        backend_memory(queries, collection, report)
    if "hnsw" not in skip:
        query_vectors = [backend.embed_query(q).vectors[0]
                         for q in queries[: args.recall_queries or None]]
        bench_hnsw(collection, model, query_vectors, report)
    if "http" not in skip:
        # Queries the server has not seen, so each request embeds its query.
        from django.db import connection

        from search.textsearch import textsearch_index_ready

        for engine in filter(None, args.http_engines.split(",")):
            if engine == "pg_textsearch" and not textsearch_index_ready(connection):
                continue
            bench_http(all_queries[args.queries:] + all_queries[: args.queries],
                       concurrency=args.concurrency, duration=args.duration,
                       max_requests=args.max_requests, report=report, engine=engine)
    report["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    print(f"load average {report['load_average_1m_at_end']} at the end ({os.cpu_count()} CPUs): "
          "other processes on the machine inflate every latency above.")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
