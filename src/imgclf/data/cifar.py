"""The official CIFAR-10 "python version": cifar-10-python.tar.gz or its cifar-10-batches-py/ folder.

    decoded = load_cifar10(Path("cifar-10-python.tar.gz"), image_size=None, channels=None, progress=True)

The batches are pickles (data_batch_1..5, test_batch: {b"data": (N, 3072) uint8, b"labels": [...]};
batches.meta: {b"label_names": [...]}). Unpickling runs code named by the file, so they go through an
unpickler that can only build numpy arrays: a tampered download cannot run anything.
"""
from __future__ import annotations

import codecs
import io
import pickle
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..errors import ImgclfError
from .archives import iter_archive
from .decode import preprocess_arrays
from .decoded import Decoded

FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
FILES = (*TRAIN_BATCHES, "test_batch", "batches.meta")
NATIVE_SIZE = 32

# Exactly what numpy arrays pickle to (numpy 1.x and 2.x module names), plus _codecs.encode, which
# Python 3 writes for every bytes object in a protocol-2 pickle (it only turns a str into bytes).
_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own _reconstruct, whatever its module
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that builds plain containers and numpy arrays only; any other class is refused."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise ImgclfError(f"refusing to unpickle {module}.{name}: a CIFAR batch holds only numpy arrays, "
                              "so this file is not one (or was tampered with); download it again") from None


def restricted_loads(data: bytes, *, name: str = "<pickle>"):
    """Unpickle CIFAR-style data (bytes keys, numpy arrays) with NumpyOnlyUnpickler."""
    try:
        return NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except ImgclfError as e:
        raise ImgclfError(f"{name}: {e}") from None
    except Exception as e:  # noqa: BLE001 -- a damaged pickle fails in many ways (EOFError, UnpicklingError, ValueError ...)
        raise ImgclfError(f"{name}: not a readable CIFAR batch ({type(e).__name__}: {e}); "
                          "download the archive again") from None


def is_cifar10(path: Path) -> bool:
    """Does ``path`` (a folder or an archive) hold the CIFAR-10 batches? For an archive only the first few
    members are read: the official one starts with its cifar-10-batches-py/ folder."""
    if path.is_dir():
        return (path / "batches.meta").is_file() or (path / FOLDER / "batches.meta").is_file()
    for i, entry in enumerate(iter_archive(path, stream=True)):
        if entry.name.split("/")[0] == FOLDER or entry.name.rsplit("/", 1)[-1] in FILES:
            return True
        if i >= 4:
            return False
    return False


def load_cifar10(path: Path, *, image_size: int | None = None, channels: int | None = None,
                 skip_bad_images: bool = False, progress: bool = True, store=None) -> Decoded:
    """Parse the official archive or folder into Decoded (train 50k / test 10k), resized if asked.
    ``skip_bad_images`` and ``store`` are accepted for a uniform parser signature (the cache stores the
    arrays returned): batches hold no image files to skip."""
    blobs = _read_blobs(path)
    _require(blobs, FILES, path, FOLDER, "cifar-10-python.tar.gz")
    classes = _label_names(blobs["batches.meta"], "batches.meta", b"label_names", path)
    train = [_parse_batch(blobs[b], f"{path}: {b}", len(classes)) for b in TRAIN_BATCHES]
    splits = {"train": (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])),
              "test": _parse_batch(blobs["test_batch"], f"{path}: test_batch", len(classes))}
    return _decoded(classes, splits, image_size, channels, progress)


def _require(blobs: Mapping[str, bytes], files, path: Path, folder: str, archive: str) -> None:
    missing = [f for f in files if f not in blobs]
    if missing:
        raise ImgclfError(f"{path}: file {folder}/{missing[0]} is missing; download {archive} again or pass "
                          "an image folder")


def _label_names(blob: bytes, name: str, key: bytes, path: Path) -> list[str]:
    meta = restricted_loads(blob, name=f"{path}: {name}")
    try:
        return [n.decode() if isinstance(n, bytes) else str(n) for n in meta[key]]
    except (KeyError, TypeError) as e:
        raise ImgclfError(f"{path}: {name} has no {key.decode()} ({e}); download the archive again") from None


