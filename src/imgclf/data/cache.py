"""On-disk cache of decoded datasets: uint8 shards + meta.json under imgclf_home()/cache/<key>/.

    key = cache_key(source, parser="image-folder", image_size=None, channels=None, skip_bad_images=False)
    decoded = load(key)                                  # None on a miss or a damaged entry (which is removed)
    decoded = decode(key, lambda store: parser(source, ..., store=store))   # a miss: decode into a new entry

The key covers the source's identity and state (path, size and mtime of every file) and every option that
changes the pixels, so an edited dataset is decoded again. An entry holds one pool of images in fixed-size
shards (shards.py) and, per split, the positions of its images in the pool, their labels and, where the
images are files, their names (relative paths or archive member names, for `--exclude` and `doctor`). A parser
writes the pool as it decodes, in a temporary folder; meta.json, written last with every file's size and
sha256, marks the entry complete, and the folder is renamed into place: a crash or a full disk mid-write
leaves no entry that would be trusted. Loading maps the shards (nothing is read until used) and checks each
file's size; a file whose modification time changed since it was written is hashed again, so an entry
changed on disk is rebuilt, never read as garbage.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL

from ..utils import imgclf_home
from .decoded import Decoded
from .notify import note, warn
from .shards import ImageRows, ShardWriter, open_shards, sha256_file, write_npy

# Bump when the decoding or the file format changes, so old entries are not reused (3: image names stored).
CACHE_VERSION = 3
STALE_TMP_S = 24 * 3600  # a temporary folder this old belongs to a crashed run


class Store:
    """Where a parser puts the images it decodes: shards in ``folder`` (a new cache entry), or memory."""

    def __init__(self, folder: Path | None):
        self.folder, self.writers = folder, 0

    def writer(self, shape) -> ShardWriter:
        self.writers += 1  # each writer's files have a name of their own
        return ShardWriter(self.folder, shape, name="images" if self.writers == 1 else f"images{self.writers}")


def cache_dir() -> Path:
    return imgclf_home() / "cache"


def cache_key(source: Path, *, parser: str, image_size: int | None, channels: int | None,
              skip_bad_images: bool) -> str:
    """sha256 over the source (resolved path; size + mtime_ns of the file, or of every file in the folder)
    and the decoding options."""
    h = hashlib.sha256()
    options = {"version": CACHE_VERSION, "pillow": PIL.__version__, "parser": parser,
               "source": str(source.resolve()), "image_size": image_size, "channels": channels,
               "skip_bad_images": skip_bad_images}
    h.update(json.dumps(options, sort_keys=True).encode())
    if source.is_dir():
        for rel, st in _walk_stats(source):
            h.update(f"\n{rel}\0{st.st_size}\0{st.st_mtime_ns}".encode("utf-8", "surrogateescape"))
    else:
        st = source.stat()
        h.update(f"\n{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()


def load(key: str) -> Decoded | None:
    """The cached Decoded for ``key`` (its images memory-mapped), or None. A damaged entry (a missing,
    truncated or changed file, a wrong shape) is removed, with a note, so the caller decodes it again."""
    folder = cache_dir() / key
    if not folder.exists():
        return None
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        if meta["version"] != CACHE_VERSION:
            raise ValueError(f"cache format {meta['version']}, expected {CACHE_VERSION}")
        for rec in meta["files"]:
            _check_file(folder, rec)
        size, channels, n_classes = meta["image_size"], meta["channels"], len(meta["classes"])
        pool = open_shards(folder, meta["shards"], (size, size, channels))
        splits = {}
        for split, n in meta["splits"].items():
            index = np.load(folder / f"{split}_index.npy", allow_pickle=False)
            y = np.load(folder / f"{split}_y.npy", allow_pickle=False)
            if index.dtype != np.int64 or index.shape != (n,) or \
                    (n and not 0 <= index.min() <= index.max() < len(pool)):
                raise ValueError(f"{split}_index.npy does not hold {n} positions in 0..{len(pool) - 1}")
            if y.dtype != np.int64 or y.shape != (n,) or (n and not 0 <= y.min() <= y.max() < n_classes):
                raise ValueError(f"{split}_y.npy does not hold {n} labels in 0..{n_classes - 1}")
            splits[split] = (pool.select(index), y)
        names = {}
        for split in meta["names"]:  # mapped: nothing is read unless a caller asks for the names
            mode = "r" if meta["splits"][split] else None  # an empty file cannot be mapped
            names[split] = np.load(folder / f"{split}_names.npy", mmap_mode=mode, allow_pickle=False)
            if names[split].dtype.kind != "S" or names[split].shape != (meta["splits"][split],):
                raise ValueError(f"{split}_names.npy does not hold {meta['splits'][split]} names")
        return Decoded(meta["classes"], channels, size, splits, skipped=meta["skipped"], names=names or None)
    except Exception as e:  # noqa: BLE001 -- any damage at all means: decode again (never crash on a cache)
        note(f"cache entry {folder} is damaged ({type(e).__name__}: {e}); decoding again")
        shutil.rmtree(folder, ignore_errors=True)
        return None


def decode(key: str, parse: Callable[[Store], Decoded]) -> Decoded:
    """Run ``parse`` into a new entry for ``key`` and return it, loaded as :func:`load` would. Where the entry
    cannot be written (a full disk, a read-only home), decode into memory instead, with a warning."""
    root = cache_dir()
    final = root / key
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(root)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:16]}-", dir=root))
        _publish(tmp, parse(Store(tmp)), final)
        tmp = None
    except OSError as e:
        if not (final / "meta.json").is_file():  # else another process just wrote the same entry: use it
            warn(f"could not write the dataset cache in {root} ({e}); decoding into memory instead, and the "
                 "next run will decode again")
            return in_memory(parse(Store(None)))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    decoded = load(key)
    if decoded is None:
        raise OSError(f"the dataset cache entry {final} could not be read back just after writing it")
    return decoded


def in_memory(decoded: Decoded) -> Decoded:
    """A parser's result with every split as ImageRows, without a cache entry."""
    if decoded.pool is None:
        splits = {s: (ImageRows.from_array(np.ascontiguousarray(x, np.uint8)), y)
                  for s, (x, y) in decoded.splits.items()}
    else:
        pool = decoded.pool.rows()
        splits = {s: (pool.select(index), y) for s, (index, y) in decoded.splits.items()}
    return Decoded(decoded.classes, decoded.channels, decoded.image_size, splits, skipped=decoded.skipped,
                   names=decoded.names)


