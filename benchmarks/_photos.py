"""Photo-like folders built from the shared CIFAR-10 JPEG copy, for the photo benchmarks (photo_folder.py,
transfer.py): no real photo folder is at hand here, so CIFAR-10 images are upscaled (bicubic) and saved as JPEG.

    names = cifar_photo_folder(root, classes=5, counts={"train": 100, "test": 100}, side=160)
    names = cifar_photo_folder(root, classes=6, counts={"train": 400}, side=150, jitter=0.2, bare=True)

Upscaled 32 px images are blurrier than photos: accuracies on them are a floor for real photos.
"""
from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

from PIL import Image

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpeg.tar.gz"


def cifar_photo_folder(root: Path, classes: int, counts: dict[str, int], side: int, jitter: float = 0.0,
                       bare: bool = False, seed: int = 0) -> list[str]:
    """The first ``classes`` classes, ``counts[split]`` images of each from each split named, upscaled to
    ``side`` px, each side drawn in [1 - jitter, 1 + jitter] x ``side`` (seeded), as phone photos vary.
    Written as ``root/<split>/<class>/*.jpg``, or with ``bare`` as ``root/<class>/*.jpg`` (one split only,
    no split folders: imgclf then holds out a seeded val/test share). Returns the class names."""
    if bare and len(counts) != 1:
        raise ValueError("a bare folder holds one split's images")
    rng = random.Random(seed)
    names: list[str] = []
    done: dict[tuple[str, str], int] = {}
    with tarfile.open(CIFAR) as tf:
        for m in tf:
            parts = m.name.split("/")
            if not m.isfile() or len(parts) != 3 or parts[0] not in counts:
                continue
            split, cls, name = parts
            if cls not in names:
                if len(names) == classes:
                    continue
                names.append(cls)
            if done.get((split, cls), 0) >= counts[split]:
                if len(names) == classes and all(done.get((s, c), 0) >= n for s, n in counts.items() for c in names):
                    break
                continue
            done[split, cls] = done.get((split, cls), 0) + 1
            w, h = (round(side * rng.uniform(1 - jitter, 1 + jitter)) if jitter else side for _ in range(2))
            img = Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB").resize((w, h), Image.BICUBIC)
            out = root / ("" if bare else split) / cls / name
            out.parent.mkdir(parents=True, exist_ok=True)
            img.save(out, quality=90)
    return names
