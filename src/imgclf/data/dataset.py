"""INTERFACE STUB (to be implemented): the in-memory dataset handed to training."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Split:
    x: np.ndarray  # (N, H, W, C) uint8, C = 1 or 3, H = W = image_size
    y: np.ndarray  # (N,) int64 class indices into Dataset.classes


@dataclass
class Dataset:
    name: str                      # e.g. "cifar10", or the folder/archive's stem
    source: str                    # what --data resolved to (absolute path), for the run's record
    classes: list[str]             # fixed order: official order for built-ins, natural sort for folders
    channels: int                  # 1 (greyscale dataset) or 3
    image_size: int                # square side every image was resized to
    train: Split
    test: Split | None             # None only if the source has no test images and test_split == 0
    val: Split | None = None       # from val/<class>/ or carved from train by val_split; None otherwise
    val_origin: str = "none"       # "val-folder" | "val-split" | "none"
    skipped: list[str] = field(default_factory=list)  # bad files skipped with skip_bad_images=True


def load_dataset(data: str = "cifar10", *, image_size: int | None = None, val_split: float = 0.0,
                 test_split: float = 0.0, seed: int = 0, skip_bad_images: bool = False,
                 download: bool = True, progress: bool = True) -> Dataset:
    raise NotImplementedError
