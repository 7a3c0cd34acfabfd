"""The Redis code paths against a real redis-server: the cache behind rate limits, and the
django-q2 Redis broker with a real qcluster worker.

The server is the Debian package's `redis-server`, started on a free loopback port with
persistence off and stopped after the module. CI installs it (.ci/run); without it these
tests are skipped with the reason.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.core.cache import cache
from django.db import connection

ROOT = Path(__file__).resolve().parents[2]
REDIS_SERVER = shutil.which("redis-server")

pytestmark = pytest.mark.skipif(
    REDIS_SERVER is None, reason="redis-server is not installed (Debian package redis-server)"
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """A throwaway redis-server on a free loopback port; its URL."""
    import redis

    port = _free_port()
    workdir = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"redis-server did not start on port {port}")
            time.sleep(0.05)
    try:
        yield url
    finally:
        client.close()
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def redis_client(redis_url):
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def redis_cache(settings, redis_url, redis_client):
    """Django's cache (and so django-ratelimit) on the Redis server, as REDIS_URL sets it."""
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                                   "LOCATION": redis_url}}
    yield cache
    cache.close()


def test_settings_use_redis_for_cache_and_task_broker_when_redis_url_is_set(redis_url):
    """REDIS_URL moves the cache and the django-q2 queue to Redis; KB_TASK_BROKER=orm keeps the
    queue."""
    code = ("from django.conf import settings as s; import json; "
            "print(json.dumps([s.CACHES['default']['BACKEND'], s.Q_CLUSTER.get('redis'), "
            "s.Q_CLUSTER.get('orm')]))")
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "kb.settings", "REDIS_URL": redis_url}
    with_redis = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout
    orm_queue = subprocess.run([sys.executable, "-c", code], env={**env, "KB_TASK_BROKER": "orm"},
                               cwd=ROOT, capture_output=True, text=True, check=True).stdout

    assert with_redis.strip() == (
        f'["django.core.cache.backends.redis.RedisCache", "{redis_url}", null]'
    )
    assert orm_queue.strip() == '["django.core.cache.backends.redis.RedisCache", null, "default"]'


@pytest.mark.django_db
def test_rate_limits_count_in_redis(client, django_user_model, settings, redis_cache, redis_client):
    """The search API's limit is counted in Redis, shared by every web process, and answers 429."""
    settings.RATELIMIT_ENABLE = True
    settings.KB_RATELIMITS = {**settings.KB_RATELIMITS, "search": "3/m"}
    client.force_login(django_user_model.objects.create_user("alice", password="pw"))

    statuses = [client.get("/api/v1/search", {"query": "tides", "mode": "bm25"}).status_code
                for _ in range(4)]
    limited = client.get("/api/v1/search", {"query": "tides", "mode": "bm25"})

    assert statuses == [200, 200, 200, 429]
    assert int(limited["Retry-After"]) >= 1
    # django-ratelimit's counter (prefix rl:) is in Redis: every request, the refused ones too.
    (counter,) = [key for key in redis_client.keys("*") if b"rl:" in key]
    assert int(redis_client.get(counter)) == 5


