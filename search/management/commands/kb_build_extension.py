"""`manage.py kb_build_extension [--pg-config PATH]`: compile BM25's C function once."""

from __future__ import annotations

import logging
from argparse import ArgumentParser
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from search import postgres_extension


class Command(BaseCommand):
    help = (
        "Compile the kb_bm25 extension (BM25's C function) and install it into a PostgreSQL "
        "server's directories: the embedded server's by default, or the one --pg-config "
        "describes. Nothing is done when this source is installed already. `migrate` runs it "
        "for the embedded server the first time; then creates the extension."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--pg-config", help="pg_config of the server to build for "
                            "(default: the embedded server's).")

    def handle(self, *args: object, pg_config: str | None, **options: object) -> None:
        path = Path(pg_config) if pg_config else postgres_extension.embedded_pg_config()
        if postgres_extension.extension_built(path):
            self.stdout.write(f"kb_bm25 is built and current for {path}.")
            return
        self.stdout.write(f"Building the kb_bm25 extension for {path} (once; BM25 uses the SQL "
                          "engine until it is there)…")
        # extension_build logs why a build failed; show that here too.
        handler = _Collect()
        logger = logging.getLogger(postgres_extension.__name__)
        logger.addHandler(handler)
        try:
            built = postgres_extension.extension_build(path)
        finally:
            logger.removeHandler(handler)
        if not built:
            raise CommandError("kb_bm25 was not built: "
                               + (" ".join(handler.messages) or "see the log")
                               + " Search keeps working with BM25 in SQL.")
        self.stdout.write(f"Built kb_bm25 for {path}; `migrate` creates it in the database.")


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