def _decoded(classes: list[str], splits: dict, image_size: int | None, channels: int | None,
             progress: bool) -> Decoded:
    """Resize / convert the native 32x32 RGB arrays only when another size or channel count is asked for."""
    size, n_channels = image_size or NATIVE_SIZE, channels or 3
    if (size, n_channels) != (NATIVE_SIZE, 3):
        splits = {k: (preprocess_arrays(x, size, n_channels, progress=progress), y) for k, (x, y) in splits.items()}
    return Decoded(classes, n_channels, size, splits)


def _read_blobs(path: Path) -> Mapping[str, bytes]:
    if path.is_dir():
        folder = path if (path / "batches.meta").is_file() else path / FOLDER
        return {f: (folder / f).read_bytes() for f in FILES if (folder / f).is_file()}
    # Only the batch files are kept; readme.html and anything else in the archive is skipped.
    return {entry.name.rsplit("/", 1)[-1]: entry.data for entry in iter_archive(path)
            if entry.kind == "file" and entry.name.rsplit("/", 1)[-1] in FILES}


def _parse_batch(blob: bytes, name: str, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """-> x (N, 32, 32, 3) uint8 NHWC, y (N,) int64. The stored rows are 1024 red, 1024 green, 1024 blue
    values, each plane row-major: CHW."""
    return _check_batch(restricted_loads(blob, name=name), name, n_classes)


def _check_batch(batch, name: str, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        data, labels = batch[b"data"], np.asarray(batch[b"labels"], dtype=np.int64)
    except (KeyError, TypeError, ValueError) as e:
        raise ImgclfError(f"{name}: not a CIFAR batch (no data/labels: {e}); download the archive again") from None
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == 3 * NATIVE_SIZE * NATIVE_SIZE and labels.shape == (len(data),)):
        raise ImgclfError(f"{name}: not a CIFAR batch (data {getattr(data, 'shape', '?')}, "
                          f"{labels.shape[0] if labels.ndim else '?'} labels); download the archive again")
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise ImgclfError(f"{name}: labels outside 0..{n_classes - 1}; download the archive again")
    x = data.reshape(-1, 3, NATIVE_SIZE, NATIVE_SIZE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(x), labels


# ---------------------------------------------------------------------------- CIFAR-100
FOLDER_100 = "cifar-100-python"
FILES_100 = ("train", "test", "meta")


def is_cifar100(path: Path) -> bool:
    """Does ``path`` (a folder or an archive) hold the CIFAR-100 python files (train, test, meta)?"""
    if path.is_dir():
        return any(all((d / f).is_file() for f in FILES_100) for d in (path, path / FOLDER_100))
    for i, entry in enumerate(iter_archive(path, stream=True)):
        if entry.name.split("/")[0] == FOLDER_100:
            return True
        if i >= 4:
            return False
    return False


def load_cifar100(path: Path, *, labels: str = "fine", image_size: int | None = None, channels: int | None = None,
                  skip_bad_images: bool = False, progress: bool = True, store=None) -> Decoded:
    """The official cifar-100-python.tar.gz (or folder) -> Decoded, with the 100 ``fine`` labels or the 20
    ``coarse`` super-classes. Same restricted unpickling as CIFAR-10."""
    if labels not in ("fine", "coarse"):
        raise ValueError("labels must be 'fine' or 'coarse'")
    if path.is_dir():
        folder = path if (path / "meta").is_file() else path / FOLDER_100
        blobs = {f: (folder / f).read_bytes() for f in FILES_100 if (folder / f).is_file()}
    else:
        blobs = {e.name.rsplit("/", 1)[-1]: e.data for e in iter_archive(path)
                 if e.kind == "file" and e.name.split("/")[0] == FOLDER_100 and e.name.rsplit("/", 1)[-1] in FILES_100}
    _require(blobs, FILES_100, path, FOLDER_100, "cifar-100-python.tar.gz")
    classes = _label_names(blobs["meta"], "meta", f"{labels}_label_names".encode(), path)
    splits = {}
    for split in ("train", "test"):
        batch = restricted_loads(blobs[split], name=f"{path}: {split}")
        fixed = {b"data": batch.get(b"data"), b"labels": batch.get(f"{labels}_labels".encode())}
        splits[split] = _check_batch(fixed, f"{path}: {split}", len(classes))
    return _decoded(classes, splits, image_size, channels, progress)
