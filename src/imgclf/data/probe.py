"""A quick look at a data source before decoding it: is it a built-in, how big are its images, are they grey?

    probe_images("photos/")         # -> ImageProbe(side=375, channels=3): the median shorter side of a sample
    probe_images("mnist")           # -> ImageProbe(side=28, channels=1, mirror_safe=False)

Used by the training recipes ("auto" picks the photo recipe for a folder of large images, and the fast
recipe leaves out mirror images for small greyscale characters). Reads only image headers of at most
``sample`` files (for an archive, its first members), so it costs milliseconds.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .archives import is_archive, iter_archive
from .builtin import BUILTINS
from .cifar import is_cifar10, is_cifar100
from .folder import IMAGE_SUFFIXES
from .idx import is_idx_folder

GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


@dataclass(frozen=True)
class ImageProbe:
    side: int | None = None          # median shorter side of a sample; the native size for official formats
    channels: int | None = None      # 1 when most sampled images are greyscale, else 3; None if unknown
    mirror_safe: bool | None = None  # does a mirror image show the same class? None: the source doesn't say


def probe_images(data: str, sample: int = 64) -> ImageProbe:
    """What the source's images look like; an empty probe when nothing can be read (load_dataset will then
    say what is wrong)."""
    if str(data).lower() in BUILTINS:
        b = BUILTINS[str(data).lower()]
        return ImageProbe(b.image_size, b.channels, b.mirror_safe)
    path = Path(data).expanduser()
    if not path.exists():
        return ImageProbe()
    try:
        if is_idx_folder(path):
            return ImageProbe(28, 1)
        if (path.is_dir() or is_archive(path)) and (is_cifar10(path) or is_cifar100(path)):
            return ImageProbe(32, 3, True)
        sides, grey = [], 0
        for opener in _image_sources(path, sample):
            try:
                with Image.open(opener()) as img:  # header only: no pixels decoded
                    sides.append(min(img.size))
                    grey += img.mode in GREY_MODES
            except (OSError, ValueError, Image.DecompressionBombError):
                continue
    except Exception:  # noqa: BLE001 - a probe never fails the run; load_dataset reports bad input
        return ImageProbe()
    if not sides:
        return ImageProbe()
    return ImageProbe(int(np.median(sides)), 1 if grey > len(sides) / 2 else 3)


def _image_sources(path: Path, sample: int):
    def is_image(name: str) -> bool:
        return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES and not os.path.basename(name).startswith(".")

    if path.is_dir():
        found = []
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__MACOSX")
            found += [Path(root) / f for f in sorted(files) if is_image(f)]
            if len(found) >= sample:
                break
        return [(lambda p=p: p) for p in found[:sample]]
    if is_archive(path):
        out = []
        for entry in iter_archive(path, stream=True):
            if entry.kind == "file" and is_image(entry.name):
                out.append(lambda d=entry.data: io.BytesIO(d))
                if len(out) >= sample:
                    break
        return out
    return []
