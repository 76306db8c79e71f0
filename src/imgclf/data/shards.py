"""Decoded images on disk as fixed-size uint8 shards, read back memory-mapped: datasets larger than memory.

    writer = ShardWriter(folder, (32, 32, 3))      # folder=None keeps the shards in memory instead
    pos = writer.append(image)                       # -> the image's position in the pool
    records = writer.close()                         # [{"file", "n", "bytes", "sha256"}] of the shards written
    rows = open_shards(folder, records, (32, 32, 3)) # -> ImageRows over memory-mapped shards
    rows.select(idx)[:1000]                          # a lazy subset; indexing reads (N, H, W, C) uint8

Each shard is an .npy file of SHARD_BYTES at most (the last one shorter), written with ordinary writes: a
full disk raises OSError at once (a write into a memory map would kill the process with SIGBUS instead).
The writer holds one shard in memory, so decoding needs the same memory for 10 thousand images or 10
million. Reading opens the files as read-only maps (checked, nothing read) and reads the rows asked for with
plain reads: the operating system's page cache holds what is used, once per machine however many processes
read it, and gives it back under memory pressure.

Why not safetensors or WebDataset here: a .npy file maps straight onto an (N, H, W, C) array with numpy
alone, and random access by image (what a seeded permutation needs) is a slice of the map; tar shards read
in order only.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

SHARD_BYTES = 64 << 20  # per shard: big enough that a shard's open and map cost nothing, small enough to buffer


class ShardWriter:
    """Appends (H, W, C) uint8 images to shards of a fixed image count, in ``folder`` (or in memory)."""

    def __init__(self, folder: Path | None, shape: Sequence[int], shard_bytes: int = SHARD_BYTES,
                 name: str = "images"):
        self.folder, self.shape, self.name = folder, tuple(int(s) for s in shape), name
        self.per_shard = max(1, shard_bytes // int(np.prod(self.shape)))
        self._buf = np.empty((self.per_shard, *self.shape), dtype=np.uint8)
        self._fill = 0
        self.records: list[dict] = []
        self.arrays: list[np.ndarray] = []  # in memory: the shards themselves
        self.count = 0

    def append(self, image: np.ndarray) -> int:
        """Copy one image in (a grey (H, W, 1) image broadcasts into 3 equal channels); -> its position."""
        self._buf[self._fill] = image
        self._fill += 1
        self.count += 1
        if self._fill == self.per_shard:
            self._flush()
        return self.count - 1

    def extend(self, images: np.ndarray) -> np.ndarray:
        """Append an (N, H, W, C) array, a shard's worth at a time; -> the images' positions."""
        start, done = self.count, 0
        while done < len(images):
            k = min(self.per_shard - self._fill, len(images) - done)
            self._buf[self._fill:self._fill + k] = images[done:done + k]
            self._fill, self.count, done = self._fill + k, self.count + k, done + k
            if self._fill == self.per_shard:
                self._flush()
        return np.arange(start, self.count, dtype=np.int64)

    def close(self) -> list[dict]:
        if self._fill:
            self._flush()
        self._buf = None
        return self.records

    def discard(self) -> None:
        """Delete what was written (a pass that has to start again)."""
        for rec in self.records:
            (self.folder / rec["file"]).unlink(missing_ok=True)
        self.records, self.arrays, self._buf = [], [], None

    def rows(self) -> ImageRows:
        """The images written so far (after :meth:`close`): in memory, or mapped from the folder."""
        if self.folder is None:
            return ImageRows(self.arrays, self.shape, self.per_shard)
        return open_shards(self.folder, self.records, self.shape)

    def _flush(self) -> None:
        part = self._buf[:self._fill]
        if self.folder is None:
            self.arrays.append(part.copy())
        else:
            name = f"{self.name}-{len(self.records):05d}.npy"
            self.records.append(write_npy(self.folder / name, part))
        self._fill = 0


def write_npy(path: Path, array: np.ndarray) -> dict:
    """Write ``array`` as .npy with plain writes and fsync; -> {"file", "n", "bytes", "sha256"}."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        np.lib.format.write_array(_Hashing(f, h), np.ascontiguousarray(array), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    return {"file": path.name, "n": int(len(array)), "bytes": path.stat().st_size, "sha256": h.hexdigest()}


class _Hashing:
    """A write-only file that hashes what passes through (one pass over the bytes, not two)."""

    def __init__(self, f, h):
        self.f, self.h = f, h

    def write(self, data) -> int:
        self.h.update(data)
        return self.f.write(data)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def open_shards(folder: Path, records: list[dict], shape: Sequence[int]) -> ImageRows:
    """Map the shards listed in ``records`` read-only; ValueError when one does not hold what it should."""
    arrays = []
    for rec in records:
        a = np.load(folder / rec["file"], mmap_mode="r", allow_pickle=False)
        if a.dtype != np.uint8 or a.shape != (rec["n"], *shape):
            raise ValueError(f"{rec['file']} is {a.dtype} {a.shape}, expected uint8 {(rec['n'], *shape)}")
        arrays.append(a)
    per = records[0]["n"] if records else 1
    if any(r["n"] != per for r in records[:-1]) or (records and records[-1]["n"] > per):
        raise ValueError("shards of unequal size")
    return ImageRows(arrays, shape, per)


class ImageRows:
    """A read-only sequence of (H, W, C) uint8 images kept in shards (memory-mapped or in memory), seen
    through an optional index. Indexing with an int gives one image; with a slice or an index array, an
    (N, H, W, C) array gathered from the shards (the one place where pixels are read); :meth:`select`
    gives a lazy subset. ``np.asarray(rows)`` reads every image into memory."""

    def __init__(self, shards: list[np.ndarray], shape: Sequence[int], per_shard: int,
                 index: np.ndarray | None = None):
        self.shards, self.image_shape, self.per_shard = shards, tuple(shape), per_shard
        self.index = index
        self._n = sum(len(s) for s in shards) if index is None else len(index)

    @classmethod
    def from_array(cls, x: np.ndarray) -> ImageRows:
        return cls([x], x.shape[1:], max(1, len(x)))

    @property
    def shape(self) -> tuple[int, ...]:
        return (self._n, *self.image_shape)

    dtype = np.dtype(np.uint8)
    ndim = 4

    @property
    def nbytes(self) -> int:
        return self._n * int(np.prod(self.image_shape))

    @property
    def mapped(self) -> bool:
        """Read from files (memory maps) rather than held in this process's memory."""
        return any(isinstance(s, np.memmap) for s in self.shards)

    def __len__(self) -> int:
        return self._n

    def select(self, idx) -> ImageRows:
        """The images at ``idx`` (an index array, or a slice) as a lazy ImageRows: nothing is read."""
        idx = np.arange(self._n, dtype=np.int64)[idx] if isinstance(idx, slice) else np.asarray(idx, np.int64)
        return ImageRows(self.shards, self.image_shape, self.per_shard,
                         idx if self.index is None else self.index[idx])

    def __getitem__(self, key):
        if isinstance(key, tuple):  # rows first, then the rest on the gathered images: x[idx, :, :, 0]
            if not key or key[0] is Ellipsis:
                return self[:][key]
            return self[key[0]][(slice(None), *key[1:])] if not isinstance(key[0], (int, np.integer)) \
                else self[key[0]][key[1:]]
        if isinstance(key, (int, np.integer)):
            return self._gather(self._positions(np.asarray([key], np.int64)))[0]
        if isinstance(key, slice):
            key = np.arange(self._n, dtype=np.int64)[key]
        elif hasattr(key, "numpy"):  # a CPU torch tensor of indices
            key = key.numpy()
        key = np.asarray(key)
        if key.dtype == bool:
            key = np.flatnonzero(key)
        return self._gather(self._positions(key.astype(np.int64, copy=False)))

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def __iter__(self):
        for start in range(0, self._n, 1024):
            yield from self[start:start + 1024]

    def _positions(self, key: np.ndarray) -> np.ndarray:
        if key.size and (key.min() < -self._n or key.max() >= self._n):
            raise IndexError(f"index out of range for {self._n} images")
        key = np.where(key < 0, key + self._n, key)
        return key if self.index is None else self.index[key]

    def _gather(self, pos: np.ndarray) -> np.ndarray:
        out = np.empty((len(pos), *self.image_shape), dtype=np.uint8)
        # shard by shard, in file order: reads from disk stay as sequential as the positions allow
        order = np.argsort(pos, kind="stable")
        sorted_pos = pos[order]
        shard = sorted_pos // self.per_shard
        bounds = np.flatnonzero(np.diff(shard)) + 1
        for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(pos)]):
            if lo == hi:
                continue
            s = int(shard[lo])
            out[order[lo:hi]] = self._rows(self.shards[s], sorted_pos[lo:hi] - s * self.per_shard)
        return out

    def _rows(self, shard: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Sorted rows of one shard. A mapped shard is read with plain reads, one per run of consecutive rows:
        through the map, each page read would stay mapped into this process (with up to 16 neighbours the
        kernel maps around a fault), counted in its RSS for as long as the map lives, and a random batch
        of 256 CIFAR-sized rows is read 1.5x faster this way."""
        if not isinstance(shard, np.memmap) or shard.filename is None:
            return shard[rows]
        size = int(np.prod(self.image_shape))
        out = np.empty((len(rows), *self.image_shape), dtype=np.uint8)
        flat = memoryview(out.reshape(-1))
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        with open(shard.filename, "rb", buffering=0) as f:
            for a, b in zip(np.r_[0, breaks], np.r_[breaks, len(rows)]):
                want = flat[a * size:b * size]
                got = os.preadv(f.fileno(), [want], shard.offset + int(rows[a]) * size)
                if got != len(want):
                    raise OSError(f"{shard.filename}: short read ({got} of {len(want)} bytes); the file changed")
        return out


def select(x, idx):
    """``x.select(idx)`` for ImageRows, ``x[idx]`` for a plain array."""
    return x.select(idx) if isinstance(x, ImageRows) else x[idx]
