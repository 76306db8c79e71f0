"""What every source parser yields and the cache stores: uint8 arrays per stored split, before splitting.

The val/test fractions are applied afterwards (see dataset.py), so changing them never re-decodes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Decoded:
    classes: list[str]   # class names; labels index into this list
    channels: int        # 1 or 3
    image_size: int      # square side of every image
    # "train" / "test" / "val" as found in the source, or "all" for a <class>/* folder; -> (x, y):
    # x (N, image_size, image_size, channels) uint8, y (N,) int64
    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    skipped: list[str] = field(default_factory=list)  # unreadable files left out (skip_bad_images=True)
