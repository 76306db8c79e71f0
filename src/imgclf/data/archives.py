"""Safe reading of .tar / .tar.gz / .tgz / .tar.bz2 / .tar.xz / .zip archives, member by member, in memory.

    for entry in iter_archive("cifar10-jpeg.tar.gz"):
        entry.name, entry.kind, entry.data      # "train/cat/0001.jpg", "file", b"..."

Members are read into memory instead of being extracted to a temporary folder: on the reference 2-core
machine, writing the 60,000 small files of cifar10-jpeg.tar.gz to disk took 5.6 s with GNU tar and 9+ s
with tarfile, about as long as decoding them, and a member that is never written cannot land outside a
folder. Each member is read whole and handed on: the decoder keeps only a few chunks of them in flight.
Every member is still checked first: an absolute path, a ``..`` component, or a link pointing outside
the archive is refused with ImgclfError naming the entry (never silently renamed, as tarfile/zipfile's
own sanitising would do). Sizes are checked too: a member larger than MEMBER_MAX, or a compressed tar that
expands like a decompression bomb, is refused before it is read into memory.
"""
from __future__ import annotations

import bz2
import contextlib
import gzip
import lzma
import posixpath
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImgclfError

SPOOL_MAX = 64 << 20  # decompressed tar kept in memory up to 64 MiB, spilled to a temporary file beyond
# Bytes one member may hold: far above any photo or CIFAR batch file (30-160 MB), far below what would
# exhaust memory. A member is read whole, so this bounds what one read can take.
MEMBER_MAX = 512 << 20
# A compressed tar that expands past BOMB_MIN bytes and more than BOMB_RATIO times its own size is refused as
# a decompression bomb: image archives expand ~1-10x (JPEGs hardly compress; tar headers of small files do).
BOMB_MIN = 1 << 30
BOMB_RATIO = 200
LINK_MAX = 4096  # bytes of a zip symlink's target (PATH_MAX)
_COMPRESSED = ((b"\x1f\x8b", gzip.open), (b"BZh", bz2.open), (b"\xfd7zXZ\x00", lzma.open))
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".zip")


@dataclass(frozen=True)
class ArchiveEntry:
    name: str                 # normalised relative POSIX path, e.g. "train/cat/0001.jpg"
    kind: str                 # "file" | "dir" | "link"
    data: bytes | None = None  # file contents ("file" only)
    target: str | None = None  # normalised relative path a "link" points to


def is_archive(path: str | Path) -> bool:
    """True for a file whose name ends in one of ARCHIVE_SUFFIXES (case-insensitive)."""
    return Path(path).name.lower().endswith(ARCHIVE_SUFFIXES)


