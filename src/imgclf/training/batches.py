"""Where training batches come from: the epoch's order, and a batch of images normalised, augmented and
resized on the device (airbench's lesson: uint8 images in, whole-batch augmentation on the device).

    batches = InMemoryBatches(x_uint8, y, normalizer, augment, torch.channels_last, cfg=cfg, image_size=32, ...)
    perm = batches.order(g_shuffle)                       # this epoch's order, on the device
    xb = batches.images(perm[:1000], epoch, g_augment, batches.input_size(epoch, epochs))

The loop asks for nothing else, so a source that streams from disk can stand in for this in-memory one.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.nn.functional as F

from ..config import TrainConfig, progressive_sizes
from ..data.tensors import Normalizer
from ..errors import ImgclfError
from ..inference import autocast_context
from .augment import alternating_flip


class InMemoryBatches:
    """The whole training split on the training device as uint8 (N, C, H, W)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, normalizer: Normalizer, augment: Callable,
                 memory_format: torch.memory_format, *, cfg: TrainConfig, image_size: int, alternating_flip: bool,
                 num_classes: int):
        self.x, self.y = x, y
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
        return perm.to(self.x.device)

    def input_sizes(self, epochs: int) -> list[int]:
        """The side of the images in each epoch of a run of ``epochs`` (progressive resizing)."""
        return progressive_sizes(self.progressive, self.image_size, epochs)

    def input_size(self, epoch: int, epochs: int) -> int:
        return self.input_sizes(epochs)[epoch]

    def labels(self, idx: torch.Tensor) -> torch.Tensor:
        return self.y[idx]

    def images(self, idx: torch.Tensor, epoch: int, generator: torch.Generator, size: int) -> torch.Tensor:
        """A training batch: normalised, flipped/augmented with ``generator``, resized to ``size`` (see
        :meth:`input_size`), in the model's memory format (called under the run's autocast)."""
        xb = self.normalizer(self.x[idx])
        if self.flip_bits is not None:
            xb = alternating_flip(xb, self.flip_bits[idx], epoch)
        xb = self.augment(xb, generator)
        if size != xb.shape[-1]:  # progressive resizing: a smaller input early on
            xb = F.interpolate(xb, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return xb.contiguous(memory_format=self.memory_format)

    @torch.no_grad()
    def backbone_features(self, model: torch.nn.Module, batch_size: int, dtype: torch.dtype | None,
                          log: Callable[[str], None]) -> torch.Tensor:
        """forward_features of every training image, computed once for the head-only epochs, in eval mode
        (BatchNorm on its running statistics, as the frozen backbone will be used at validation)."""
        t0, out = time.perf_counter(), []
        was_training = model.training
        model.eval()
        for i in range(0, len(self.x), batch_size):
            xb = self.normalizer(self.x[i:i + batch_size]).contiguous(memory_format=self.memory_format)
            with autocast_context(self.x.device, dtype):
                out.append(model.forward_features(xb).float())
        model.train(was_training)
        log(f"cache  backbone features of {len(self.x):,} images for the head-only epochs "
            f"({time.perf_counter() - t0:.1f}s; augmentation starts with the full fine-tuning)")
        return torch.cat(out)


def steps_per_epoch(n: int, batch_size: int) -> int:
    # Keep a final partial batch (as Keras does) unless it would hold a single image, which
    # BatchNorm cannot normalise in training mode.
    steps = math.ceil(n / batch_size)
    if n % batch_size == 1 and steps > 1:
        steps -= 1
    if n < 2:
        raise ImgclfError(f"only {n} training image(s): need at least 2")
    return steps
