"""`manage.py serve`: database, migrations, workers and the ASGI server in one command."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connection

from kb.ops import bootstrap
from kb.ops.database import DatabaseSetupError
from kb.ops.web_process import query_embedding_warm_up_start, web_process_prepare

# How long a stop waits for a model that is still loading (seconds); it takes a few.
WARM_UP_STOP_WAIT_SECONDS = 60


class Command(BaseCommand):
    help = "Start PostgreSQL (embedded unless DATABASE_URL is set), migrate, start workers, serve."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default=settings.KB_HOST)
        parser.add_argument("--port", type=int, default=settings.KB_PORT)
        parser.add_argument("--no-workers", action="store_true", help="Do not start qcluster.")
        parser.add_argument("--no-demo", action="store_true", help="Do not load the demo corpus.")

    def handle(self, *args: str, host: str, port: int, no_workers: bool, no_demo: bool,
               **options: object) -> None:
        # SIGTERM (systemd, docker stop, kill) stops us as Ctrl-C does: through the finally
        # blocks and atexit, so the workers and the embedded database stop with us.
        signal.signal(signal.SIGTERM, _interrupt)
        signal.signal(signal.SIGHUP, _interrupt)  # the terminal that ran us was closed
        with contextlib.suppress(KeyboardInterrupt):
            self._serve(host=host, port=port, no_workers=no_workers, no_demo=no_demo)
        self.stdout.write("Stopped.")

    def _serve(self, *, host: str, port: int, no_workers: bool, no_demo: bool) -> None:
        port_problem = _port_problem(host, port)
        if port_problem:
            raise CommandError(port_problem)
        try:
            bootstrap.database_prepare()
        except DatabaseSetupError as exc:
            raise CommandError(str(exc)) from None
        call_command("migrate", interactive=False, verbosity=0)
        bootstrap.schedules_ensure()
        self._first_run(demo=not no_demo)
        connection.close()  # the worker and server processes open their own

        workers = None
        if not no_workers:
            # A session of its own keeps signals meant for `serve` (Ctrl-C in a terminal, or
            # systemd's SIGTERM to the whole control group) from also reaching the cluster's
            # processes directly: django-q's master whose sentinel and workers were killed
            # under it hangs and ignores a second SIGTERM. `serve` alone stops the cluster,
            # in order, and kills its whole group if that does not finish.
            env = {**os.environ, "PYTHONUNBUFFERED": "1",
                   "KB_STOP_WITH_PARENT_PID": str(os.getpid())}
            # manage.py made this process a web process; the cluster is not one: it forks
            # its workers, which must not share a connection pool's sockets.
            env.pop("KB_PROCESS_ROLE", None)
            workers = subprocess.Popen(
                [sys.executable, str(Path(settings.BASE_DIR) / "manage.py"), "qcluster"],
                env=env, start_new_session=True,
            )
        warm_up: threading.Thread | None = None
        try:
            self._print_urls(host, port)
            web_process_prepare()
            warm_up = query_embedding_warm_up_start()
            _run_uvicorn(host, port)
        finally:
            try:
                if workers is not None:
                    _stop(workers)
            finally:
                _stop_signals_ignore()
                # A stop right after the start finds the model still loading: the process
                # could not exit before it anyway (the load runs on the inference thread,
                # which exit waits for), so wait here, and "Stopped." is the last word.
                if warm_up is not None:
                    warm_up.join(timeout=WARM_UP_STOP_WAIT_SECONDS)

    def _first_run(self, *, demo: bool) -> None:
        user_model = get_user_model()
        if not user_model.objects.filter(is_superuser=True).exists():
            chosen = settings.KB_ADMIN_PASSWORD
            password = chosen or secrets.token_urlsafe(12)
            user_model.objects.create_superuser("admin", "admin@localhost", password)
            if chosen:  # the operator knows it: printing it would only put it in logs
                shown = "the value of KB_ADMIN_PASSWORD"
            else:
                shown = f"{password}\n  (shown once; change it in the admin)"
            self.stdout.write(self.style.SUCCESS(
                f"Created the admin user. Username: admin  Password: {shown}"
            ))
        loaded = bootstrap.demo_corpus_load() if demo else 0
        if loaded:
            self.stdout.write(f"Queued {loaded} demo documents from fixtures/demo for ingestion.")

    def _print_urls(self, host: str, port: int) -> None:
        shown_host = "127.0.0.1" if host in {"0.0.0.0", "::"} else host
        base = f"http://{shown_host}:{port}"
        self.stdout.write(self.style.SUCCESS(f"Knowledge base running at {base}/"))
        self.stdout.write(f"  Admin:    {base}/admin/")
        self.stdout.write(f"  Chat:     {base}/chat/")
        self.stdout.write(f"  API docs: {base}/api/docs/")
        self.stdout.write("  Press Ctrl-C to stop.")


def _port_problem(host: str, port: int) -> str | None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return (
                f"Cannot listen on {host}:{port} ({exc.strerror}). Another program is using it: "
                f"stop it, or pick another port with --port or KB_PORT."
            )
    return None


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _stop_signals_ignore() -> None:
    """What is left of stopping is short and bounded: reaping the killed cluster (a master
    left unreaped is a zombie that still counts as holding the embedded database) and, at
    exit, stopping that database. A further signal must not cut it short; pg_ctl, which
    inherits this, must not die of the group's SIGTERM either."""
    for stop_signal in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(stop_signal, signal.SIG_IGN)


def _run_uvicorn(host: str, port: int) -> None:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, also stopped by SIGHUP, without re-raising the signal that stopped it.

        uvicorn re-sends SIGINT or SIGTERM to itself after a graceful shutdown; SIGTERM's
        default action would kill this process before it stops the workers and the
        embedded database, and SIGINT's prints a KeyboardInterrupt traceback."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(
        "kb.asgi:application",
        host=host,
        port=port,
        lifespan="off",
        log_level=settings.KB_UVICORN_LOG_LEVEL,
        timeout_graceful_shutdown=5,
    )
    Server(config).run()


def _stop(process: subprocess.Popen) -> None:
    """Stop the worker cluster gracefully, then kill whatever is left of its process group."""
    try:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=15)
    finally:
        # Also when a second Ctrl-C or SIGTERM interrupts the wait: the cluster is killed, not
        # abandoned. It is its own process group (see _serve), so a worker or a PDF reader
        # child that outlived its master goes too.
        _stop_signals_ignore()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
