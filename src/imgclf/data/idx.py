"""The IDX format of MNIST and Fashion-MNIST: four gzip files of big-endian headers and raw uint8 pixels.

    decoded = load_idx_folder(Path("~/.cache/imgclf/datasets/mnist"), classes=MNIST_CLASSES)

An IDX file is: two zero bytes, a type code (0x08 = uint8), the number of dimensions, each dimension as a
big-endian int32, then the data in C order (http://yann.lecun.com/exdb/mnist/).
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from ..errors import ImgclfError
from .decode import preprocess_arrays
from .decoded import Decoded

MNIST_CLASSES = tuple(str(i) for i in range(10))
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def is_idx_folder(path: Path) -> bool:
    return path.is_dir() and all(_find(path, name) is not None for pair in FILES.values() for name in pair)


def read_idx(path: Path) -> np.ndarray:
    """One IDX file (optionally .gz) -> uint8 array of its shape. A damaged file is a clear error."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
        dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    except (OSError, EOFError, struct.error, gzip.BadGzipFile) as e:
        raise ImgclfError(f"{path}: not a readable IDX file ({e}); download it again") from None
    if zero != 0 or dtype != 0x08:
        raise ImgclfError(f"{path}: not an IDX file of uint8 (header {raw[:4].hex()}); download it again")
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ImgclfError(f"{path}: holds {data.size} values, its header says {dims}; download it again")
    return data.reshape(dims)


def load_idx_folder(path: Path, *, classes: tuple[str, ...] = MNIST_CLASSES, image_size: int | None = None,
                    channels: int | None = None, skip_bad_images: bool = False, progress: bool = True,
                    store=None) -> Decoded:
    """A folder with the four (MNIST-named) IDX files -> Decoded train/test, greyscale unless asked for RGB.
    ``skip_bad_images`` and ``store`` are accepted for a uniform parser signature (the cache stores the
    arrays returned): IDX files hold no image files to skip."""
    splits = {}
    for split, (images_name, labels_name) in FILES.items():
        images_path, labels_path = _find(path, images_name), _find(path, labels_name)
        if images_path is None or labels_path is None:
            raise ImgclfError(f"{path}: {images_name if images_path is None else labels_name}(.gz) is missing; "
                              "an IDX dataset folder needs the four MNIST-named files")
        x, y = read_idx(images_path), read_idx(labels_path).astype(np.int64)
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ImgclfError(f"{path}: {split} images {x.shape} and labels {y.shape} do not match")
        if len(y) and y.max() >= len(classes):
            raise ImgclfError(f"{labels_path}: label {y.max()} but only {len(classes)} classes")
        splits[split] = (x[..., None], y)
    native = splits["train"][0].shape[1]
    size, n_channels = image_size or native, channels or 1
    if (size, n_channels) != (native, 1):
        splits = {k: (preprocess_arrays(x, size, n_channels, progress=progress), y) for k, (x, y) in splits.items()}
    return Decoded(list(classes), n_channels, size, {k: (np.ascontiguousarray(x), y) for k, (x, y) in splits.items()})


def _find(folder: Path, name: str) -> Path | None:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None
