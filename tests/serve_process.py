"""`manage.py serve` as a user runs it: a subprocess in a session of its own, and its process
tree."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def serve_env(*, data_dir: Path, extra_env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a product process using the embedded database in data_dir."""
    env = {**os.environ, "KB_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": str(ROOT), **(extra_env or {})}
    for inherited in ("DATABASE_URL", "KB_PGDATA", "DJANGO_SETTINGS_MODULE", "REDIS_URL",
                      "KB_TASKS_SYNC"):
        env.pop(inherited, None)
    return env


def serve_start(*, data_dir: Path, port: int, log_path: Path,
                extra_env: dict[str, str] | None = None,
                args: tuple[str, ...] = ("--no-demo",)) -> subprocess.Popen:
    """Start `manage.py serve` on a fresh embedded database in data_dir, as its own process
    group."""
    env = serve_env(data_dir=data_dir, extra_env=extra_env)
    with open(log_path, "ab") as log:
        # A session of its own, as under systemd: the test can signal the whole group.
        return subprocess.Popen(
            [sys.executable, str(ROOT / "manage.py"), "serve", "--port", str(port), *args],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )


def http_status(url: str, timeout: float = 2.0) -> int:
    """The HTTP status of a GET, or 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0


def serve_wait_ready(process: subprocess.Popen, base: str, *, log_path: Path,
                     timeout: float = 180) -> None:
    """Wait until /healthz answers and the worker cluster has started its workers."""
    deadline = time.monotonic() + timeout
    while http_status(f"{base}/healthz") != 200:
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"serve did not start:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.3)
    # django-q's master forks its sentinel, workers, pusher and monitor after a moment.
    while len(cluster_processes(process.pid)) < 3:
        if time.monotonic() > deadline:
            raise AssertionError(f"the workers did not start:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.3)


def cluster_processes(serve_pid: int) -> list[psutil.Process]:
    """The qcluster master and every process under it."""
    try:
        children = psutil.Process(serve_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [child for child in children if _cmdline(child).count("qcluster")]


def process_tree(pid: int) -> list[psutil.Process]:
    """The process and all its descendants."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def postgres_processes(data_dir: Path) -> list[psutil.Process]:
    """Postgres processes serving the database in data_dir (pg_ctl detaches them from serve)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any(str(data_dir) in part for part in process.info["cmdline"] or ()):
            found.append(process)
    return found


def still_running(processes: list[psutil.Process]) -> list[str]:
    """Descriptions of the processes that still run (a zombie has ended and is not counted)."""
    left = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{process.pid} {process.status()} {_cmdline(process)[:120]}")
        except psutil.NoSuchProcess:
            pass
    return left


def _cmdline(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""
