"""Unpacking uploaded zips: safe names, skipped entries and zip-bomb limits."""

from __future__ import annotations

import io
import stat
import struct
import time
import zipfile
from pathlib import Path

import pytest

from kb.ingestion.archives import ArchiveLimits, ArchiveMember, extract_archive
from kb.ingestion.document import ParseError

SAMPLES = Path(__file__).resolve().parents[3] / "fixtures" / "samples"


def make_zip(entries: list[tuple[str | zipfile.ZipInfo, bytes]],
             compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return buffer.getvalue()


def reasons(skipped) -> dict[str, str]:
    return {s.name: s.reason for s in skipped}


def test_regular_files_are_extracted_with_their_paths():
    """Files in folders come out with relative paths and their exact bytes."""
    pdf = (SAMPLES / "manual.pdf").read_bytes()
    data = make_zip([("docs/manual.pdf", pdf), ("notes.txt", b"hello"),
                     ("docs/sub/policy.docx", (SAMPLES / "policy.docx").read_bytes())])
    members, skipped = extract_archive(filename="bundle.zip", data=data)
    assert [m.name for m in members] == ["docs/manual.pdf", "notes.txt", "docs/sub/policy.docx"]
    assert members[0] == ArchiveMember(name="docs/manual.pdf", data=pdf)
    assert skipped == []


def test_directory_entries_are_skipped():
    """Directory entries are reported as skipped, not returned as files."""
    data = make_zip([(zipfile.ZipInfo("folder/"), b""), ("folder/a.txt", b"a")])
    members, skipped = extract_archive(filename="dirs.zip", data=data)
    assert [m.name for m in members] == ["folder/a.txt"]
    assert reasons(skipped) == {"folder": "directory entry"}


@pytest.mark.parametrize(("name", "reason"), [
    ("../evil.txt", "path traversal"),
    ("docs/../../evil.txt", "path traversal"),
    ("..\\..\\windows\\evil.txt", "path traversal"),
    ("/etc/passwd", "absolute"),
    ("C:/Windows/evil.txt", "absolute"),
    ("C:\\evil.txt", "absolute"),
])
def test_path_traversal_and_absolute_paths_are_skipped(name, reason):
    """Entries that would land outside the extraction folder are never returned."""
    data = make_zip([(name, b"pwned"), ("ok.txt", b"fine")])
    members, skipped = extract_archive(filename="evil.zip", data=data)
    assert [m.name for m in members] == ["ok.txt"]
    assert len(skipped) == 1 and reason in skipped[0].reason


def test_dot_segments_are_normalised():
    """Harmless "./" segments and doubled slashes are cleaned out of names."""
    members, _ = extract_archive(filename="a.zip", data=make_zip([("./docs//a.txt", b"a")]))
    assert [m.name for m in members] == ["docs/a.txt"]


def test_symlinks_are_skipped():
    """A symbolic link entry is skipped, not followed or written."""
    link = zipfile.ZipInfo("link-to-passwd")
    link.create_system = 3
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    data = make_zip([(link, b"/etc/passwd"), ("ok.txt", b"fine")])
    members, skipped = extract_archive(filename="links.zip", data=data)
    assert [m.name for m in members] == ["ok.txt"]
    assert "symbolic link" in reasons(skipped)["link-to-passwd"]


def test_macos_metadata_and_dotfiles_are_skipped():
    """__MACOSX folders, .DS_Store and other hidden files are not documents."""
    data = make_zip([("__MACOSX/._report.pdf", b"x"), ("docs/.DS_Store", b"x"),
                     (".git/config", b"x"), ("docs/Thumbs.db", b"x"), ("report.txt", b"ok")])
    members, skipped = extract_archive(filename="mac.zip", data=data)
    assert [m.name for m in members] == ["report.txt"]
    assert set(reasons(skipped)) == {"__MACOSX/._report.pdf", "docs/.DS_Store", ".git/config",
                                     "docs/Thumbs.db"}


def test_nested_archives_are_not_expanded():
    """A zip inside the zip is skipped with a reason, whatever its name; a DOCX is kept."""
    inner = make_zip([("inner.txt", b"inside")])
    docx_bytes = (SAMPLES / "policy.docx").read_bytes()
    data = make_zip([("inner.zip", inner), ("disguised.dat", inner),
                     ("backup.tar.gz", b"\x1f\x8b..."), ("policy.docx", docx_bytes)])
    members, skipped = extract_archive(filename="outer.zip", data=data)
    assert [m.name for m in members] == ["policy.docx"]
    for name in ("inner.zip", "disguised.dat", "backup.tar.gz"):
        assert reasons(skipped)[name] == "nested archives are not expanded"


def test_member_over_the_size_limit_is_skipped():
    """A member bigger than max_member_bytes is skipped; the rest are kept."""
    data = make_zip([("big.txt", b"abcdefgh" * 20_000), ("small.txt", b"ok")],
                    compression=zipfile.ZIP_STORED)
    members, skipped = extract_archive(filename="a.zip", data=data,
                                       limits=ArchiveLimits(max_member_bytes=100_000))
    assert [m.name for m in members] == ["small.txt"]
    assert "larger than" in reasons(skipped)["big.txt"]


def test_absurd_compression_ratio_is_skipped():
    """A member that inflates 1000:1 is skipped as a likely bomb."""
    data = make_zip([("zeros.txt", b"\0" * 5_000_000), ("ok.txt", b"fine")])
    members, skipped = extract_archive(filename="a.zip", data=data)
    assert [m.name for m in members] == ["ok.txt"]
    assert "compression ratio" in reasons(skipped)["zeros.txt"]


def test_small_highly_compressible_file_is_kept():
    """Small files are not judged by ratio: a few KB of blank lines are fine."""
    members, _ = extract_archive(filename="a.zip", data=make_zip([("blank.txt", b"\n" * 20_000)]))
    assert [m.name for m in members] == ["blank.txt"]


def test_total_size_over_the_limit_is_a_zip_bomb():
    """Many members that together exceed the total limit make the archive fail."""
    piece = bytes(range(256)) * 400  # ~100 KB, incompressible enough to pass the ratio check
    data = make_zip([(f"part{i}.bin", piece) for i in range(12)])
    with pytest.raises(ParseError, match="zip bomb"):
        extract_archive(filename="bomb.zip", data=data,
                        limits=ArchiveLimits(max_total_uncompressed_bytes=1_000_000))


def test_too_many_entries_is_refused():
    """An archive with more entries than max_entries fails before anything is read."""
    data = make_zip([(f"f{i}.txt", b"x") for i in range(30)])
    with pytest.raises(ParseError, match="30 entries; the limit is 20"):
        extract_archive(filename="many.zip", data=data, limits=ArchiveLimits(max_entries=20))


@pytest.mark.parametrize("data", [b"", b"not a zip at all", b"PK\x03\x04" + b"\x00" * 50])
def test_corrupt_zip_is_a_parse_error(data):
    """Bytes that are not a zip raise ParseError."""
    with pytest.raises(ParseError, match="not a valid zip"):
        extract_archive(filename="broken.zip", data=data)


def test_truncated_zip_is_a_parse_error():
    """A zip cut short (central directory missing) raises ParseError."""
    data = make_zip([("a.txt", b"hello world" * 100)])
    with pytest.raises(ParseError):
        extract_archive(filename="cut.zip", data=data[: len(data) // 2])


def _patch_sizes(data: bytes, name: bytes, size: int) -> bytes:
    """Rewrite the declared uncompressed size of one entry in both headers."""
    patched = bytearray(data)
    local = patched.find(b"PK\x03\x04" + b"")
    while local != -1:
        name_len = struct.unpack_from("<H", patched, local + 26)[0]
        if patched[local + 30: local + 30 + name_len] == name:
            struct.pack_into("<I", patched, local + 22, size)
        local = patched.find(b"PK\x03\x04", local + 4)
    central = patched.find(b"PK\x01\x02")
    while central != -1:
        name_len = struct.unpack_from("<H", patched, central + 28)[0]
        if patched[central + 46: central + 46 + name_len] == name:
            struct.pack_into("<I", patched, central + 24, size)
        central = patched.find(b"PK\x01\x02", central + 4)
    return bytes(patched)


def test_lying_declared_size_does_not_inflate_past_it():
    """Headers that understate a member's size cannot smuggle a big member through."""
    data = _patch_sizes(make_zip([("liar.txt", b"A" * 3_000_000), ("ok.txt", b"fine")]),
                        b"liar.txt", 1000)
    started = time.monotonic()
    members, skipped = extract_archive(filename="liar.zip", data=data)
    assert time.monotonic() - started < 5
    assert [m.name for m in members] == ["ok.txt"]
    assert "liar.txt" in reasons(skipped)


def test_encrypted_member_is_skipped():
    """A password-protected entry is skipped with a reason; the others are extracted."""
    data = bytearray(make_zip([("secret.txt", b"hidden"), ("open.txt", b"visible")]))
    for signature, flag_offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        position = data.find(signature)  # the first entry in each header list is secret.txt
        struct.pack_into("<H", data, position + flag_offset,
                         struct.unpack_from("<H", data, position + flag_offset)[0] | 0x1)
    members, skipped = extract_archive(filename="locked.zip", data=bytes(data))
    assert [m.name for m in members] == ["open.txt"]
    assert "password" in reasons(skipped)["secret.txt"]


def test_utf8_names_without_the_utf8_flag_are_decoded():
    """Names written as UTF-8 by tools that forget the UTF-8 flag still read correctly."""
    data = bytearray(make_zip([("café.txt", b"x")]))
    for signature, flag_offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        position = data.find(signature)
        struct.pack_into("<H", data, position + flag_offset,
                         struct.unpack_from("<H", data, position + flag_offset)[0] & ~0x800)
    members, _ = extract_archive(filename="names.zip", data=bytes(data))
    assert [m.name for m in members] == ["café.txt"]


def test_duplicate_names_keep_the_first():
    """The same path twice is extracted once; the repeat is reported."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("a.txt", b"first")
        with pytest.warns(UserWarning):
            archive.writestr("a.txt", b"second")
    members, skipped = extract_archive(filename="dupes.zip", data=buffer.getvalue())
    assert members == [ArchiveMember(name="a.txt", data=b"first")]
    assert reasons(skipped) == {"a.txt": "duplicate name in the archive"}


def test_empty_archive_is_empty():
    """A valid zip with no entries yields nothing and no error."""
    assert extract_archive(filename="empty.zip", data=make_zip([])) == ([], [])
