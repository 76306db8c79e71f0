"""uint8 image arrays -> normalised float batches on the training device.

    x = to_tensor(ds.train.x, device)            # (N, C, H, W) uint8, channels-last in memory
    norm = Normalizer(spec.mean, spec.std, device)
    xb = norm(x[idx])                             # float32, (x / 255 - mean) / std
    for start, part in chunks(ds.test.x, 8192):   # a streamed pass: one chunk of images in memory at a time
        ...
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def to_tensor(x: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """(N, H, W, C) uint8 array -> (N, C, H, W) uint8 tensor on ``device``.

    The permute is a view, so in memory the tensor stays NHWC: exactly PyTorch's channels-last layout,
    which CPU and GPU convolution kernels prefer; no copy is made on the CPU."""
    return torch.from_numpy(np.ascontiguousarray(x)).to(device).permute(0, 3, 1, 2)


def to_device(images, device: torch.device | str) -> torch.Tensor:
    """:func:`to_tensor` of (N, H, W, C) uint8 images (an array or ImageRows) read into memory: on a GPU a
    chunk at a time, so the host never holds a second whole copy."""
    device = torch.device(device)
    if device.type == "cpu":
        return to_tensor(np.asarray(images))
    out = torch.empty(images.shape, dtype=torch.uint8, device=device)
    for start, part in chunks(images):
        out[start:start + len(part)] = torch.from_numpy(part).to(device)
    return out.permute(0, 3, 1, 2)


# Images read per chunk by a streamed pass over a split (evaluation, calibration): 8,192 CIFAR images are
# 25 MB, 8,192 photos at 224 px 1.2 GB; split sizes beyond this are never held in memory at once.
CHUNK_BYTES = 256 << 20


def chunks(images, batch_size: int = 1):
    """(start, (n, H, W, C) uint8 array) over consecutive chunks of ``images`` (an array or ImageRows): about
    CHUNK_BYTES each, a whole number of ``batch_size`` batches, so batched passes split where they would."""
    per_image = max(1, int(np.prod(images.shape[1:])))
    size = batch_size * max(1, CHUNK_BYTES // (per_image * batch_size))
    for start in range(0, len(images), size):
        yield start, np.asarray(images[start:start + size])


def channel_stats(x: np.ndarray, max_images: int = 10_000) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std on the 0..1 scale of (N, H, W, C) uint8 images (a strided sample
    of at most ``max_images`` keeps this fast and deterministic on big datasets)."""
    step = max(1, len(x) // max_images)
    picks = np.arange(0, len(x), step)
    total, squares, n = np.zeros(x.shape[-1]), np.zeros(x.shape[-1]), 0
    for start in range(0, len(picks), 500):  # 500 images at a time: photos at 224 px stay at 75 MB of pixels
        part = np.asarray(x[picks[start:start + 500]]).reshape(-1, x.shape[-1]).astype(np.float64) / 255.0
        total, squares, n = total + part.sum(axis=0), squares + (part * part).sum(axis=0), n + len(part)
    mean = total / max(n, 1)
    std = np.sqrt(np.maximum(squares / max(n, 1) - mean * mean, 0.0))
    std = np.where(std < 1e-3, 1.0, std)  # a constant channel must not divide by ~0
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)


class Normalizer:
    """uint8 batch -> float32 ``(x / 255 - mean) / std``, as one fused multiply-add."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device | str = "cpu"):
        mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -mean_t / std_t

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, x.float(), self.scale)
