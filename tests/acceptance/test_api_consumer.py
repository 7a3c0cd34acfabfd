"""An API consumer's whole session, through `serve` and its real workers: README's "Use it"
management script, run as written (only the port changed), then a look inside the database
for anything the deleted collection left behind."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.docs.test_readme_use_it import use_it_blocks

pytestmark = pytest.mark.slow

LEFTOVERS = """
import json
from chat.models import AnswerCacheEntry
from kb.models import Chunk, ChunkEmbedding, Collection, Document
from search.models import CollectionStatistic, Posting, TermStatistic
ids = {ids}
print("LEFT " + json.dumps({{
    "collection": Collection.objects.filter(slug="runbooks").count(),
    "documents": Document.objects.filter(pk__in=ids).count(),
    "chunks": Chunk.objects.filter(document_id__in=ids).count(),
    "vectors": ChunkEmbedding.objects.filter(chunk__document_id__in=ids).count(),
    "postings": Posting.objects.exclude(chunk_id__in=Chunk.objects.values("pk")).count(),
    "term_statistics": TermStatistic.objects.exclude(
        collection__in=Collection.objects.all()).count(),
    "collection_statistics": CollectionStatistic.objects.exclude(
        collection__in=Collection.objects.all()).count(),
    "cached_answers": AnswerCacheEntry.objects.filter(source_document_ids__overlap=ids).count(),
}}))
"""


def test_readme_management_script_leaves_nothing_behind(kb_server):
    kb_server.manage("shell", "-c", "from django.contrib.auth import get_user_model; "
                                    "get_user_model().objects.get_or_create(username='alice')")
    editor_key = kb_server.manage("kb_apikey", "create", "--user", "admin").strip()
    script = use_it_blocks()[5][1].replace("http://127.0.0.1:8000", kb_server.base)

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "EDITOR_KEY": editor_key})

    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert re.fullmatch(r"document \d+ ready: 1 chunk\(s\)", lines[0]), lines
    assert "40 minutes" in lines[1] and "25 minutes" in lines[2], lines
    assert lines[3] == "deleted: 404", lines
    document_id = int(lines[0].split()[1])
    files = [path for path in (kb_server.data_dir / "media").rglob("*")
             if path.is_file() and "restore" in path.name]
    assert files == []
    output = kb_server.manage("shell", "-c", LEFTOVERS.format(ids=[document_id]))
    left = json.loads(output.split("LEFT ", 1)[1])
    assert set(left.values()) == {0}, left
