"""README's "Use it" snippets, run as written against a live server with the demo corpus.

The manage.py lines are run through call_command (a subprocess would not see the test
database); the curl and openai snippets run verbatim, with only the port changed.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import call_command

from tests.live_server import running_asgi_server

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not shutil.which("curl"), reason="needs curl"),
]


def use_it_blocks() -> list[tuple[str, str]]:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Use it"):readme.index("## Configuration")]
    return re.findall(r"```(bash|python)\n(.*?)```", section, re.S)


def test_snippets_are_where_the_test_expects_them():
    """The account, the key, search, SSE chat, the openai client, and the management script
    (run through `serve` by tests/acceptance/test_api_consumer.py)."""
    blocks = use_it_blocks()
    assert [lang for lang, _ in blocks] == ["bash", "bash", "bash", "bash", "python", "python"]
    assert "kb_apikey create --user alice --collections demo" in blocks[1][1]
    assert "EDITOR_KEY" in blocks[5][1]


@pytest.mark.django_db(transaction=True)
def test_use_it_from_an_account_to_answers(django_user_model, settings):
    from kb.ops import bootstrap

    settings.KB_PROVIDERS = {
        **settings.KB_PROVIDERS,
        "chat": [{"BACKEND": "kb.providers.extractive.ExtractiveChat", "MODEL": "extractive"}],
    }
    account, key_line, search, chat, client = (code for _, code in use_it_blocks()[:5])
    assert "create_user('alice')" in account
    assert "--user alice --collections demo" in key_line  # run below through call_command
    django_user_model.objects.create_user("alice")
    assert bootstrap.demo_corpus_load() == 5

    out = io.StringIO()
    call_command("kb_apikey", "create", "--user", "alice", "--collections", "demo",
                 stdout=out, stderr=io.StringIO())
    env = {**os.environ, "KEY": out.getvalue().strip()}

    with running_asgi_server() as base:
        def run(code: str) -> str:
            code = code.replace("http://127.0.0.1:8000", base)
            done = subprocess.run(["bash", "-ec", code], env=env, capture_output=True, text=True,
                                  timeout=120)
            assert done.returncode == 0, done.stderr
            return done.stdout

        hits = json.loads(run(search))["results"]
        assert hits and "duplicate" in hits[0]["text"].lower()

        events = re.findall(r"^event: (\w+)$", run(chat), re.M)
        assert events[0] == "meta" and "delta" in events and events[-1] == "done"

        script = client.replace("http://127.0.0.1:8000", base)
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "duplicate" in done.stdout.lower() and "[1]" in done.stdout
