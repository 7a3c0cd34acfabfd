"""Management commands: kb_ingest's summary and exit status, and `serve` as a user runs it."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from http.cookiejar import CookieJar
from pathlib import Path

import psutil
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from kb.models import Document
from kb.selectors import SYSTEM

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "fixtures" / "samples"


@pytest.mark.django_db
def test_kb_ingest_sync_ingests_a_directory_and_summarises(capsys):
    """Files from a directory are ingested in this process and summarised."""
    call_command("kb_ingest", str(SAMPLES), "--collection", "cli", "--sync")

    out = capsys.readouterr().out
    assert "5 files: 5 new" in out and "0 failed" in out
    assert Document.objects.filter(collection__slug="cli", status="ready").count() == 5


@pytest.mark.django_db
def test_kb_ingest_names_each_failure_and_exits_non_zero(tmp_path, capsys):
    """A bad file makes the command fail, naming the file and its reason; good files still land."""
    (tmp_path / "good.md").write_text("# Title\n\nSome real text about tides and harbours.\n")
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(CommandError) as error:
        call_command("kb_ingest", str(tmp_path / "*"), "--sync")

    assert error.value.returncode == 1
    assert "FAILED empty.txt: The file is empty." in capsys.readouterr().err
    assert Document.objects.filter(original_filename="good.md", status="ready").exists()


@pytest.mark.django_db
def test_kb_ingest_names_documents_by_their_path_under_the_folder(tmp_path, capsys):
    """teamA/README.md and teamB/README.md are two documents, both searchable."""
    from search.services import SearchParams, search

    for team, text in [("teamA", "Team A deploys on Tuesdays."), ("teamB", "Team B owns billing.")]:
        (tmp_path / team).mkdir()
        (tmp_path / team / "README.md").write_text(f"# {team}\n\n{text}\n")
    call_command("kb_ingest", str(tmp_path), "--collection", "teams", "--sync")

    assert "2 files: 2 new, 0 updated" in capsys.readouterr().out
    assert set(Document.objects.values_list("original_filename", flat=True)) == {
        "teamA/README.md", "teamB/README.md"}
    for query in ["deploys Tuesdays", "owns billing"]:
        hits = search(params=SearchParams(query=query, mode="bm25", k=1), user=SYSTEM,
                      record_usage=False).hits
        assert hits and hits[0].document_title in {"teamA", "teamB"}


@pytest.mark.django_db
def test_kb_ingest_never_hides_two_files_becoming_one(tmp_path, capsys):
    """Two folders whose files would get the same name: the second is a named failure."""
    for root in ["one", "two"]:
        (tmp_path / root).mkdir()
        (tmp_path / root / "README.md").write_text(f"# {root}\n\nText of {root}.\n")
    with pytest.raises(CommandError):
        call_command("kb_ingest", str(tmp_path / "one"), str(tmp_path / "two"), "--sync")

    captured = capsys.readouterr()
    assert "1 new, 0 updated" in captured.out and "1 failed" in captured.out
    assert "same name, 'README.md'" in captured.err and "two" in captured.err
    assert Document.objects.count() == 1


@pytest.mark.django_db
def test_kb_ingest_as_a_user_who_may_only_add_cannot_replace(tmp_path, capsys, django_user_model):
    """--user applies the user's permissions: an existing document is not replaced by an adder."""
    from django.contrib.auth.models import Permission

    adder = django_user_model.objects.create_user("adder", password="pw-adder-1234")
    adder.user_permissions.add(Permission.objects.get(codename="add_document"))
    (tmp_path / "guide.md").write_text("# Guide\n\nOriginal text.\n")
    call_command("kb_ingest", str(tmp_path), "--collection", "docs", "--sync")
    (tmp_path / "guide.md").write_text("# Guide\n\nReplaced text.\n")
    with pytest.raises(CommandError):
        call_command("kb_ingest", str(tmp_path), "--collection", "docs", "--sync",
                     "--user", "adder")

    assert "Can change document" in capsys.readouterr().err
    assert "Original text" in Document.objects.get().extracted_text


def _get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except (urllib.error.URLError, ConnectionError):
        return 0, b""


