"""INTERFACE STUB (to be implemented): the one image loader and the preprocessing spec."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Preprocess:
    """Everything needed to turn any image into the model's input; stored in every checkpoint."""
    image_size: int                      # square side of the model's input
    channels: int                        # 1 -> "L", 3 -> "RGB"
    mean: tuple[float, ...]              # per channel, on the 0..1 scale
    std: tuple[float, ...]
    resize: str = "shorter-center-crop"  # resize the shorter side to image_size, then centre-crop

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)


def load_image(source, channels: int = 3):
    """Open a path, bytes or PIL image; apply EXIF orientation; convert to "RGB"/"L". -> PIL.Image"""
    raise NotImplementedError


def preprocess_image(source, spec: Preprocess) -> np.ndarray:
    """load_image + resize per spec -> (H, W, C) uint8. Normalisation happens later, on tensors."""
    raise NotImplementedError
