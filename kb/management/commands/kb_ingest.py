"""`manage.py kb_ingest PATH... [--collection SLUG] [--sync] [--user NAME]`: bulk ingestion
from disk."""

from __future__ import annotations

import glob
import os
from pathlib import Path

from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.core.exceptions import PermissionDenied
from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from kb import selectors
from kb.models import Collection, Document
from kb.ops import bootstrap
from kb.ops.database import DatabaseSetupError
from kb.services.collections import collection_get_or_create
from kb.services.ingest import documents_ingest_batch
from kb.services.uploads import (
    UploadOutcome,
    documents_upload,
    path_sanitize,
    upload_outcomes_refresh,
    upload_permission_check,
)


def expand_paths(patterns: list[str]) -> list[tuple[Path, str]]:
    """Files named directly, found under directories (recursively), or matched by globs,
    each with its name in the knowledge base: its path relative to the folder ingested.

    A directory's files are named relative to that directory (teamA/README.md), a glob's
    relative to the folder before its first wildcard, a file named directly by its name.
    """
    found: dict[Path, str] = {}
    for pattern in patterns:
        if glob.has_magic(pattern):
            root = _static_prefix(pattern)
            matches = [Path(p) for p in glob.glob(pattern, recursive=True)]
            if not matches:
                raise CommandError(f"No such file or directory: {pattern}")
        else:
            match = Path(pattern)
            if not match.exists():
                raise CommandError(f"No such file or directory: {pattern}")
            root = match if match.is_dir() else match.parent
            matches = [match]
        for match in matches:
            if match.is_dir():
                files = sorted(
                    p for p in match.rglob("*") if p.is_file() and not p.name.startswith(".")
                )
            elif match.is_file():
                files = [match]
            else:
                continue
            for path in files:
                found.setdefault(path, Path(os.path.relpath(path, root)).as_posix())
    return [(path, name) for path, name in found.items()]


def _static_prefix(pattern: str) -> Path:
    parts = Path(pattern).parts
    static = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        static.append(part)
    return Path(*static) if static else Path(".")


class Command(BaseCommand):
    help = "Ingest files, directories or globs into a collection."

    def add_arguments(self, parser):
        parser.add_argument("paths", nargs="+")
        parser.add_argument("--collection", default="default",
                            help="Collection slug (created if missing).")
        parser.add_argument("--sync", action="store_true",
                            help="Ingest in this process instead of queueing for the workers.")
        parser.add_argument(
            "--user", help="Upload as this user, with their permissions: adding needs "
            "“Can add document”, replacing a document of the same name “Can change document”, "
            "and the collection must exist and be readable by them. Without it the command "
            "acts as the system, which may do both.")

    def handle(self, *args, paths: list[str], collection: str, sync: bool, user: str | None,
               **options):
        try:
            bootstrap.database_ready_check()
        except DatabaseSetupError as exc:
            raise CommandError(str(exc)) from None
        files = expand_paths(paths)
        uploader = self._uploader(user)
        target: Collection | None
        if uploader is None:
            target = collection_get_or_create(slug=collection)
        else:
            target = selectors.collections_visible(user=uploader).filter(slug=collection).first()
            if target is None:
                raise CommandError(f"No collection “{collection}” that {uploader} can write to.")
        outcomes = []
        names: dict[str, str] = {}
        for path, name in tqdm(files, desc="Uploading", unit="file", disable=not files):
            shown = path_sanitize(name)
            if shown.casefold() in names:
                # Two files would become one document, the second replacing the first.
                outcomes.append(UploadOutcome(
                    filename=str(path), outcome="rejected",
                    message=f"it would have the same name, {shown!r}, as "
                            f"{names[shown.casefold()]} in this run; not ingested. Ingest the "
                            "two folders into different collections, or from a common parent.",
                ))
                continue
            names[shown.casefold()] = str(path)
            outcomes += documents_upload(
                collection=target, filename=name, data=path.read_bytes(), queue=not sync,
                uploaded_by=uploader, keep_folders=True,
            )
        if sync:
            # One batch for everything, so small files share full embedding batches.
            pending = [o.document.pk for o in outcomes
                       if o.document is not None and o.outcome in {"created", "updated"}]
            with tqdm(desc="Embedding", unit="chunk", disable=not pending) as bar:
                documents_ingest_batch(document_ids=pending, on_embedded=bar.update)
        outcomes = upload_outcomes_refresh(outcomes=outcomes)
        failures = []
        for outcome in outcomes:
            document = outcome.document
            if outcome.outcome == "rejected":
                failures.append((outcome.filename, outcome.message))
            elif document is not None and document.status == Document.Status.FAILED:
                failures.append((outcome.filename, document.error_message))
        counts = {name: sum(1 for o in outcomes if o.outcome == name)
                  for name in ("created", "updated", "duplicate")}
        verb = "ingested" if sync else "queued"
        self.stdout.write(
            f"{len(files)} {'file' if len(files) == 1 else 'files'}: "
            f"{counts['created']} new, {counts['updated']} updated, "
            f"{counts['duplicate']} duplicates {verb}, {len(failures)} failed."
        )
        for outcome in outcomes:
            if outcome.outcome == "updated":
                self.stdout.write(f"UPDATED {outcome.filename}: replaces the earlier version.")
            elif outcome.outcome == "duplicate":
                self.stdout.write(f"DUPLICATE {outcome.filename}: {outcome.message}")
        for name, reason in failures:
            self.stderr.write(f"FAILED {name}: {reason}")
        if failures:
            raise CommandError(f"{len(failures)} file(s) failed.", returncode=1)

    def _uploader(self, username: str | None) -> User | None:
        if username is None:
            return None
        user = get_user_model().objects.filter(username=username, is_active=True).first()
        if user is None:
            raise CommandError(f"No active user “{username}”.")
        try:
            upload_permission_check(user=user)
        except PermissionDenied as exc:
            raise CommandError(str(exc)) from None
        return user
