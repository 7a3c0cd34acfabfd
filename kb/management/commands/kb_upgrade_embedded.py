"""`manage.py kb_upgrade_embedded [--old-bin PATH]`: move the embedded database made by
PostgreSQL 16 (pgserver, before this version) to the embedded PostgreSQL 17."""

from __future__ import annotations

from argparse import ArgumentParser
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from kb.ops.database import DatabaseSetupError
from kb.ops.embedded_upgrade import embedded_upgrade
from search import postgres_extension


class Command(BaseCommand):
    help = (
        "Move the embedded database (KB_DATA_DIR/pgdata, or KB_PGDATA) made by an older "
        "PostgreSQL major version to the embedded PostgreSQL 17: dump, restore, compare every "
        "table's rows, then keep the old directory beside it as a dated backup. Stop `serve` "
        "first. Needs the old binaries: pip install -e '.[upgrade]'."
    )
    # The system checks would reach for the database this command exists to repair.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--old-bin", metavar="PATH",
                            help="bin directory of the PostgreSQL that made the data directory "
                                 "(default: pgserver's PostgreSQL 16).")

    def handle(self, *args: object, old_bin: str | None, **options: object) -> None:
        pgdata = settings.DATABASES["default"].get("EMBEDDED_PGDATA")
        if settings.DATABASE_URL or not pgdata:
            raise CommandError(
                "DATABASE_URL is set, so the database is an external server, which this command "
                "does not upgrade: use pg_upgrade, or your provider's major-version upgrade."
            )
        try:
            embedded_upgrade(
                pgdata=Path(pgdata),
                old_bin=Path(old_bin) if old_bin else None,
                extension_build=lambda: postgres_extension.extension_build(
                    postgres_extension.embedded_pg_config()),
                report=self.stdout.write,
            )
        except DatabaseSetupError as exc:
            raise CommandError(str(exc)) from None
