"""`manage.py kb_textsearch_index {create,drop,status}`: pg_textsearch's BM25 index."""

from __future__ import annotations

import time
from argparse import ArgumentParser

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from search import textsearch


class Command(BaseCommand):
    help = (
        "Create, drop or describe the pg_textsearch BM25 index over chunk text (Block-Max "
        "WAND). Search uses it with KB_BM25_ENGINE=pg_textsearch; see search/textsearch.py "
        "for how its scores differ from the default engines'."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("action", choices=["create", "drop", "status"])

    def handle(self, *args: object, action: str, **options: object) -> None:
        if action == "create":
            started = time.monotonic()
            try:
                textsearch.textsearch_index_create(k1=settings.KB_BM25_K1, b=settings.KB_BM25_B)
            except textsearch.TextsearchUnavailable as exc:
                raise CommandError(str(exc)) from exc
            self.stdout.write(
                f"Created {textsearch.INDEX_NAME} in {time.monotonic() - started:.1f} s "
                f"(k1={settings.KB_BM25_K1}, b={settings.KB_BM25_B}); restart `serve` or set "
                "KB_BM25_ENGINE=pg_textsearch for search to use it."
            )
        elif action == "drop":
            textsearch.textsearch_index_drop()
            self.stdout.write(f"Dropped {textsearch.INDEX_NAME}; BM25 uses kb_bm25 or SQL.")
        else:
            status = textsearch.textsearch_status()
            for name, value in status.items():
                self.stdout.write(f"{name}: {'yes' if value else 'no'}")
            self.stdout.write(f"KB_BM25_ENGINE: {settings.KB_BM25_ENGINE}")
