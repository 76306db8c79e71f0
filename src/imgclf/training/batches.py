"""Where training batches come from: the epoch's order, and a batch of images normalised, augmented and
resized on the device (airbench's lesson: uint8 images in, whole-batch augmentation on the device).

    batches = InMemoryBatches(x_uint8, y, normalizer, augment, torch.channels_last, cfg=cfg, image_size=32, ...)
    perm = batches.order(g_shuffle)                       # this epoch's order
    batches.prefetch(perm, first_step, batch_size, world.local_rows)   # streamed: start reading ahead
    xb = batches.images(perm[:1000], epoch, g_augment, batches.input_size(epoch, epochs))

Two sources with one behaviour: InMemoryBatches holds the training split on the device; StreamedBatches reads
each batch from the memory-mapped cache (data/shards.py) in a background thread, a few batches ahead. Both
hand the same uint8 images to the same normalisation and augmentation, so a seed gives the same numbers.
"""
from __future__ import annotations

import contextlib
import math
import queue
import threading
import time
from typing import Callable

import torch
import torch.nn.functional as F

from ..config import TrainConfig, progressive_sizes
from ..data.shards import ImageRows
from ..data.tensors import Normalizer, chunks, to_tensor
from ..errors import ImgclfError
from ..inference import autocast_context, eval_chunk
from .augment import alternating_flip

PREFETCH = 3  # batches read ahead: enough to hide a slow disk read behind a step, a few batches of memory


