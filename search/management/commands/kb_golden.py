"""`manage.py kb_golden export|import SLUG DIR`: a collection's golden set as a BEIR directory."""

from __future__ import annotations

from argparse import ArgumentParser
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from kb.models import Collection
from search import golden


class Command(BaseCommand):
    help = ("Export a collection's golden set as a BEIR directory (corpus.jsonl, queries.jsonl, "
            "qrels/test.tsv; corpus ids are document ids), or import one into it.")

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("action", choices=("export", "import"))
        parser.add_argument("collection", metavar="SLUG")
        parser.add_argument("directory", metavar="DIR")

    def handle(self, *args: object, action: str, collection: str, directory: str,
               **options: object) -> None:
        target = Collection.objects.filter(slug=collection).first()
        if target is None:
            raise CommandError(f"No collection {collection!r}.")
        path = Path(directory)
        try:
            if action == "export":
                count = golden.golden_set_export(collection=target, path=path)
                self.stdout.write(f"Exported {count} questions of {collection} "
                                  f"(golden set v{golden.golden_set_version(collection=target)})"
                                  f" to {path}.")
                return
            saved, skipped = golden.golden_set_import(collection=target, path=path)
        except golden.GoldenSetError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"Imported {saved} questions into {collection}'s golden set "
                          f"(v{golden.golden_set_version(collection=target)}); skipped {skipped} "
                          "whose documents are not in it.")
