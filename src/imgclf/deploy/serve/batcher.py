"""Micro-batching: concurrent requests share one forward pass.

    batcher = MicroBatcher(clf, max_batch=64, max_wait_ms=5, max_queue=512)
    await batcher.start()
    probs = await batcher.probs([img1, img2])      # (H, W, C) uint8 arrays -> (2, num_classes)

The first waiting image opens a window of ``max_wait_ms``; whatever arrives in it (up to ``max_batch``
images) goes through the model together, on one worker thread, so the event loop keeps accepting requests
and the next batch fills while this one runs: throughput grows with load. Images accepted and not yet
answered are bounded by ``max_queue``; past it :class:`Overloaded` is raised (the server answers 503 +
Retry-After) instead of letting latency grow without bound. The server counts a request's images from the
moment it accepts them, before decoding (``with batcher.reserve(n): ... await batcher.probs(arrays,
reserved=True)``), so decoding work is bounded too; the reservation ends however the request does.
"""
from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ...data.tensors import to_tensor
from ...inference import BaseClassifier


class Overloaded(Exception):
    """The queue is full; try again shortly."""


class MicroBatcher:
    def __init__(self, clf: BaseClassifier, max_batch: int = 64, max_wait_ms: float = 5.0, max_queue: int = 512):
        self.clf = clf
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1000.0, max_queue
        self.queued = 0                                   # images reserved: decoding, waiting or in a forward pass
        self.batches = self.images = 0                    # served so far (for /health)
        self._jobs: list[tuple[list[np.ndarray], asyncio.Future]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        # one thread: forward passes never overlap (they would only fight over the same cores)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="imgclf-forward")

    def has_room(self, n: int) -> bool:
        return self.queued + n <= self.max_queue

    @contextlib.contextmanager
    def reserve(self, n: int):
        """Count ``n`` images in the queue for the length of the ``with`` block (on every way out of it:
        an answer, an error, a cancelled task); Overloaded at once when they do not fit."""
        if not self.has_room(n):
            raise Overloaded
        self.queued += n
        try:
            yield
        finally:
            self.queued -= n

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def probs(self, arrays: list[np.ndarray], *, reserved: bool = False) -> np.ndarray:
        """Class probabilities for preprocessed images, computed in a shared batch. ``reserved``: the caller
        already counts them (:meth:`reserve`); otherwise they are counted here, Overloaded when full."""
        if not reserved:
            with self.reserve(len(arrays)):
                return await self.probs(arrays, reserved=True)
        fut = asyncio.get_running_loop().create_future()
        self._jobs.append((arrays, fut))
        self._wake.set()
        return await fut  # cancelled (the request's task was): the future is too, and _run skips the job

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            deadline = loop.time() + self.max_wait
            while sum(len(a) for a, _ in self._jobs) < self.max_batch and (left := deadline - loop.time()) > 0:
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), left)
            self._jobs = [job for job in self._jobs if not job[1].done()]  # no forward pass for the cancelled
            take, n = [], 0
            while self._jobs and (not take or n + len(self._jobs[0][0]) <= self.max_batch):
                take.append(self._jobs.pop(0))
                n += len(take[-1][0])
            if not self._jobs:
                self._wake.clear()
            if not take:
                continue
            x = np.stack([a for arrays, _ in take for a in arrays])
            try:
                probs = await loop.run_in_executor(self._pool, self._forward, x)
            except Exception as e:  # the model failed: every waiting request learns it, the loop goes on
                for _, fut in take:
                    if not fut.done():
                        fut.set_exception(e)
            else:
                self.batches, self.images = self.batches + 1, self.images + n
                i = 0
                for arrays, fut in take:
                    if not fut.done():  # a request cancelled meanwhile has a cancelled future
                        fut.set_result(probs[i:i + len(arrays)])
                    i += len(arrays)

    def _forward(self, x: np.ndarray) -> np.ndarray:
        # the same softmax (and calibration temperature) as BaseClassifier.predict_proba
        logits = self.clf.logits(to_tensor(x), batch_size=len(x))
        return torch.softmax(logits / getattr(self.clf, "temperature", 1.0), dim=1).numpy()
