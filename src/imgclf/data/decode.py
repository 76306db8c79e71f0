"""Decode many images into uint8 arrays, on every core once there are enough of them.

    with Decoder(size=32, channels=None, progress=True) as dec:
        dec.add("train/cat/1.jpg", "/data/train/cat/1.jpg", "/data/train/cat/1.jpg")  # key, label, path or bytes
        results = dec.finish()                      # {key: DecodedImage}

Images may be added while an archive is still being read: chunks go to the worker processes as they fill,
so reading and decoding overlap. Each image goes through the same open_image / to_channels /
resize_center_crop steps as ``preprocess_image``, so training pixels equal predict-time pixels.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import NamedTuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..errors import ImgclfError
from .images import GREY_MODES, open_image, resize_center_crop, stored_size, to_array, to_channels

# Below this many images, starting worker processes (~0.1 s) costs more than it saves.
PARALLEL_MIN = 2000
# Images a worker decodes per task: big enough that pickling overhead is small, small enough that
# the progress bar moves and both workers finish at about the same time.
CHUNK = 500
# With image sizes that vary, a folder's default side is the most common shorter side, but no more than this:
# beyond 64 px the small CNNs here gain little and the decoded arrays (and training) grow quadratically.
MAX_DEFAULT_SIZE = 64


class DecodedImage(NamedTuple):
    grey: bool                  # the file's own mode is greyscale (see images.GREY_MODES)
    width: int                  # size as stored (after EXIF rotation), before any resize
    height: int
    pixels: np.ndarray | None   # (S, S, c) uint8, c = channels or the image's own 1/3; None: see decode_chunk
    error: str | None           # ImgclfError message when the file could not be decoded


def decode_chunk(items: list[tuple[str, str | bytes]], size: int | None,
                 channels: int | None) -> list[DecodedImage]:
    """Decode (label, path-or-bytes) pairs. ``size=None`` keeps each image's native size, but only while
    the images are square and agree with the first one: a dataset of mixed sizes is decoded again at one
    chosen size, and holding every large original meanwhile would waste memory. ``channels=None`` keeps
    each image's own 1 (grey) or 3 channels; the caller widens grey ones when the dataset has colour."""
    out = []
    first_size = None
    for label, src in items:
        try:
            # Without a size, a large JPEG is still decoded only as large as a size chosen later could be
            # (checked whole all the same); its pixels are then not native ones, and a second pass decodes it.
            img = open_image(src, name=label, min_side=size or MAX_DEFAULT_SIZE)
        except ImgclfError as e:
            out.append(DecodedImage(False, 0, 0, None, str(e)))
            continue
        w, h = stored_size(img)
        grey = img.mode in GREY_MODES
        if size is None:
            first_size = first_size or (w, h)
            if w != h or (w, h) != first_size or img.size != (w, h):
                out.append(DecodedImage(grey, w, h, None, None))
                continue
        try:
            img = to_channels(img, channels or (1 if grey else 3))
        except ImgclfError as e:
            out.append(DecodedImage(grey, w, h, None, f"{label}: {e}"))
            continue
        out.append(DecodedImage(grey, w, h, to_array(resize_center_crop(img, size or w)), None))
    return out


def _decode_packed(items, size, channels) -> tuple[list[tuple], np.ndarray]:
    """decode_chunk for a worker process: the pixels travel back as one flat array, since pickling
    hundreds of tiny arrays costs more than decoding them."""
    decoded = decode_chunk(items, size, channels)
    arrays = [d.pixels for d in decoded if d.pixels is not None]
    flat = np.concatenate([a.ravel() for a in arrays]) if arrays else np.zeros(0, np.uint8)
    return [(*d[:3], None if d.pixels is None else d.pixels.shape, d.error) for d in decoded], flat


def _unpack(records: list[tuple], flat: np.ndarray) -> list[DecodedImage]:
    out, offset = [], 0
    for grey, w, h, shape, error in records:
        pixels = None
        if shape is not None:
            n = shape[0] * shape[1] * shape[2]
            pixels = flat[offset:offset + n].reshape(shape)
            offset += n
        out.append(DecodedImage(grey, w, h, pixels, error))
    return out


