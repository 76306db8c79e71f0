"""On-disk cache of decoded datasets: uint8 .npy arrays + meta.json under imgclf_home()/cache/<key>/.

    key = cache_key(source, parser="image-folder", image_size=None, channels=None, skip_bad_images=False)
    decoded = load(key)            # None on a miss or a damaged entry (which is removed)
    save(key, decoded)

The key covers the source's identity and state (path, size and mtime of every file) and every option that
changes the pixels, so an edited dataset is decoded again. An entry is written in a temporary folder,
meta.json last, and renamed into place: a crash mid-write leaves no entry that would be trusted.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL

from ..utils import imgclf_home
from .decoded import Decoded
from .notify import note, warn

# Bump when the decoding or the file format changes, so old entries are not reused.
CACHE_VERSION = 1
STALE_TMP_S = 24 * 3600  # a temporary folder this old belongs to a crashed run


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
    """The cached Decoded for ``key``, or None. A damaged entry (missing/truncated file, wrong shape) is
    removed, with a note, so the caller decodes again and rewrites it."""
    folder = cache_dir() / key
    if not folder.exists():
        return None
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        if meta["version"] != CACHE_VERSION:
            raise ValueError(f"cache format {meta['version']}, expected {CACHE_VERSION}")
        size, channels, n_classes = meta["image_size"], meta["channels"], len(meta["classes"])
        splits = {}
        for split, n in meta["splits"].items():
            x = np.load(folder / f"{split}_x.npy", allow_pickle=False)
            y = np.load(folder / f"{split}_y.npy", allow_pickle=False)
            if x.dtype != np.uint8 or x.shape != (n, size, size, channels):
                raise ValueError(f"{split}_x.npy is {x.dtype} {x.shape}, expected uint8 {(n, size, size, channels)}")
            if y.dtype != np.int64 or y.shape != (n,) or (n and not 0 <= y.min() <= y.max() < n_classes):
                raise ValueError(f"{split}_y.npy does not hold {n} labels in 0..{n_classes - 1}")
            splits[split] = (x, y)
        return Decoded(meta["classes"], channels, size, splits, skipped=meta["skipped"])
    except Exception as e:  # noqa: BLE001 -- any damage at all means: decode again (never crash on a cache)
        note(f"cache entry {folder} is damaged ({type(e).__name__}: {e}); decoding again")
        shutil.rmtree(folder, ignore_errors=True)
        return None


def save(key: str, decoded: Decoded) -> None:
    """Write the entry for ``key``. A failure (disk full, read-only home) only costs the next run a decode."""
    root = cache_dir()
    final = root / key
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(root)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:16]}-", dir=root))
        for split, (x, y) in decoded.splits.items():
            np.save(tmp / f"{split}_x.npy", np.ascontiguousarray(x, dtype=np.uint8))
            np.save(tmp / f"{split}_y.npy", np.asarray(y, dtype=np.int64))
        meta = {"version": CACHE_VERSION, "classes": decoded.classes, "channels": decoded.channels,
                "image_size": decoded.image_size, "splits": {s: len(x) for s, (x, _) in decoded.splits.items()},
                "skipped": decoded.skipped}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")  # last: marks it complete
        if final.exists():
            shutil.rmtree(final)  # a damaged entry that load() could not remove
        os.rename(tmp, final)
        tmp = None
    except OSError as e:
        if not (final / "meta.json").is_file():  # else another process just wrote the same entry: fine
            warn(f"could not write the dataset cache in {root} ({e}); the next run will decode again")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


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