@pytest.mark.slow
def test_serve_starts_everything_and_stops_cleanly(tmp_path):
    """`serve` on a fresh data dir: admin password printed, demo ingested, clean Ctrl-C."""
    port = 18000 + os.getpid() % 1000
    env = {**os.environ, "KB_DATA_DIR": str(tmp_path / "data"), "KB_ADMIN_PASSWORD": "",
           "KB_WORKERS": "1", "PYTHONUNBUFFERED": "1"}
    for inherited in ("DATABASE_URL", "KB_PGDATA"):  # a fresh embedded server in tmp_path
        env.pop(inherited, None)
    env.pop("DJANGO_SETTINGS_MODULE", None)
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "manage.py"), "serve", "--port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    output = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            output.append(line)
            if "Press Ctrl-C" in line or process.poll() is not None:
                break
        text = "".join(output)
        assert "Password:" in text, text
        password = text.split("Password:")[1].split()[0]
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while _get(f"{base}/healthz")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _get(f"{base}/readyz")[0] == 200

        # Log in to the admin with the printed credentials, as a new user would.
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
        login_page = opener.open(f"{base}/admin/login/").read().decode()
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', login_page).group(1)
        form = urllib.parse.urlencode({"username": "admin", "password": password,
                                       "csrfmiddlewaretoken": token, "next": "/admin/"})
        opener.open(urllib.request.Request(f"{base}/admin/login/", data=form.encode(),
                                           headers={"Referer": f"{base}/admin/login/"}))
        # The workers ingest the demo corpus in the background.
        demo_files = len(list((ROOT / "fixtures" / "demo").iterdir()))
        deadline = time.monotonic() + 240
        page = ""
        while time.monotonic() < deadline:
            page = opener.open(f"{base}/admin/kb/document/?status__exact=ready").read().decode()
            if f"{demo_files} documents" in page:
                break
            time.sleep(2)
        assert f"{demo_files} documents" in page
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    pgdata = str(tmp_path / "data" / "pgdata")
    time.sleep(1)
    leftovers = [p for p in psutil.process_iter(["cmdline"])
                 if p.info["cmdline"] and any(pgdata in part for part in p.info["cmdline"])]
    assert not leftovers, leftovers
    assert not [p for p in psutil.process_iter(["cmdline"])
                if p.info["cmdline"] and "qcluster" in p.info["cmdline"]
                and str(ROOT) in " ".join(p.info["cmdline"]) and p.ppid() == process.pid]


@pytest.mark.slow
def test_serve_stops_cleanly_on_sigterm(tmp_path):
    """`kill`, `docker stop` and systemd send SIGTERM: no traceback, nothing left running."""
    port = 19000 + os.getpid() % 1000
    env = {**os.environ, "KB_DATA_DIR": str(tmp_path / "data"),
           "KB_ADMIN_PASSWORD": "pw-sigterm-123", "PYTHONUNBUFFERED": "1"}
    for inherited in ("DATABASE_URL", "KB_PGDATA"):  # a fresh embedded server in tmp_path
        env.pop(inherited, None)
    env.pop("DJANGO_SETTINGS_MODULE", None)
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "manage.py"), "serve", "--port", str(port), "--no-demo"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while _get(f"http://127.0.0.1:{port}/healthz")[0] != 200:
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        workers = [child for child in psutil.Process(process.pid).children()
                   if "qcluster" in " ".join(child.cmdline())]
        assert workers
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert output.rstrip().endswith("Stopped."), output
    assert "Traceback" not in output
    assert not any(worker.is_running() for worker in workers)
    pgdata = str(tmp_path / "data" / "pgdata")
    time.sleep(1)
    assert not [p for p in psutil.process_iter(["cmdline"])
                if p.info["cmdline"] and any(pgdata in part for part in p.info["cmdline"])]


@pytest.fixture(scope="module")
def serve_data_dir(tmp_path_factory):
    """One data directory for the stop tests: the embedded database is created once."""
    return tmp_path_factory.mktemp("serve-stop") / "data"


def _signal_group_twice(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    time.sleep(1)  # serve is now stopping its workers; a second signal must not abandon them
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)


STOPS = {
    "SIGTERM to serve only (kill PID)": lambda process: process.send_signal(signal.SIGTERM),
    "SIGTERM to the process group (systemd KillMode=control-group)":
        lambda process: os.killpg(process.pid, signal.SIGTERM),
    "SIGINT to the process group (Ctrl-C in a terminal)":
        lambda process: os.killpg(process.pid, signal.SIGINT),
    "SIGTERM to the group, then again while stopping": _signal_group_twice,
    "SIGHUP to the group (the terminal was closed)":
        lambda process: os.killpg(process.pid, signal.SIGHUP),
}


