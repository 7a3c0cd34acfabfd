"""Unpack an uploaded zip into safe, size-checked members; hostile entries are skipped."""

from __future__ import annotations

import contextlib
import io
import stat
import zipfile
from dataclasses import dataclass
from pathlib import PurePosixPath

from kb.ingestion.document import ParseError
from kb.ingestion.sniff import sniff_mime_type

_READ_PIECE = 64 * 1024
# Below this size a high ratio is harmless (a few KB of blank lines compress 500:1) and
# inflating the member costs nothing, so only larger members are judged by their ratio.
_RATIO_MIN_BYTES = 64 * 1024
_NESTED_ARCHIVE_SUFFIXES = (".zip", ".tar", ".tgz", ".gz", ".bz2", ".xz", ".7z", ".rar", ".tbz",
                            ".txz", ".zst", ".jar", ".war", ".apk", ".cab", ".iso", ".dmg")
_OS_JUNK = frozenset({"thumbs.db", "desktop.ini", "icon\r"})


@dataclass(frozen=True)
class ArchiveLimits:
    """How much an archive may expand to before it is treated as a zip bomb."""

    max_total_uncompressed_bytes: int = 500 * 1024 * 1024
    max_entries: int = 10_000
    max_member_bytes: int = 50 * 1024 * 1024
    max_compression_ratio: float = 200.0


@dataclass(frozen=True)
class ArchiveMember:
    """A file extracted from an archive; name is a safe relative POSIX path."""

    name: str
    data: bytes


@dataclass(frozen=True)
class SkippedMember:
    """An archive entry that was not extracted, with the reason shown to editors."""

    name: str
    reason: str


def _display_name(info: zipfile.ZipInfo) -> str:
    name = info.filename
    if not info.flag_bits & 0x800:
        # Many zip tools write UTF-8 names without setting the UTF-8 flag, so zipfile reads
        # them as cp437 ("Ã©" for "é"); undo that when the bytes are valid UTF-8.
        with contextlib.suppress(UnicodeEncodeError, UnicodeDecodeError):
            name = name.encode("cp437").decode("utf-8")
    return name


def _safe_name(raw: str) -> tuple[str | None, str]:
    """A normalised relative path, or None and the reason the entry must be skipped."""
    if "\x00" in raw:
        return None, "the name contains a NUL byte"
    name = raw.replace("\\", "/")  # Windows tools write backslashes; treat them as separators
    if name.startswith("/") or (len(name) >= 2 and name[1] == ":" and name[0].isalpha()):
        return None, "absolute paths are not allowed"
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        return None, "the path points outside the archive (path traversal)"
    if not parts:
        return None, "the entry has no name"
    if any(part == "__MACOSX" for part in parts):
        return None, "macOS metadata (__MACOSX) is not a document"
    if any(part.startswith(".") for part in parts):
        return None, "hidden files and folders are skipped"
    if parts[-1].lower() in _OS_JUNK:
        return None, "operating-system metadata is not a document"
    return str(PurePosixPath(*parts)), ""


def _entry_type_problem(info: zipfile.ZipInfo) -> str:
    if info.is_dir():
        return "directory entry"
    # Unix tools store the file type in the high bits; many writers leave them zero.
    file_type = stat.S_IFMT(info.external_attr >> 16) if info.create_system == 3 else 0
    if file_type == stat.S_IFLNK:
        return "symbolic links are not followed"
    if file_type and file_type != stat.S_IFREG:
        return "not a regular file"
    if info.flag_bits & 0x1:
        return "the file is password-protected"
    return ""


def _entry_problem(info: zipfile.ZipInfo, name: str, seen: set[str],
                   limits: ArchiveLimits) -> str:
    """Why an entry with a safe name must still be skipped, judged by its header ("" if not)."""
    problem = _entry_type_problem(info)
    if problem:
        return problem
    if name.lower().endswith(_NESTED_ARCHIVE_SUFFIXES):
        return "nested archives are not expanded"
    if name.casefold() in seen:
        return "duplicate name in the archive"
    if info.file_size > limits.max_member_bytes:
        return f"larger than {limits.max_member_bytes // (1024 * 1024)} MB once unpacked"
    if info.file_size >= _RATIO_MIN_BYTES and (
            info.compress_size == 0
            or info.file_size / info.compress_size > limits.max_compression_ratio):
        ratio = info.file_size / max(1, info.compress_size)
        return f"compression ratio {ratio:.0f}:1 is suspicious (zip bomb?)"
    return ""


