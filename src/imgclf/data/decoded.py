"""What every source parser yields and the cache stores: uint8 images per stored split, before splitting.

The val/test fractions are applied afterwards (see dataset.py), so changing them never re-decodes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .shards import ImageRows, ShardWriter


@dataclass
class Decoded:
    classes: list[str]   # class names; labels index into this list
    channels: int        # 1 or 3
    image_size: int      # square side of every image
    # "train" / "test" / "val" as found in the source, or "all" for a <class>/* folder; -> (x, y), y (N,)
    # int64. x: (N, image_size, image_size, channels) uint8 images (an array or ImageRows), or, when
    # ``pool`` is set, the (N,) int64 positions of the split's images in the pool
    splits: dict[str, tuple[np.ndarray | ImageRows, np.ndarray]]
    skipped: list[str] = field(default_factory=list)  # unreadable files left out (skip_bad_images=True)
    pool: ShardWriter | None = None  # the shards a streaming parser wrote its images into
    # each split's image names in its order: a folder's relative paths, an archive's member names; None for
    # the official formats, whose images have no file of their own (see split_names)
    names: dict[str, list[str] | np.ndarray] | None = None


def split_names(decoded: Decoded, split: str) -> list[str]:
    """The names of a stored split's images, in order: the source's relative paths (an archive's member
    names), or ``<split>/<index>`` for images without a file of their own (CIFAR batches, IDX files)."""
    names = (decoded.names or {}).get(split)
    if names is None:
        return [f"{split}/{i}" for i in range(len(decoded.splits[split][1]))]
    # the cache stores names as UTF-8 bytes (surrogate escapes kept: a file name need not be UTF-8)
    return [n.decode("utf-8", "surrogateescape") if isinstance(n, bytes) else str(n) for n in names]