def archive_stem(path: str | Path) -> str:
    """"cifar10-jpeg.tar.gz" -> "cifar10-jpeg"."""
    name = Path(path).name
    for suffix in sorted(ARCHIVE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def iter_archive(path: str | Path, *, stream: bool = False) -> Iterator[ArchiveEntry]:
    """Yield the checked members of a tar or zip archive in stored order; ImgclfError on anything unsafe,
    unreadable or truncated. Special files (devices, fifos) are skipped: there is nothing to read in them.
    ``stream=True`` decompresses a tar only as far as it is read: cheaper for a peek at the first members,
    slower for reading them all."""
    path = Path(path)
    try:
        if path.name.lower().endswith(".zip"):
            yield from _iter_zip(path)
        else:
            yield from _iter_tar(path, stream=stream)
    except _MemberTooBig as e:
        raise ImgclfError(f"{path}: {e}") from None
    except ImgclfError:
        raise
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImgclfError(f"{path}: not a readable .tar/.tar.gz/.zip archive, or truncated ({reason}); "
                          "download or re-create it") from None


def _iter_tar(path: Path, *, stream: bool) -> Iterator[ArchiveEntry]:
    with contextlib.ExitStack() as stack:
        raw = None
        if stream:  # "r|*": one sequential pass with transparent gzip/bz2/xz
            tar = stack.enter_context(tarfile.open(path, "r|*"))
        else:
            raw = stack.enter_context(_decompressed(path))
            tar = stack.enter_context(tarfile.open(fileobj=raw, mode="r:"))
        for member in tar:
            name = _safe_name(member.name, path)
            if name is None:
                continue
            if member.isdir():
                yield ArchiveEntry(name, "dir")
            elif member.issym():
                # A symlink's target is relative to the folder holding the link.
                yield ArchiveEntry(name, "link", target=_safe_target(name, member.linkname, path, relative=True))
            elif member.islnk():
                # A hard link's target is a path from the archive's root.
                yield ArchiveEntry(name, "link", target=_safe_target(name, member.linkname, path, relative=False))
            elif member.isfile():
                yield ArchiveEntry(name, "file", data=_read_member(tar, raw, member))


def _read_member(tar: tarfile.TarFile, raw, member: tarfile.TarInfo) -> bytes:
    """A regular member's bytes. From a seekable file they are read straight at the offset tarfile parsed,
    which skips building a file object per member (0.8 s of 3.3 s over 60,000 members)."""
    if member.size > MEMBER_MAX:
        raise _too_big(member.name, member.size)
    if raw is None or member.issparse():
        return tar.extractfile(member).read()
    raw.seek(member.offset_data)
    data = raw.read(member.size)
    if len(data) != member.size:
        raise tarfile.ReadError(f"unexpected end of data in {member.name}")
    return data


@contextlib.contextmanager
def _decompressed(path: Path):
    """The tar stream as a seekable file: the archive itself, or its decompressed copy in memory (on disk
    beyond SPOOL_MAX). tarfile reads members ~1.5x faster from a plain seekable file than through its
    own streaming decompressor: 2.6 s instead of 4.4 s for the 60,000 members of cifar10-jpeg.tar.gz."""
    with open(path, "rb") as f:
        magic = f.read(6)
    opener = next((op for sig, op in _COMPRESSED if magic.startswith(sig)), None)
    if opener is None:
        with open(path, "rb") as f:
            yield f
        return
    limit = max(BOMB_MIN, BOMB_RATIO * path.stat().st_size)
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_MAX) as spool:
        with opener(path, "rb") as src:
            written = 0
            while block := src.read(1 << 20):
                written += len(block)
                if written > limit:
                    raise ImgclfError(f"{path}: expands to more than {limit / 2**30:.1f} GiB, over {BOMB_RATIO}x "
                                      "its own size: a decompression bomb, or not an image archive; refusing it")
                spool.write(block)
        spool.seek(0)
        yield spool


def _iter_zip(path: Path) -> Iterator[ArchiveEntry]:
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            name = _safe_name(info.filename, path)
            if name is None:
                continue
            unix_mode = info.external_attr >> 16
            if info.is_dir():
                yield ArchiveEntry(name, "dir")
            elif stat.S_ISLNK(unix_mode):
                if info.file_size > LINK_MAX:  # a link's data is its target path
                    raise ImgclfError(f"{path}: entry {name} is marked as a link but holds {info.file_size:,} bytes; "
                                      "re-create the archive")
                target = zf.read(info).decode("utf-8", "replace")
                yield ArchiveEntry(name, "link", target=_safe_target(name, target, path, relative=True))
            else:
                if info.file_size > MEMBER_MAX:
                    raise _too_big(name, info.file_size)
                # zipfile reads no more than the stated size (a lie fails the CRC check)
                yield ArchiveEntry(name, "file", data=zf.read(info))


class _MemberTooBig(ImgclfError):
    pass


def _too_big(name: str, size: int) -> ImgclfError:
    return _MemberTooBig(f"entry {name} holds {size / 2**20:,.0f} MiB, more than the {MEMBER_MAX >> 20} MiB an "
                         "image file may have; remove it from the archive")


def _safe_name(raw: str, archive: Path) -> str | None:
    """Member name -> normalised relative path; None for the archive's root ("./"); ImgclfError if it
    would land outside the extraction folder."""
    parts = raw.replace("\\", "/").split("/")  # zips written on Windows may use backslashes
    if raw.startswith(("/", "\\")) or (parts and len(parts[0]) == 2 and parts[0][1] == ":"):
        raise ImgclfError(f"{archive}: refusing unsafe archive entry {raw!r} (absolute path); "
                          "re-create the archive with relative paths")
    if ".." in parts:
        raise ImgclfError(f"{archive}: refusing unsafe archive entry {raw!r} ('..' would write outside "
                          "the extraction folder); re-create the archive without it")
    kept = [p for p in parts if p not in ("", ".")]
    return "/".join(kept) or None


def _safe_target(name: str, target: str, archive: Path, *, relative: bool) -> str:
    """Where a link points, as a normalised path from the archive's root; ImgclfError if outside it."""
    clean = target.replace("\\", "/")
    joined = posixpath.join(posixpath.dirname(name), clean) if relative else clean
    resolved = posixpath.normpath(joined)
    if clean.startswith("/") or resolved == ".." or resolved.startswith("../"):
        raise ImgclfError(f"{archive}: refusing unsafe archive entry {name!r} (link to {target!r} points "
                          "outside the archive); re-create the archive without it")
    return resolved