@pytest.mark.slow
@pytest.mark.parametrize("stop", list(STOPS))
def test_serve_leaves_no_process_after_any_stop_signal(stop, serve_data_dir, tmp_path):
    """After any stop signal `serve` says "Stopped." within seconds and no process of its tree,
    nor its embedded Postgres, is left running."""
    from tests.live_server import free_port
    from tests.serve_process import (
        cluster_processes,
        postgres_processes,
        process_tree,
        serve_start,
        serve_wait_ready,
        still_running,
    )

    port = free_port()
    log_path = tmp_path / "serve.log"
    process = serve_start(data_dir=serve_data_dir, port=port, log_path=log_path,
                          extra_env={"KB_ADMIN_PASSWORD": "pw-stop-test-123", "KB_WORKERS": "1"})
    try:
        serve_wait_ready(process, f"http://127.0.0.1:{port}", log_path=log_path)
        tree = process_tree(process.pid)
        assert cluster_processes(process.pid)
        started = time.monotonic()
        STOPS[stop](process)
        process.wait(timeout=60)
        stopped_in = time.monotonic() - started
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    output = log_path.read_text()
    assert process.returncode == 0, output
    assert output.rstrip().endswith("Stopped."), output
    assert "Traceback" not in output
    assert stopped_in < 12, f"stopping took {stopped_in:.1f} s"
    # A postmaster that was told to stop can take a moment to exit on a loaded machine:
    # what must not happen is a process that stays.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (
        still_running(tree) or still_running(postgres_processes(serve_data_dir))
    ):
        time.sleep(0.25)
    assert still_running(tree) == []
    assert still_running(postgres_processes(serve_data_dir)) == [], (
        _embedded_server_state(serve_data_dir))


def _embedded_server_state(data_dir) -> str:
    """What a stop test shows when the embedded server outlived serve: who held it, and its
    log."""
    pgdata = data_dir / "pgdata"
    handle_pids = pgdata / ".handle_pids.json"
    holders = handle_pids.read_text() if handle_pids.exists() else "none"
    log = (pgdata / "log").read_text()[-2000:] if (pgdata / "log").exists() else ""
    return f"holders: {holders}\nserver log:\n{log}"


@pytest.mark.slow
def test_workers_stop_when_serve_is_killed_outright(serve_data_dir, tmp_path):
    """`serve` killed with SIGKILL cannot stop anything itself: its worker cluster, in a
    session of its own, still stops (the kernel's parent-death signal) instead of lingering."""
    from tests.live_server import free_port
    from tests.serve_process import (
        cluster_processes,
        postgres_processes,
        serve_start,
        serve_wait_ready,
        still_running,
    )

    port = free_port()
    log_path = tmp_path / "serve.log"
    cluster = []
    process = serve_start(data_dir=serve_data_dir, port=port, log_path=log_path,
                          extra_env={"KB_ADMIN_PASSWORD": "pw-stop-test-123", "KB_WORKERS": "1"})
    try:
        serve_wait_ready(process, f"http://127.0.0.1:{port}", log_path=log_path)
        cluster = cluster_processes(process.pid)
        process.kill()
        process.wait()
        deadline = time.monotonic() + 30
        while still_running(cluster) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert still_running(cluster) == []
    finally:
        for leftover in cluster:
            if still_running([leftover]):
                leftover.kill()
        # Nobody released the embedded Postgres: stop its postmaster, as an operator would.
        postmasters = [p for p in postgres_processes(serve_data_dir) if "-D" in p.cmdline()]
        for postmaster in postmasters:
            postmaster.terminate()
        psutil.wait_procs(postmasters, timeout=30)


@pytest.mark.django_db
def test_serve_names_the_admin_password_source_when_it_was_chosen(settings):
    """With KB_ADMIN_PASSWORD set, the first run says the password is that variable's value,
    and neither prints it nor claims to show it once."""
    from io import StringIO

    from django.contrib.auth import get_user_model

    from kb.management.commands.serve import Command

    settings.KB_ADMIN_PASSWORD = "pw-chosen-123"
    out = StringIO()
    Command(stdout=out, no_color=True)._first_run(demo=False)

    text = out.getvalue()
    assert "Username: admin  Password: the value of KB_ADMIN_PASSWORD" in text
    assert "shown once" not in text and "pw-chosen-123" not in text
    assert get_user_model().objects.get(username="admin").check_password("pw-chosen-123")


@pytest.mark.django_db
def test_serve_shows_a_generated_admin_password_once(settings):
    """Without KB_ADMIN_PASSWORD, the generated password is printed, with the advice to change
    it."""
    from io import StringIO

    from django.contrib.auth import get_user_model

    from kb.management.commands.serve import Command

    settings.KB_ADMIN_PASSWORD = ""
    out = StringIO()
    Command(stdout=out, no_color=True)._first_run(demo=False)

    text = out.getvalue()
    password = text.split("Password:")[1].split()[0]
    assert "(shown once; change it in the admin)" in text
    assert get_user_model().objects.get(username="admin").check_password(password)
