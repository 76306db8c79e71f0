"""uint8 image arrays -> normalised float batches on the training device.

    x = to_tensor(ds.train.x, device)            # (N, C, H, W) uint8, channels-last in memory
    norm = Normalizer(spec.mean, spec.std, device)
    xb = norm(x[idx])                             # float32, (x / 255 - mean) / std
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


def channel_stats(x: np.ndarray, max_images: int = 10_000) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std on the 0..1 scale of (N, H, W, C) uint8 images (a strided sample
    of at most ``max_images`` keeps this fast and deterministic on big datasets)."""
    step = max(1, len(x) // max_images)
    sample = x[::step].reshape(-1, x.shape[-1]).astype(np.float64) / 255.0
    mean, std = sample.mean(axis=0), sample.std(axis=0)
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