def _plan(infos: list[zipfile.ZipInfo], limits: ArchiveLimits,
          skipped: list[SkippedMember]) -> list[tuple[zipfile.ZipInfo, str]]:
    """The entries to extract with their safe names; the others go to skipped with a reason."""
    planned: list[tuple[zipfile.ZipInfo, str]] = []
    seen: set[str] = set()
    for info in infos:
        shown = _display_name(info)
        name, reason = _safe_name(shown)
        if name is None:
            skipped.append(SkippedMember(name=shown, reason=reason))
            continue
        problem = _entry_problem(info, name, seen, limits)
        if problem:
            skipped.append(SkippedMember(name=name, reason=problem))
            continue
        seen.add(name.casefold())
        planned.append((info, name))
    return planned


def _inflate(archive: zipfile.ZipFile, info: zipfile.ZipInfo, member_limit: int,
             max_ratio: float) -> tuple[bytes, int, str]:
    """The member's bytes, how many were inflated, and what went wrong ("" if nothing).

    Inflating stops just past member_limit or once the real ratio exceeds max_ratio."""
    pieces: list[bytes] = []
    size = 0
    problem = ""
    try:
        with archive.open(info) as stream:
            while True:
                piece = stream.read(_READ_PIECE)
                if not piece:
                    break
                size += len(piece)
                if size > member_limit:
                    break
                if size >= _RATIO_MIN_BYTES and size / max(1, info.compress_size) > max_ratio:
                    problem = "compression ratio is suspicious (zip bomb?)"
                    break
                pieces.append(piece)
    except NotImplementedError as exc:
        problem = f"unsupported compression method ({exc})"
    except Exception as exc:  # CRC, zlib and header errors: skip the entry, keep the rest
        problem = f"the entry is damaged ({exc})"
    return b"".join(pieces), size, problem


def extract_archive(
    *, filename: str, data: bytes, limits: ArchiveLimits = ArchiveLimits()
) -> tuple[list[ArchiveMember], list[SkippedMember]]:
    """Extract the regular files of a zip, skipping unsafe entries and refusing zip bombs."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except Exception as exc:  # zipfile raises NotImplementedError, ValueError... on damage
        raise ParseError(f"{filename} is not a valid zip archive: {exc}") from exc
    if len(infos) > limits.max_entries:
        raise ParseError(f"{filename} has {len(infos)} entries; the limit is {limits.max_entries}.")
    skipped: list[SkippedMember] = []
    planned = _plan(infos, limits, skipped)
    declared = sum(info.file_size for info, _ in planned)
    max_total = limits.max_total_uncompressed_bytes
    if declared > max_total:
        raise ParseError(f"{filename} would unpack to {declared // (1024 * 1024)} MB; the limit is "
                         f"{max_total // (1024 * 1024)} MB (it looks like a zip bomb).")
    members: list[ArchiveMember] = []
    total = 0
    for info, name in planned:
        # Declared sizes are attacker-controlled, so count the bytes actually inflated.
        member_limit = min(limits.max_member_bytes, max_total - total)
        content, size, problem = _inflate(archive, info, member_limit,
                                          limits.max_compression_ratio)
        if size > member_limit:
            if total + size > max_total:
                raise ParseError(f"{filename} unpacks to more than {max_total // (1024 * 1024)} "
                                 "MB (it looks like a zip bomb).")
            problem = (f"larger than {limits.max_member_bytes // (1024 * 1024)} MB once unpacked "
                       "(its declared size was wrong)")
        if problem:
            skipped.append(SkippedMember(name=name, reason=problem))
            continue
        total += size
        if content.startswith(b"PK\x03\x04") and sniff_mime_type(
                filename=name, head=content[:8192]) == "application/zip":
            skipped.append(SkippedMember(name=name, reason="nested archives are not expanded"))
            continue
        members.append(ArchiveMember(name=name, data=content))
    return members, skipped