class _Batches:
    """What both sources share: the order, sizes, class weights and the batch's transformation."""

    def __init__(self, y: torch.Tensor, normalizer: Normalizer, augment: Callable, memory_format: torch.memory_format,
                 *, cfg: TrainConfig, image_size: int, alternating_flip: bool, num_classes: int,
                 device: torch.device):
        self.y, self.device = y, device
        self.normalizer, self.augment, self.memory_format = normalizer, augment, memory_format
        self.progressive, self.image_size = cfg.progressive, image_size
        self.steps_per_epoch = steps_per_epoch(len(y), cfg.batch_size)
        counts = torch.bincount(y, minlength=num_classes).float()
        # inverse-frequency weights, normalised so a balanced dataset gets all ones
        inv = torch.where(counts > 0, len(y) / (num_classes * counts.clamp(min=1)), 0.0)
        self.loss_weight = inv.to(y.device) if cfg.class_weights == "auto" else None
        self.sample_weight = inv[y].cpu() if cfg.balanced_sampling else None
        # which images start mirrored under alternating flips: fixed by the seed, so nothing to save
        # (on the training device, so that a step indexes it without a copy back to the host)
        self.flip_bits = ((torch.rand(len(y), generator=torch.Generator().manual_seed(cfg.seed + 2)) < 0.5)
                          .to(y.device) if alternating_flip else None)

    def __len__(self) -> int:
        return len(self.y)

    def order(self, generator: torch.Generator) -> torch.Tensor:
        """This epoch's image indices, on the device: a permutation, or with --balanced-sampling every class
        equally often, drawn with replacement."""
        n = len(self.y)
        if self.sample_weight is not None:
            perm = torch.multinomial(self.sample_weight, n, replacement=True, generator=generator)
        else:
            perm = torch.randperm(n, generator=generator)
        return perm.to(self.device)

    def prefetch(self, perm: torch.Tensor, first_step: int, batch_size: int,
                 local: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """The epoch's batches from ``first_step`` on will be asked for in order (``local``: this process's
        rows of a global batch); a source that reads from disk starts reading them."""

    def close(self) -> None:
        """Stop any reading ahead (the run is over)."""

    def input_sizes(self, epochs: int) -> list[int]:
        """The side of the images in each epoch of a run of ``epochs`` (progressive resizing)."""
        return progressive_sizes(self.progressive, self.image_size, epochs)

    def input_size(self, epoch: int, epochs: int) -> int:
        return self.input_sizes(epochs)[epoch]

    def labels(self, idx: torch.Tensor) -> torch.Tensor:
        return self.y[idx]

    def raw(self, idx: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) uint8 images at ``idx``, on the device, at the model's input size."""
        raise NotImplementedError

    def images(self, idx: torch.Tensor, epoch: int, generator: torch.Generator, size: int) -> torch.Tensor:
        """A training batch: normalised, flipped/augmented with ``generator``, resized to ``size`` (see
        :meth:`input_size`), in the model's memory format (called under the run's autocast)."""
        xb = self.normalizer(self._batch(idx))
        if self.flip_bits is not None:
            xb = alternating_flip(xb, self.flip_bits[idx], epoch)
        xb = self.augment(xb, generator)
        if size != xb.shape[-1]:  # progressive resizing: a smaller input early on
            xb = F.interpolate(xb, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return xb.contiguous(memory_format=self.memory_format)

    def _batch(self, idx: torch.Tensor) -> torch.Tensor:
        return self.raw(idx)

    def _all(self, batch_size: int):
        """(N, C, H, W) uint8 tensors on the device over every training image in order, a batch at a time."""
        raise NotImplementedError

    @torch.no_grad()
    def backbone_features(self, model: torch.nn.Module, batch_size: int, dtype: torch.dtype | None,
                          log: Callable[[str], None]) -> torch.Tensor:
        """forward_features of every training image, computed once for the head-only epochs, in eval mode
        (BatchNorm on its running statistics, as the frozen backbone will be used at validation)."""
        t0, out = time.perf_counter(), []
        was_training = model.training
        model.eval()
        chunk = eval_chunk(batch_size, self.image_size ** 2, self.device)
        for xb in self._all(chunk):
            xb = self.normalizer(xb).contiguous(memory_format=self.memory_format)
            with autocast_context(self.device, dtype):
                out.append(model.forward_features(xb).float())
        model.train(was_training)
        log(f"cache  backbone features of {len(self):,} images for the head-only epochs "
            f"({time.perf_counter() - t0:.1f}s; augmentation starts with the full fine-tuning)")
        return torch.cat(out)


class InMemoryBatches(_Batches):
    """The whole training split on the training device as uint8 (N, C, H, W); ``big``: the same images
    stored larger, which training batches are cropped from (photos, see setup.PHOTO_MARGIN)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, *args, big: torch.Tensor | None = None, **kwargs):
        super().__init__(y, *args, device=x.device, **kwargs)
        self.x, self.big = x, big

    def raw(self, idx: torch.Tensor) -> torch.Tensor:
        return self.x[idx]

    def _batch(self, idx: torch.Tensor) -> torch.Tensor:
        return self.x[idx] if self.big is None else self.big[idx]

    def _all(self, batch_size: int):
        for i in range(0, len(self.x), batch_size):
            yield self.x[i:i + batch_size]


class StreamedBatches(_Batches):
    """The training split stays in the memory-mapped cache; each batch is gathered from it (into pinned
    memory and copied without blocking, on CUDA) by a background thread, PREFETCH batches ahead."""

    def __init__(self, rows: ImageRows, y: torch.Tensor, *args, device: torch.device, big: ImageRows | None = None,
                 **kwargs):
        super().__init__(y, *args, device=device, **kwargs)
        self.rows, self.big = rows, big
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(PREFETCH)

    def raw(self, idx: torch.Tensor) -> torch.Tensor:
        return self._load(idx.cpu())

    def prefetch(self, perm, first_step, batch_size, local) -> None:
        self.close()
        perm = perm.cpu()
        steps = [local(perm[s * batch_size:(s + 1) * batch_size]) for s in range(first_step, self.steps_per_epoch)]
        self._stop, self._queue = threading.Event(), queue.Queue(PREFETCH)
        self._thread = threading.Thread(target=self._read_ahead, args=(steps, self._stop, self._queue),
                                        name="imgclf-prefetch", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop reading ahead (a new epoch, or the end of the run)."""
        if self._thread is not None:
            self._stop.set()
            while self._thread.is_alive():
                with contextlib.suppress(queue.Empty):
                    self._queue.get(timeout=0.05)  # unblock a put
            self._thread = None

    def _read_ahead(self, steps, stop: threading.Event, out: queue.Queue) -> None:
        for idx in steps:
            if stop.is_set():
                return
            try:
                item = (idx, self._load(idx, self.big))
            except Exception as e:  # noqa: BLE001 -- handed to the training thread, which raises it
                item = (idx, e)
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue

    def _batch(self, idx: torch.Tensor) -> torch.Tensor:
        if self._thread is not None:
            try:
                want, got = self._queue.get(timeout=600)
            except queue.Empty:
                want, got = None, None
            if isinstance(got, Exception):
                raise got
            if want is not None and len(want) == len(idx) and torch.equal(want, idx.cpu()):
                return got
            self.close()  # asked for something else than read ahead: read on demand from here
        return self._load(idx.cpu(), self.big)

    def _load(self, idx: torch.Tensor, rows: ImageRows | None = None) -> torch.Tensor:
        x = torch.from_numpy((self.rows if rows is None else rows)[idx.numpy()])
        if self.device.type == "cuda":
            x = x.pin_memory()
        return x.to(self.device, non_blocking=True).permute(0, 3, 1, 2)

    def _all(self, batch_size: int):
        for _, part in chunks(self.rows, batch_size):
            for i in range(0, len(part), batch_size):
                yield to_tensor(part[i:i + batch_size], self.device)


def steps_per_epoch(n: int, batch_size: int) -> int:
    # Keep a final partial batch (as Keras does) unless it would hold a single image, which
    # BatchNorm cannot normalise in training mode.
    steps = math.ceil(n / batch_size)
    if n % batch_size == 1 and steps > 1:
        steps -= 1
    if n < 2:
        raise ImgclfError(f"only {n} training image(s): need at least 2")
    return steps
