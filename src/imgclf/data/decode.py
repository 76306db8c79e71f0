"""Decode many images into uint8 arrays, on every core once there are enough of them, in a stream.

    with Decoder(size=32, channels=None, progress=True) as dec:
        for key, image in dec.add("train/cat/1.jpg", "/data/train/cat/1.jpg", "/data/train/cat/1.jpg"):
            ...                                     # (key, DecodedImage) in the order added, as they are ready
        for key, image in dec.finish():
            ...

Images may be added while an archive is still being read: chunks go to the worker processes as they fill,
so reading and decoding overlap, and at most a few chunks are in flight, so memory stays bounded however
many images there are. ``Decoder(..., probe=True)`` reads only each image's header (size, mode), for the
pass that chooses a folder's size and channels. Each image goes through the same open_image / to_channels /
resize_center_crop steps as ``preprocess_image``, so training pixels equal predict-time pixels.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import CancelledError, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import NamedTuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..errors import ImgclfError
from .images import (
    GREY_MODES,
    image_header,
    open_image,
    resize_center_crop,
    stored_size,
    to_array,
    to_channels,
    to_pixels,
)

# Below this many images, starting worker processes (~0.1 s) costs more than it saves; they start earlier
# when the images waiting to be decoded hold START_BYTES (large photos from an archive): memory stays bounded.
PARALLEL_MIN = 2000
START_BYTES = 256 << 20
# Images a worker decodes per task: big enough that pickling overhead is small, small enough that
# the progress bar moves and both workers finish at about the same time.
CHUNK = 500
# A chunk of archive members carries their bytes to a worker: it closes at this many bytes, whatever the count.
CHUNK_BYTES = 16 << 20
# Chunks in flight per worker: enough to keep every worker busy while results are collected, few enough that
# memory does not grow with the dataset.
IN_FLIGHT_PER_WORKER = 2
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
            pixels = to_pixels(img, channels or (1 if grey else 3), size or w)
        except ImgclfError as e:
            out.append(DecodedImage(grey, w, h, None, f"{label}: {e}"))
            continue
        out.append(DecodedImage(grey, w, h, pixels, None))
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


def probe_chunk(items: list[tuple[str, str | bytes]], size: int | None,
                channels: int | None) -> list[DecodedImage]:
    """Headers only: (grey, width, height) of each image without decoding its pixels (pixels is None); an
    error for a file that is not an image at all. Sizes ignore EXIF rotation, which never changes the
    shorter side or whether an image is square."""
    out = []
    for label, src in items:
        try:
            out.append(DecodedImage(*image_header(src, name=label), None, None))
        except ImgclfError as e:
            out.append(DecodedImage(False, 0, 0, None, str(e)))
    return out


def _probe_packed(items, size, channels):
    return probe_chunk(items, size, channels), np.zeros(0, np.uint8)


def _unpack_probe(records, flat):
    return records


class Decoder:
    """Decodes (or, with probe=True, reads the headers of) the images added, serially or in a process pool
    once PARALLEL_MIN are in; hands results back in the order added."""

    def __init__(self, *, size: int | None, channels: int | None, progress: bool, total: int | None = None,
                 workers: int | None = None, probe: bool = False):
        self.size, self.channels = size, channels
        self._local, self._remote, self._unpack_fn = ((probe_chunk, _probe_packed, _unpack_probe) if probe else
                                                      (decode_chunk, _decode_packed, _unpack))
        self._workers = workers or _usable_cpus()
        self._pending: list[tuple[str, str, str | bytes]] = []
        self._pending_bytes = 0
        self._jobs: deque = deque()  # (keys, items, future) in submission order
        self._pool: ProcessPoolExecutor | None = None
        self._broken = False  # the worker pool died: decode the rest here
        self._bar = tqdm(total=total, desc="scan" if probe else "decode", unit="img", disable=not progress,
                         file=sys.stderr, dynamic_ncols=True)

    def add(self, key: str, label: str, src: str | bytes) -> list[tuple[str, DecodedImage]]:
        """Queue one image; -> the results that are ready now (waits when too many chunks are in flight)."""
        self._pending.append((key, label, src))
        self._pending_bytes += len(src) if isinstance(src, (bytes, bytearray)) else 0
        full = len(self._pending) >= CHUNK or self._pending_bytes >= CHUNK_BYTES
        if self._broken or self._workers < 2:
            return self._here(self._take()) if full else []
        if self._pool is None:
            if len(self._pending) < PARALLEL_MIN and self._pending_bytes < START_BYTES:
                return []
            context = _fork_context()
            self._pool = ProcessPoolExecutor(self._workers, mp_context=context, initializer=_worker_start,
                                             initargs=(os.getpid(), context is not None))
        if not full:
            return []
        while self._pending:
            self._submit(self._take())
        return self._harvest(wait_for=max(0, len(self._jobs) - IN_FLIGHT_PER_WORKER * self._workers))

    def take_pending(self) -> list[tuple[str, str, str | bytes]]:
        """The images added but not yet handed to a worker, removed: their caller has changed its mind."""
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        self._bar.update(len(pending))
        return pending

    def finish(self) -> list[tuple[str, DecodedImage]]:
        """What is left, in order, once the workers are done."""
        if self._pool is not None and not self._broken:
            while self._pending:
                self._submit(self._take())
        out = self._harvest(wait_for=len(self._jobs))
        while self._pending:
            out += self._here(self._take())
        self.close()
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._bar.close()

    def __enter__(self) -> Decoder:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _take(self) -> list[tuple[str, str, str | bytes]]:
        part, n, size = [], 0, 0
        for key, label, src in self._pending:
            if part and (n >= CHUNK or size >= CHUNK_BYTES):
                break
            part.append((key, label, src))
            n += 1
            size += len(src) if isinstance(src, (bytes, bytearray)) else 0
        self._pending = self._pending[n:]
        self._pending_bytes -= size
        return part

    def _here(self, part) -> list[tuple[str, DecodedImage]]:
        results = self._local([(label, src) for _, label, src in part], self.size, self.channels)
        return self._done([key for key, _, _ in part], results)

    def _submit(self, part) -> None:
        items = [(label, src) for _, label, src in part]
        future = None
        if not self._broken:
            try:
                future = self._pool.submit(self._remote, items, self.size, self.channels)
            except BrokenProcessPool:
                self._mark_broken()
        self._jobs.append(([key for key, _, _ in part], items, future))

    def _harvest(self, *, wait_for: int) -> list[tuple[str, DecodedImage]]:
        # In submission order, so results (and the bar) advance without a separate completion thread.
        out = []
        while self._jobs:
            keys, items, future = self._jobs[0]
            if wait_for <= 0 and future is not None and not future.done():
                break
            try:
                if future is None:
                    raise CancelledError
                results = self._unpack_fn(*future.result())
            except (BrokenProcessPool, CancelledError):
                self._mark_broken()
                results = self._local(items, self.size, self.channels)
            self._jobs.popleft()
            wait_for -= 1
            out += self._done(keys, results)
        return out

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

    def _done(self, keys: list[str], results: list[DecodedImage]) -> list[tuple[str, DecodedImage]]:
        self._bar.update(len(keys))
        return list(zip(keys, results))


def preprocess_arrays(x: np.ndarray, size: int, channels: int, *, progress: bool) -> np.ndarray:
    """(N, H, W, C) uint8 arrays (e.g. parsed CIFAR batches) -> (N, size, size, channels), through the same
    channel conversion and resize as preprocess_image."""
    out = np.empty((len(x), size, size, channels), dtype=np.uint8)
    for i in tqdm(range(len(x)), desc="resize", unit="img", disable=not progress, file=sys.stderr):
        arr = x[i]
        img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
        out[i] = to_array(resize_center_crop(to_channels(img, channels), size))
    return out


def _worker_start(parent: int, fork_server: bool) -> None:
    _lower_priority()
    threading.Thread(target=_exit_with, args=(parent, fork_server), name="imgclf-parent-watch", daemon=True).start()


def _exit_with(parent: int, fork_server: bool) -> None:
    """Leave once the process that started the decoding is gone. Killed outright (out of memory, kill -9), it
    cannot shut its pool down, and Python's fork server and its workers would wait for work forever, holding
    a few hundred MB; the fork server, which only this process used, goes too."""
    while True:
        time.sleep(1)
        try:
            os.kill(parent, 0)
        except ProcessLookupError:
            server = os.getppid()
            if fork_server and server not in (1, parent):
                with contextlib.suppress(OSError):
                    os.kill(server, signal.SIGKILL)
            os._exit(1)
        except PermissionError:  # the pid now belongs to another user's process: ours is gone
            os._exit(1)


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