class Decoder:
    """Collects images to decode; decodes them serially, or in a process pool once PARALLEL_MIN are in."""

    def __init__(self, *, size: int | None, channels: int | None, progress: bool, total: int | None = None,
                 workers: int | None = None):
        self.size, self.channels = size, channels
        self._workers = workers or _usable_cpus()
        self._pending: list[tuple[str, str, str | bytes]] = []
        self._jobs: list[tuple[list[str], list[tuple], Future] | None] = []
        self._harvested = 0
        self._results: dict[str, DecodedImage] = {}
        self._pool: ProcessPoolExecutor | None = None
        self._broken = False  # the worker pool died: decode the rest here
        self._bar = tqdm(total=total, desc="decode", unit="img", disable=not progress, file=sys.stderr,
                         dynamic_ncols=True)

    def add(self, key: str, label: str, src: str | bytes) -> None:
        self._pending.append((key, label, src))
        if self._broken:
            return
        if self._pool is None and self._workers > 1 and len(self._pending) >= PARALLEL_MIN:
            self._pool = ProcessPoolExecutor(self._workers, mp_context=_fork_context(), initializer=_lower_priority)
        if self._pool is not None and len(self._pending) >= CHUNK:
            self._submit()
            if self._pool is None:
                return
            self._harvest(wait=False)

    def finish(self) -> dict[str, DecodedImage]:
        """Decode what is left, wait for the workers; -> {key: DecodedImage}."""
        if self._pool is not None:
            self._submit()
        self._harvest(wait=True)  # what the workers did (or, if their pool broke, what is redone here)
        for start in range(0, len(self._pending), CHUNK):
            part = self._pending[start:start + CHUNK]
            decoded = decode_chunk([(label, src) for _, label, src in part], self.size, self.channels)
            self._store([key for key, _, _ in part], decoded)
        self._pending = []
        self.close()
        return self._results

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._bar.close()

    def __enter__(self) -> Decoder:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _submit(self) -> None:
        while self._pending:
            part = self._pending[:CHUNK]
            items = [(label, src) for _, label, src in part]
            try:
                future = self._pool.submit(_decode_packed, items, self.size, self.channels)
            except BrokenProcessPool:
                self._mark_broken()  # what is still pending gets decoded here, in finish()
                return
            self._jobs.append(([key for key, _, _ in part], items, future))
            self._pending = self._pending[CHUNK:]

    def _harvest(self, *, wait: bool) -> None:
        # In submission order, so results (and the bar) advance without a separate completion thread.
        while self._harvested < len(self._jobs):
            keys, items, future = self._jobs[self._harvested]
            if not wait and not future.done():
                return
            try:
                decoded = _unpack(*future.result())
            except (BrokenProcessPool, CancelledError):
                decoded = self._decode_here(items)
            self._store(keys, decoded)
            self._jobs[self._harvested] = None  # let the finished chunk's memory go
            self._harvested += 1

    def _decode_here(self, items: list[tuple]) -> list[DecodedImage]:
        self._mark_broken()
        return decode_chunk(items, self.size, self.channels)

    def _mark_broken(self) -> None:
        """The worker pool died; the rest is decoded in this process. The usual cause: a script without an
        ``if __name__ == "__main__":`` guard, which every worker process re-runs on start and fails in."""
        if self._broken:
            return
        self._broken = True
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        tqdm.write("warning: the image-decoding worker processes stopped, so decoding goes on in this "
                   "process (slower). If you called imgclf from your own script, put its code under "
                   "`if __name__ == \"__main__\":` so worker processes can start.", file=sys.stderr)

    def _store(self, keys: list[str], decoded: list[DecodedImage]) -> None:
        self._results.update(zip(keys, decoded))
        self._bar.update(len(keys))


def preprocess_arrays(x: np.ndarray, size: int, channels: int, *, progress: bool) -> np.ndarray:
    """(N, H, W, C) uint8 arrays (e.g. parsed CIFAR batches) -> (N, size, size, channels), through the same
    channel conversion and resize as preprocess_image."""
    out = np.empty((len(x), size, size, channels), dtype=np.uint8)
    for i in tqdm(range(len(x)), desc="resize", unit="img", disable=not progress, file=sys.stderr):
        arr = x[i]
        img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
        out[i] = to_array(resize_center_crop(to_channels(img, channels), size))
    return out


def _lower_priority() -> None:
    # The process reading an archive feeds every worker; when it competes with them for the cores on
    # equal terms the workers end up waiting for input. A nicer worker yields the core to it instead.
    with contextlib.suppress(OSError, AttributeError):
        os.nice(5)


def _usable_cpus() -> int:
    try:
        n = len(os.sched_getaffinity(0))  # respects taskset / container CPU sets
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def _fork_context():
    # Not plain "fork": the parent is multi-threaded by now (torch, onnxruntime, tqdm), and a forked child
    # inherits any lock another thread held at that instant, locked forever; workers then hang in a
    # futex wait (seen in CI). A fork server is a clean single-threaded process, started once, that
    # imports this module once and then forks workers in milliseconds.
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx
