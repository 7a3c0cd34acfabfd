"""`manage.py kb_ingest PATH... [--collection SLUG] [--sync]`: bulk ingestion from disk."""

from __future__ import annotations

import glob
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from kb import bootstrap, services
from kb.database import DatabaseSetupError
from kb.models import Document


def expand_paths(patterns: list[str]) -> list[Path]:
    """Files named directly, found under directories (recursively), or matched by globs."""
    found: list[Path] = []
    for pattern in patterns:
        matches = [Path(p) for p in glob.glob(pattern, recursive=True)] or [Path(pattern)]
        for match in matches:
            if match.is_dir():
                found += sorted(p for p in match.rglob("*") if p.is_file() and not p.name.startswith("."))
            elif match.is_file():
                found.append(match)
            else:
                raise CommandError(f"No such file or directory: {pattern}")
    return list(dict.fromkeys(found))


class Command(BaseCommand):
    help = "Ingest files, directories or globs into a collection."

    def add_arguments(self, parser):
        parser.add_argument("paths", nargs="+")
        parser.add_argument("--collection", default="default", help="Collection slug (created if missing).")
        parser.add_argument("--sync", action="store_true",
                            help="Ingest in this process instead of queueing for the workers.")

    def handle(self, *args, paths: list[str], collection: str, sync: bool, **options):
        try:
            bootstrap.database_ready_check()
        except DatabaseSetupError as exc:
            raise CommandError(str(exc)) from None
        files = expand_paths(paths)
        target = services.collection_get_or_create(slug=collection)
        outcomes = []
        for path in tqdm(files, desc="Uploading", unit="file", disable=not files):
            outcomes += services.documents_upload(
                collection=target, filename=path.name, data=path.read_bytes(), queue=not sync
            )
        if sync:
            # One batch for everything, so small files share full embedding batches.
            pending = [o.document.pk for o in outcomes if o.outcome in {"created", "updated"}]
            with tqdm(desc="Embedding", unit="chunk", disable=not pending) as bar:
                services.documents_ingest_batch(document_ids=pending, on_embedded=bar.update)
        failures = []
        for outcome in outcomes:
            document = outcome.document
            if document is not None:
                document.refresh_from_db()
            if outcome.outcome == "rejected" or (document and document.status == Document.Status.FAILED):
                failures.append((outcome.filename, outcome.message if outcome.outcome == "rejected"
                                 else document.error_message))
        counts = {name: sum(1 for o in outcomes if o.outcome == name)
                  for name in ("created", "updated", "duplicate")}
        verb = "ingested" if sync else "queued"
        self.stdout.write(
            f"{len(files)} files: {counts['created']} new, {counts['updated']} updated, "
            f"{counts['duplicate']} duplicates {verb}, {len(failures)} failed."
        )
        for name, reason in failures:
            self.stderr.write(f"FAILED {name}: {reason}")
        if failures:
            raise CommandError(f"{len(failures)} file(s) failed.", returncode=1)