def test_cache_round_trip(redis_cache, redis_client):
    """Values written through Django's cache are in the Redis server."""
    redis_cache.set("kb:test", {"a": 1}, timeout=60)
    assert redis_cache.get("kb:test") == {"a": 1}
    assert any(b"kb:test" in key for key in redis_client.keys("*"))


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_redis_broker_runs_a_task_in_a_real_cluster(redis_url, redis_client, monkeypatch, tmp_path,
                                                    settings):
    """A task queued on Redis is run by a separate qcluster process, with the request id it was
    queued under; the queue depth metric reads the Redis list."""
    from django_q.conf import Conf

    from kb import queue
    from kb.models import UsageRecord
    from kb.ops.metrics import queue_depth
    from kb.ops.observability import request_id_reset, request_id_set

    # This process queues through Redis as a REDIS_URL deployment's web process would.
    monkeypatch.setattr(Conf, "ORM", None)
    monkeypatch.setattr(Conf, "REDIS", redis_url)
    monkeypatch.setattr(Conf, "SYNC", False)
    settings.KB_TASKS_SYNC = False
    token = request_id_set("req-redis-1")
    try:
        queue.enqueue("tests.ops.urls.task_record_usage")
    finally:
        request_id_reset(token)
    assert queue_depth() == 1

    params = connection.get_connection_params()
    database_url = (f"postgresql://{params.get('user') or 'postgres'}@/"
                    f"{connection.settings_dict['NAME']}?host={params['host']}")
    env = {**os.environ, "DATABASE_URL": database_url, "REDIS_URL": redis_url, "KB_WORKERS": "1",
           "KB_MEDIA_ROOT": str(tmp_path / "media"), "PYTHONUNBUFFERED": "1"}
    env.pop("KB_TASK_BROKER", None)
    log = (tmp_path / "qcluster.log").open("wb")
    worker = subprocess.Popen([sys.executable, str(ROOT / "manage.py"), "qcluster"], cwd=ROOT,
                              env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not UsageRecord.objects.filter(request_id="req-redis-1").exists():
            if worker.poll() is not None or time.monotonic() > deadline:
                pytest.fail("the worker did not run the task:\n"
                            + (tmp_path / "qcluster.log").read_text(errors="replace")[-3000:])
            time.sleep(0.2)
    finally:
        os.killpg(worker.pid, 15)
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, 9)
            worker.wait()
        log.close()

    record = UsageRecord.objects.get(request_id="req-redis-1")
    assert (record.provider, record.model, record.input_tokens) == ("test", "echo", 3)
    assert queue_depth() == 0


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_redis_broker_worker_reads_pdfs_and_keeps_the_parse_deadline(redis_url, monkeypatch,
                                                                     tmp_path, settings):
    """A qcluster worker on the Redis broker (a daemonic process) ingests a PDF, and kills the
    reader of a pathological one at KB_PARSE_TIMEOUT_SECONDS instead of hanging."""
    from django_q.conf import Conf

    from kb.embeddings import embedding_model_active_or_bootstrap
    from kb.models import Document
    from kb.services.collections import collection_get_or_create
    from kb.services.uploads import documents_upload
    from tests.pdfs import pathological_pdf

    monkeypatch.setattr(Conf, "ORM", None)
    monkeypatch.setattr(Conf, "REDIS", redis_url)
    monkeypatch.setattr(Conf, "SYNC", False)
    settings.KB_TASKS_SYNC = False
    settings.MEDIA_ROOT = tmp_path / "media"
    embedding_model_active_or_bootstrap()
    collection = collection_get_or_create(slug="pdfs", name="PDFs")
    manual = documents_upload(
        collection=collection, filename="manual.pdf",
        data=(ROOT / "fixtures" / "samples" / "manual.pdf").read_bytes())[0].document
    slow = documents_upload(collection=collection, filename="slow.pdf",
                                     data=pathological_pdf(600_000))[0].document

    params = connection.get_connection_params()
    database_url = (f"postgresql://{params.get('user') or 'postgres'}@/"
                    f"{connection.settings_dict['NAME']}?host={params['host']}")
    env = {**os.environ, "DATABASE_URL": database_url, "REDIS_URL": redis_url, "KB_WORKERS": "1",
           "KB_MEDIA_ROOT": str(tmp_path / "media"), "KB_PARSE_TIMEOUT_SECONDS": "3",
           "PYTHONUNBUFFERED": "1"}
    env.pop("KB_TASK_BROKER", None)
    log_path = tmp_path / "qcluster.log"
    with log_path.open("wb") as log:
        worker = subprocess.Popen([sys.executable, str(ROOT / "manage.py"), "qcluster"], cwd=ROOT,
                                  env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        done = {Document.Status.READY, Document.Status.FAILED}
        while not all(Document.objects.get(pk=d.pk).status in done for d in (manual, slow)):
            if worker.poll() is not None or time.monotonic() > deadline:
                pytest.fail("the worker did not finish the PDFs:\n"
                            + log_path.read_text(errors="replace")[-3000:])
            time.sleep(0.5)
    finally:
        os.killpg(worker.pid, 15)
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, 9)
            worker.wait()

    manual.refresh_from_db()
    slow.refresh_from_db()
    assert (manual.status, manual.error_message) == (Document.Status.READY, "")
    assert slow.status == Document.Status.FAILED
    assert "took longer than 3 s" in slow.error_message, slow.error_message
