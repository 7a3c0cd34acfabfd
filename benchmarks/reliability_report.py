"""Regenerate docs/RELIABILITY.md from real runs: load, faults, bad inputs, access control.

    .venv/bin/python benchmarks/reliability_report.py            # everything (~8 minutes)
    .venv/bin/python benchmarks/reliability_report.py --skip-load
    .venv/bin/python benchmarks/reliability_report.py --load-results /tmp/kb-reliability/load.json

1. Load: runs benchmarks/load.py (wrk on loopback; skipped with a note when wrk is missing),
   or reads its JSON with --load-results.
2. Tests: one pytest run over tests/reliability (fuzzers, faults, log privacy), the
   access-control matrices, and the fault and hostile-input tests that live beside the code
   they test, with a JUnit XML report and KB_RELIABILITY_STATS (the fuzzers' example counts
   and the fault tests' figures). It uses its own embedded database (--pgdata).
3. Writes the tables, with the command that reproduces each row.

Exit status: 0 when every test passed (xfails are known, listed findings) and the load
run saw no 5xx; 1 otherwise. The document is written either way.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# The parser edge cases: parse_document, sniffing, decoding, and one file per format.
PARSER_TESTS = [
    "tests/kb/ingestion/test_parsing.py",
    "tests/kb/ingestion/test_sniff.py",
    "tests/kb/ingestion/test_text.py",
    "tests/kb/ingestion/formats",
]

PYTEST_TARGETS = [
    "tests/reliability",
    "tests/kb/test_log_privacy.py",
    "tests/kb/test_access_control.py",
    "tests/chat/test_access_control.py",
    "tests/kb/test_worker_crash.py",
    "tests/kb/test_reembedding.py",
    "tests/kb/services/test_ingest.py",
    "tests/kb/ingestion/test_archives.py",
    *PARSER_TESTS,
]


@dataclass
class Case:
    """One test case from the JUnit report."""

    node: str  # tests/x/test_y.py::test_name[param]
    outcome: str  # passed | failed | error | skipped | xfailed
    seconds: float
    message: str = ""


def run(command: list[str], *, env: dict[str, str] | None = None, timeout: float) -> int:
    print("$", " ".join(command), flush=True)
    return subprocess.run(command, cwd=ROOT, env=env, timeout=timeout).returncode


def run_load(work: Path, duration: int) -> dict | None:
    if shutil.which("wrk") is None:
        print("wrk is not installed: the load table is left out.", file=sys.stderr)
        return None
    out = work / "load.json"
    run([PYTHON, "benchmarks/load.py", "--duration", str(duration), "--out", str(out)],
        timeout=30 * 60)
    return json.loads(out.read_text()) if out.exists() else None


def run_tests(work: Path, pgdata: str) -> tuple[list[Case], dict, int]:
    junit, stats = work / "junit.xml", work / "stats.json"
    stats.unlink(missing_ok=True)
    env = {**os.environ, "KB_RELIABILITY_STATS": str(stats), "KB_PGDATA": pgdata}
    env.pop("DATABASE_URL", None)
    status = run([PYTHON, "-m", "pytest", *PYTEST_TARGETS, "-q",
                  f"--junitxml={junit}", "-o", "junit_family=xunit1"], env=env, timeout=60 * 60)
    cases = read_junit(junit) if junit.exists() else []
    figures = json.loads(stats.read_text()) if stats.exists() else {}
    return cases, figures, status


def read_junit(path: Path) -> list[Case]:
    cases = []
    for element in ET.parse(path).getroot().iter("testcase"):
        module = element.get("classname", "").replace(".", "/")
        node = f"{module}.py::{element.get('name')}"
        outcome, message = "passed", ""
        for child in element:
            if child.tag in {"failure", "error"}:
                outcome, message = ("failed" if child.tag == "failure" else "error"), child.get(
                    "message", "")
            elif child.tag == "skipped":
                kind = child.get("type", "")
                message = child.get("message", "")
                outcome = "xfailed" if "xfail" in kind else "skipped"
                message = message.removeprefix("xfail-marked test passes unexpectedly")
        cases.append(Case(node=node, outcome=outcome, seconds=float(element.get("time", 0)),
                          message=message))
    return cases


def select(cases: list[Case], *fragments: str) -> list[Case]:
    return [case for case in cases if all(fragment in case.node for fragment in fragments)]


def verdict(cases: list[Case]) -> str:
    if not cases:
        return "not run"
    counts = Counter(case.outcome for case in cases)
    if counts["failed"] or counts["error"]:
        return f"**FAILED** ({counts['failed'] + counts['error']} of {len(cases)})"
    if counts["passed"] == len(cases):
        return f"survived ({len(cases)}/{len(cases)} passed)"
    parts = [f"{counts['passed']} passed"]
    if counts["xfailed"]:
        parts.append(f"{counts['xfailed']} known gap")
    if counts["skipped"]:
        parts.append(f"{counts['skipped']} skipped")
    return ", ".join(parts)


def counts_text(counts: dict) -> str:
    """{"ready": 24, "failed": 1} as "24 ready, 1 failed"."""
    return ", ".join(f"{count} {name}" for name, count in counts.items()) or "none"


def pytest_command(*nodes: str) -> str:
    return "`KB_PGDATA=/tmp/kb-rel-pgdata .venv/bin/python -m pytest " + " ".join(nodes) + "`"


# --- Sections ------------------------------------------------------------------------------


def load_section(load: dict | None) -> list[str]:
    lines = ["## Load held", ""]
    if load is None:
        return [*lines, "Not measured in this run (wrk is not installed, or `--skip-load`).", ""]
    machine = load.get("machine", {})
    lines += [
        f"wrk ({' '.join(load.get('wrk', 'wrk').split()[:2])}) on loopback against "
        "`manage.py serve` (uvicorn, one "
        f"process) with the demo corpus, {machine.get('cpus', '?')} CPUs shared with the load "
        "generator and whatever else ran (1-minute load average "
        f"{machine.get('loadavg_before', '?')}"
        f" before, {machine.get('loadavg_after', '?')} after: figures from a busy machine are "
        "lower bounds). Every request carries a unique query (no cache helps); chat answers come "
        "from a fake OpenAI-compatible upstream (no model cost), so chat figures measure "
        "our pipeline: question embedding, hybrid retrieval, prompt, streaming, bookkeeping. "
        "Latency is to the last byte (for SSE, the whole answer).",
        "",
        "| run | endpoint | connections | requests | req/s | p50 ms | p95 ms | p99 ms | 5xx "
        "| error rate | 429 share | 429s with Retry-After |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    names = {"search": "POST /api/v1/search (hybrid)", "chat-json": "POST /api/v1/chat (JSON)",
             "chat-sse": "POST /api/v1/chat (SSE)"}
    for r in load["results"]:
        limits = r.get("limits", {})
        throttled = r["statuses"].get("429", r["statuses"].get(429, 0))
        run = r["run"] + (f" ({limits.get('search')})" if r["run"] != "steady" else "")
        lines.append(
            f"| {run} | {names.get(r['scenario'], r['scenario'])} | {r['connections']} | "
            f"{r['requests']} | {r['throughput_rps']} | {r['latency_ms']['p50']} | "
            f"{r['latency_ms']['p95']} | {r['latency_ms']['p99']} | {r['server_errors_5xx']} | "
            f"{r['error_rate']:.2%} | {r['throttled_share']:.1%} | "
            f"{r['throttled_with_retry_after']}/{throttled} |")
    lines += ["", f"Reproduce: `.venv/bin/python {load.get('command', 'benchmarks/load.py')}` "
              f"({load.get('total_seconds', '?')} s; needs `apt-get install wrk`).", ""]
    return lines


def faults_section(cases: list[Case], figures: dict) -> list[str]:
    fig = figures.get("figures", {})
    restart, reembed = fig.get("fault_postgres_restart", {}), fig.get("fault_reembed_kill", {})
    restart_cases = select(cases, "test_faults.py", "restart")
    restart_cases += select(cases, "test_faults.py",
                            "embedding_usage_is_never_double_counted")
    reembed_cases = select(cases, "test_faults.py", "reembedding")
    lines = [
        "## Faults survived",
        "",
        "After each fault: documents end `ready`, or `failed` and retryable; one chunk "
        "generation per document and chunk counts as recorded; exactly one vector per chunk "
        "per model; BM25 postings and statistics equal a recomputation from `kb_chunk`; no "
        "usage row counted twice, and every batch whose vectors were committed has its row "
        "(compared with the fake provider's own record of the calls it served).",
        "",
        "| fault | how it is produced | outcome | nothing lost | reproduce |",
        "|---|---|---|---|---|",
    ]
    if restart:
        recovery = restart.get("recovery", {})
        lost = restart.get("usage_lost", 0)
        lines.append(
            f"| PostgreSQL restarts during ingestion | `pg_ctl restart -m fast` "
            f"({restart.get('restart_seconds')} s) while `kb_ingest --sync` has an embedding "
            f"call in flight; {restart.get('documents')} documents, {restart.get('chunks')} "
            f"chunks | {verdict(restart_cases)}. "
            + ("The run rode out the restart (exit 0)"
               if restart.get("ingest_exit_code") == 0 else
               f"The run stopped (`{restart.get('ingest_error')}`)")
            + f", leaving {counts_text(restart.get('statuses_after_fault', {}))}; the stall sweep "
            f"failed {recovery.get('stalled')}, the retry made "
            f"{counts_text(recovery.get('final', {}))} | problems: "
            f"{restart.get('problems') or 'none'}; {restart.get('vectors_before_restart')} "
            f"vectors committed before the restart were reused; usage: "
            f"{restart.get('usage_double_counted')} double counted, "
            f"{restart.get('committed_without_row')} committed batches without a row, "
            f"**{lost} calls lost** (a ledger write that meets the cut connection reconnects) | "
            f"{pytest_command('tests/reliability/test_faults.py', '-k', 'restart')} |")
    if reembed:
        after_kill = "; ".join(
            f"{key} {state['status']}, "
            f"{state['vectors']} vectors"
            for key, state in reembed.get("after_kill", {}).get("models", {}).items())
        lines.append(
            f"| Re-embedding killed with SIGKILL | `kb_reembed --model fake-b --sync --activate`"
            f" killed after {reembed.get('b_calls_before_kill')} of its calls; "
            f"{reembed.get('chunks')} chunks | {verdict(reembed_cases)}. After the kill: "
            f"{after_kill}; activation refused (\"{reembed.get('activation_refused')}\")"
            f"; searches {'all worked' if reembed.get('searches_ok_after_kill') else 'FAILED'}; "
            f"the rerun activated fake-b atomically, searches "
            f"{'all worked' if reembed.get('searches_ok_after_rerun') else 'FAILED'} | problems: "
            f"{reembed.get('problems') or 'none'}; usage: {reembed.get('usage_double_counted')} "
            f"double counted, {reembed.get('usage_lost')} lost "
            f"({reembed.get('usage_in_flight_rows', 0)} "
            f"written ahead and left `interrupted` by the kill) | "
            f"{pytest_command('tests/reliability/test_faults.py', '-k', 'reembedding')} |")
    worker = select(cases, "test_worker_crash.py")
    lines.append(
        f"| Worker killed with kill -9 mid-document | a real `qcluster` worker and its children "
        f"get SIGKILL while embedding | {verdict(worker)} | retry finishes with one generation, "
        f"one vector per chunk, committed vectors reused | "
        f"{pytest_command('tests/kb/test_worker_crash.py')} |")
    mid_batch = select(cases, "test_ingest.py", "provider_failure") + select(
        cases, "test_reembedding.py", "failed_page")
    lines.append(
        f"| Embedding provider fails mid-batch | the provider raises after some batches "
        f"(ingestion and re-embedding) | {verdict(mid_batch)} | the document fails and keeps "
        f"its previous version; a rerun resumes | "
        f"{pytest_command('tests/kb/services/test_ingest.py', 'tests/kb/test_reembedding.py')} |")
    for fault in ("429 rate limited", "500 server error", "timeout before the first token",
                  "malformed JSON", "connection dropped", "stream cut mid-answer"):
        chosen = select(cases, "test_provider_fault_gives", f"[{fault}-")
        selection = repr(" and ".join(fault.split()))
        expected = ("partial answer kept as `interrupted`; SSE `error` event / JSON 502"
                    if fault == "stream cut mid-answer" else
                    "extractive answer with a notice (SSE `done` / JSON 200)")
        lines.append(
            f"| Chat provider: {fault} | FakeOpenAIServer fault, through uvicorn, SSE and JSON | "
            f"{verdict(chosen)}: {expected} | one chat usage row per upstream attempt, "
            f"message stored once | "
            f"{pytest_command('tests/reliability/test_faults.py', '-k', selection)} |")
    retried = select(cases, "test_retried_upstream_attempts")
    if retried:
        lines.append(
            f"| Chat provider retried inside the backend | 429, then success, with "
            f"`max_attempts=3` (the default) | {verdict(retried)} | two upstream attempts, two "
            f"usage rows: the refused one as an error, the answer as ok | "
            f"{pytest_command('tests/reliability/test_faults.py', '-k', 'retried')} |")
    return [*lines, ""]


def bad_inputs_section(cases: list[Case], figures: dict) -> list[str]:
    fuzz = figures.get("fuzz", {})
    api = figures.get("figures", {}).get("api_fuzz", {})
    lines = [
        "## Bad inputs tried",
        "",
        "| input | tried | outcome | reproduce |",
        "|---|---|---|---|",
    ]
    parser_cases = select(cases, "test_fuzz_parsers.py")
    for name, outcomes in sorted(fuzz.items()):
        if name.startswith("API "):
            continue
        total = sum(outcomes.values())
        detail = ", ".join(f"{count} {outcome}" for outcome, count in sorted(outcomes.items()))
        function, _, inputs = name.partition(": ")
        contract = ("only ParseError raised, no hang; extracted names safe, sizes within limits"
                    if function == "extract_archive" else
                    "only ParseError raised, no hang; blocks and chunks exact slices")
        lines.append(f"| hypothesis: `{function}` with {inputs} | {total} examples | {detail}; "
                     f"{contract} | {pytest_command('tests/reliability/test_fuzz_parsers.py')} |")
    if not fuzz:
        lines.append(f"| parser fuzzing | not run | {verdict(parser_cases)} | "
                     f"{pytest_command('tests/reliability/test_fuzz_parsers.py')} |")
    api_cases = select(cases, "test_fuzz_api.py", "every_operation")
    if api:
        statuses: Counter[str] = Counter()
        for per_operation in api.get("statuses", {}).values():
            statuses.update(per_operation)
        known = sum(count for name, outcomes in fuzz.items() if name.startswith("API ")
                    for outcome, count in outcomes.items() if outcome.startswith("known bug"))
        lines.append(
            f"| schemathesis on /api/schema/ (positive and negative cases, API key of an "
            f"ordinary user, real HTTP) | {api.get('operations')} operations, "
            f"{api.get('requests')} requests | {verdict(api_cases)}; statuses "
            f"{dict(sorted(statuses.items()))}; 5xx outside the known bugs: "
            f"{sum(api.get('failures', {}).values())}; 5xx from known bugs: {known} | "
            f"{pytest_command('tests/reliability/test_fuzz_api.py')} |")
    hostile = select(cases, "test_ingest.py", "bad_files") + select(
        cases, "test_ingest.py", "zip_with_one_bad_member") + select(
        cases, "test_ingest.py", "over_the_size_limit")
    lines.append(f"| hostile files through the real upload service (empty, truncated PDF, "
                 f"binary as .txt, HTML as .pdf, executable, oversized, zip with a corrupt member "
                 f"and a traversal entry) | {len(hostile)} files | {verdict(hostile)} | "
                 f"{pytest_command('tests/kb/services/test_ingest.py')} |")
    archives = select(cases, "test_archives.py")
    lines.append(f"| hand-made hostile zips (traversal, absolute paths, symlinks, bombs, lying "
                 f"sizes, encryption, too many entries) | {len(archives)} cases | "
                 f"{verdict(archives)} | "
                 f"{pytest_command('tests/kb/ingestion/test_archives.py')} |")
    parsing = [case for case in cases if any(case.node.startswith(target)
                                             for target in PARSER_TESTS)]
    lines.append(f"| parser edge cases (encodings, lying extensions, damaged formats) | "
                 f"{len(parsing)} cases | {verdict(parsing)} | "
                 f"{pytest_command(*PARSER_TESTS)} |")
    privacy = select(cases, "test_log_privacy.py")
    lines.append(f"| secrets and content in logs (known SECRET_KEY, provider key echoed by the "
                 f"upstream, proxy password in a URL, API key, question, search query) | "
                 f"{len(privacy)} cases | {verdict(privacy)} | "
                 f"{pytest_command('tests/reliability/test_log_privacy.py')} |")
    return [*lines, ""]


def access_section(cases: list[Case]) -> list[str]:
    kb_cases = select(cases, "tests/kb/test_access_control.py")
    chat_cases = select(cases, "tests/chat/test_access_control.py")
    return [
        "## Access control",
        "",
        "| matrix | cases | outcome | reproduce |",
        "|---|---|---|---|",
        f"| user × collection × path: search API, documents, chunks, source view, admin | "
        f"{len(kb_cases)} | {verdict(kb_cases)} | "
        f"{pytest_command('tests/kb/test_access_control.py')} |",
        f"| chat, citations, OpenAI-compatible API, exact and semantic caches | "
        f"{len(chat_cases)} | {verdict(chat_cases)} | "
        f"{pytest_command('tests/chat/test_access_control.py')} |",
        "",
    ]


def findings_section(cases: list[Case]) -> list[str]:
    known = [case for case in cases if case.outcome == "xfailed"]
    failed = [case for case in cases if case.outcome in {"failed", "error"}]
    lines = ["## Open findings", ""]
    if not known and not failed:
        return [*lines, "None: every check passed.", ""]
    lines += ["Each known gap is pinned by a test marked `xfail(strict=True)`: it fails the "
              "suite the day the gap is closed, so the marker and this line go together.", "",
              "| test | status | why |", "|---|---|---|"]
    for case in failed + known:
        reason = " ".join(case.message.split())[:300].replace("|", "\\|")
        lines.append(f"| `{case.node}` | {case.outcome} | {reason} |")
    return [*lines, ""]


def logs_section() -> list[str]:
    return [
        "## Logs",
        "",
        "Questions, prompts and answers are logged as fingerprints (`sha256:` and the first 12 "
        "hex digits, `kb.ops.log_privacy.text_fingerprint`), never as text, unless "
        "`KB_LOG_CONTENT` is on: by default only with `LOG_LEVEL=DEBUG` (debug logging, on a "
        "developer's machine), or when set explicitly. Credentials never appear at any level: "
        "`kb.ops.log_privacy.RedactingFilter` on the console handler redacts bearer tokens, "
        "`kb_…` API keys, `sk-…` provider keys, passwords in URLs and the literal values of "
        "SECRET_KEY, OPENAI_API_KEY, the database and Redis passwords and every provider "
        "`api_key`, in messages, extras and tracebacks, and reduces a request object to "
        "`METHOD /path` (its repr carries the query string).",
        "",
    ]


def render(load: dict | None, cases: list[Case], figures: dict, *, commit: str) -> str:
    counts = Counter(case.outcome for case in cases)
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Reliability",
        "",
        "Generated by `benchmarks/reliability_report.py` from real runs: do not edit by hand; "
        "run `.venv/bin/python benchmarks/reliability_report.py` to regenerate it.",
        "",
        f"Last run: {now}, commit `{commit}`. Tests: " + ", ".join(
            f"{count} {outcome}" for outcome, count in sorted(counts.items())) + ".",
        "",
    ]
    lines += load_section(load)
    lines += faults_section(cases, figures)
    lines += bad_inputs_section(cases, figures)
    lines += access_section(cases)
    lines += logs_section()
    lines += findings_section(cases)
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/kb-reliability"))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "RELIABILITY.md")
    parser.add_argument("--pgdata", default="/tmp/kb-report-pgdata",
                        help="embedded database for the test run (KB_PGDATA)")
    parser.add_argument("--skip-load", action="store_true")
    parser.add_argument("--load-results", type=Path,
                        help="read load.py's JSON instead of running it")
    parser.add_argument("--load-duration", type=int, default=20)
    parser.add_argument("--tests-from", type=Path,
                        help="a work dir with junit.xml and stats.json from an earlier run")
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)

    if args.tests_from:
        cases = read_junit(args.tests_from / "junit.xml")
        figures = json.loads((args.tests_from / "stats.json").read_text())
        status = 0 if all(case.outcome not in {"failed", "error"} for case in cases) else 1
    else:
        cases, figures, status = run_tests(args.work_dir, args.pgdata)
    if args.load_results:
        load = json.loads(args.load_results.read_text())
    elif args.skip_load:
        load = None
    else:
        load = run_load(args.work_dir, args.load_duration)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    args.out.write_text(render(load, cases, figures, commit=commit))
    print(f"wrote {args.out}")
    load_failed = load is not None and any(r["server_errors_5xx"] for r in load["results"])
    return 1 if status not in (0,) or load_failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