def _publish(tmp: Path, decoded: Decoded, final: Path) -> None:
    """Write what is not written yet (a parser's in-memory arrays, positions, labels), then meta.json last,
    then rename the folder into place."""
    shape = (decoded.image_size, decoded.image_size, decoded.channels)
    pool, splits = decoded.pool, dict(decoded.splits)
    if pool is None:  # a parser that returns arrays (the official formats): they become the pool
        pool = ShardWriter(tmp, shape)
        splits = {s: (pool.extend(x), y) for s, (x, y) in splits.items()}
        pool.close()
    files = list(pool.records)
    for split, (index, y) in splits.items():
        files.append(write_npy(tmp / f"{split}_index.npy", np.asarray(index, np.int64)))
        files.append(write_npy(tmp / f"{split}_y.npy", np.asarray(y, np.int64)))
    names = decoded.names or {}
    for split, split_names in names.items():
        encoded = [str(n).encode("utf-8", "surrogateescape") for n in split_names]
        files.append(write_npy(tmp / f"{split}_names.npy", np.array(encoded, dtype=bytes) if encoded
                               else np.zeros(0, "S1")))
    for rec in files:
        rec["mtime_ns"] = (tmp / rec["file"]).stat().st_mtime_ns
    meta = {"version": CACHE_VERSION, "classes": decoded.classes, "channels": decoded.channels,
            "image_size": decoded.image_size, "splits": {s: len(y) for s, (_, y) in splits.items()},
            "skipped": decoded.skipped, "names": sorted(names), "shards": pool.records, "files": files}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")  # last: marks it complete
    if final.exists():
        shutil.rmtree(final)  # a damaged entry that load() could not remove
    os.rename(tmp, final)


def _check_file(folder: Path, rec: dict) -> None:
    """ValueError unless the file has its recorded size and, when its mtime changed, its recorded hash."""
    st = (folder / rec["file"]).stat()
    if st.st_size != rec["bytes"]:
        raise ValueError(f"{rec['file']} has {st.st_size} bytes, expected {rec['bytes']} (truncated or changed)")
    if st.st_mtime_ns != rec["mtime_ns"] and sha256_file(folder / rec["file"]) != rec["sha256"]:
        raise ValueError(f"{rec['file']} changed on disk since it was written (sha256 differs)")


def _walk_stats(root: Path):
    """(relative path, stat) of every file under root, in sorted order."""
    out = []
    for current, subdirs, names in os.walk(root):
        subdirs.sort()
        rel = os.path.relpath(current, root)
        for name in names:
            path = os.path.join(current, name)
            try:
                out.append((os.path.normpath(os.path.join(rel, name)), os.stat(path)))
            except OSError:  # vanished or a dangling link: it cannot be decoded either
                continue
    return sorted(out, key=lambda item: item[0])


def _remove_stale_tmp(root: Path) -> None:
    now = time.time()
    for entry in root.glob(".tmp-*"):
        try:
            if now - entry.stat().st_mtime > STALE_TMP_S:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            continue
