"""The dataset handed to training, and load_dataset, the one way to get one.

    ds = load_dataset("../shared/datasets/cifar10-jpeg.tar.gz", val_split=0.1)
    ds.train.x.shape, ds.classes        # (45000, 32, 32, 3) uint8 ImageRows, ['airplane', ..., 'truck']

``data`` is a built-in name (see builtin.BUILTINS), the official CIFAR-10 archive or folder, an image
folder (a directory or a .tar/.tar.gz/.tgz/.zip of one), or WebDataset-style shards (a folder of them, or a
brace pattern such as ``shards/train-{000000..000009}.tar``; see webdataset.py). Decoded images are cached on
disk and memory-mapped (cache.py, shards.py); the val/test fractions are applied after the cache, as lazy
views of it, so changing them costs no decoding.
"""
from __future__ import annotations

import numbers
import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ImgclfError
from . import cache
from .archives import ARCHIVE_SUFFIXES, archive_stem, is_archive
from .builtin import BUILTINS, builtin_source
from .cifar import is_cifar10, is_cifar100, load_cifar10, load_cifar100
from .decoded import Decoded
from .edits import apply_edits
from .folder import LAYOUT_HELP, load_folder
from .idx import is_idx_folder, load_idx_folder
from .notify import note
from .shards import ImageRows
from .split import stratified_split
from .webdataset import is_shard_folder, is_shard_pattern, load_shards, shard_files


@dataclass
class Split:
    x: ImageRows   # (N, H, W, C) uint8, C = 1 or 3, H = W = image_size; memory-mapped from the cache
    y: np.ndarray  # (N,) int64 class indices into Dataset.classes


def split_size(split: Split | None) -> int:
    """Images in a split that may be absent (no val/ or test/ data): 0 then."""
    return 0 if split is None else len(split.y)


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
    edits: dict[str, int] = field(default_factory=dict)  # {"excluded": n, "relabelled": n} (see edits.py)


def load_dataset(data: str = "cifar10", *, image_size: int | None = None, val_split: float = 0.0,
                 test_split: float = 0.0, seed: int = 0, skip_bad_images: bool = False,
                 download: bool = True, progress: bool = True, channels: int | None = None,
                 exclude: Collection[str] = (), relabel: Mapping[str, str] | None = None) -> Dataset:
    """Load, decode (or fetch from the cache) and split a dataset.

    image_size: square side to resize to; None keeps the native size when every image has one square size,
        else uses the most common shorter side (at most 64), with a note.
    val_split / test_split: fractions carved (stratified, seeded by ``seed``) from train, or from the whole
        set for a <class>/* folder; a val/ or test/ folder in the source takes precedence.
    skip_bad_images: leave unreadable image files out (listed in Dataset.skipped) instead of failing.
    download: allow downloading a built-in dataset that is not cached yet.
    progress: tqdm bars on stderr for download and decoding.
    channels: force 1 or 3; None: 1 if every image is greyscale, else 3.
    exclude / relabel: images left out, and images moved to another class ({name: class}), named as
        ``imgclf doctor`` names them (see edits.py); applied before the val/test fractions.

    Decoded arrays are cached under ``imgclf_home()/"cache"`` (``$IMGCLF_HOME``, default ~/.cache/imgclf),
    downloads under ``imgclf_home()/"datasets"``. Unusable input raises ImgclfError.
    """
    _check_options(image_size=image_size, val_split=val_split, test_split=test_split, channels=channels)
    name, source, decoded = load_decoded(data, image_size=image_size, channels=channels,
                                         skip_bad_images=skip_bad_images, download=download, progress=progress)
    decoded, edits = apply_edits(decoded, exclude, relabel or {}, where=str(source))
    ds = _make_dataset(decoded, name=name, source=source, val_split=val_split, test_split=test_split, seed=seed)
    ds.edits = edits
    return ds


def load_decoded(data: str = "cifar10", *, image_size: int | None = None, channels: int | None = None,
                 skip_bad_images: bool = False, download: bool = True, progress: bool = True
                 ) -> tuple[str, Path, Decoded]:
    """The stored splits of ``data`` as decoded (from the cache when it has them), before any split fraction:
    -> (dataset name, absolute source path, Decoded with the images' names). load_dataset's first step, and
    what ``imgclf doctor`` looks at: every image once, named."""
    image_size = _check_options(image_size=image_size, val_split=0.0, test_split=0.0, channels=channels)
    name, source, parser, kind = _resolve(data, download=download, progress=progress)
    key = cache.cache_key(source, parser=kind, image_size=image_size, channels=channels,
                          skip_bad_images=skip_bad_images)
    decoded = cache.load(key)
    if decoded is None:
        parser = parser or _detect_parser(source)
        decoded = cache.decode(key, lambda store: parser(
            source, image_size=image_size, channels=channels, skip_bad_images=skip_bad_images, progress=progress,
            store=store))
    return name, source, decoded


def _check_options(*, image_size, val_split, test_split, channels) -> int | None:
    """ImgclfError for impossible options; -> image_size as a plain int (or None)."""
    if image_size is not None:
        if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) or image_size < 1:
            raise ImgclfError(f"image size must be a positive whole number of pixels, not {image_size!r}")
        image_size = int(image_size)
    if channels not in (None, 1, 3):
        raise ImgclfError(f"channels must be 1 (greyscale) or 3 (RGB), not {channels!r}")
    for flag, value in (("val", val_split), ("test", test_split)):
        if not 0 <= value < 1:
            raise ImgclfError(f"--{flag}-split must be a fraction in [0, 1), not {value}")
    if val_split + test_split >= 1:
        raise ImgclfError(f"--val-split {val_split} + --test-split {test_split} leave nothing to train on; "
                          "keep their sum below 1")
    return image_size


def _resolve(data, *, download: bool, progress: bool) -> tuple[str, Path, Callable | None, str]:
    """-> (dataset name, absolute source path, parser or None to detect on a cache miss, cache-key kind).

    A built-in name wins over a folder of the same name in the working directory: write ./cifar10 for that.
    """
    text = os.fspath(data)
    if text.lower() in BUILTINS:
        entry = BUILTINS[text.lower()]
        path = builtin_source(entry.name, download=download, progress=progress)
        return entry.name, path.resolve(), entry.parser, f"builtin:{entry.name}"
    if is_shard_pattern(text):  # WebDataset-style shards named by a brace pattern
        folder, _ = shard_files(text)
        return folder.name, folder, lambda _, **kw: load_shards(text, **kw), f"webdataset:{text}"
    path = Path(text).expanduser()
    if not path.exists():
        if "/" in text or os.sep in text or "." in text:
            raise ImgclfError(f"{text}: no such file or folder; check the path given to --data")
        raise ImgclfError(f"unknown dataset {text!r}: the built-in ones are {', '.join(sorted(BUILTINS))}; "
                          "a path to an image folder or a .tar.gz/.zip of one also works")
    path = path.resolve()
    if path.is_dir():
        return path.name, path, None, "path"
    if not is_archive(path):
        raise ImgclfError(f"{path} is a file but not a folder or an archive ({', '.join(ARCHIVE_SUFFIXES)}): "
                          f"{LAYOUT_HELP}")
    return archive_stem(path), path, None, "path"


def _detect_parser(path: Path) -> Callable[..., Decoded]:
    """An official format (CIFAR-10/100 python batches, an MNIST-style IDX folder), or else an image folder.
    Only run on a cache miss: the choice follows from the source's content, which the cache key covers."""
    if is_cifar10(path):
        return load_cifar10
    if is_cifar100(path):
        return load_cifar100
    if is_idx_folder(path):
        return load_idx_folder
    if is_shard_folder(path):
        return load_shards
    return load_folder


DEFAULT_HOLDOUT = 0.1  # val and test fractions for a <class>/* folder when none are given


def _make_dataset(decoded: Decoded, *, name: str, source: Path, val_split: float, test_split: float,
                  seed: int) -> Dataset:
    """Apply the split fractions to the decoded arrays. Independent seeded streams for test and val, so
    the same seed always carves the same images."""
    test_rng = np.random.default_rng([seed % (1 << 64), 1])
    val_rng = np.random.default_rng([seed % (1 << 64), 2])
    splits = decoded.splits
    test = Split(*splits["test"]) if "test" in splits else None
    val = Split(*splits["val"]) if "val" in splits else None
    val_origin = "val-folder" if val is not None else "none"
    x, y = splits["all"] if "all" in splits else splits["train"]
    rest = np.arange(len(y))
    if "all" in splits and val_split == 0 and test_split == 0 and len(y) and np.bincount(y).min() >= 10:
        # A bare <class>/* folder still gets held-out images, or its run could never be judged
        # (with fewer than 10 images in some class there is too little to hold out: none is).
        val_split, test_split = DEFAULT_HOLDOUT, DEFAULT_HOLDOUT
        note(f"{source} has no train/test folders: holding out {DEFAULT_HOLDOUT:.0%} for validation and "
             f"{DEFAULT_HOLDOUT:.0%} for test (stratified, seeded; set --val-split/--test-split to change)")

    test_carved = test is None and test_split > 0
    if test_split > 0 and not test_carved:
        note(f"ignoring test split {test_split}: {source} has its own test/ folder")
    elif test_carved:
        keep, carved = stratified_split(y, test_split, test_rng)
        test, rest = Split(x.select(carved), y[carved]), keep
    if val_split > 0 and val is not None:
        note(f"ignoring val split {val_split}: {source} has its own val/ folder")
    elif val_split > 0:
        # Both fractions are of the same pool, so scale val's to what the test carve left of it.
        fraction = val_split / (1 - test_split) if test_carved else val_split
        keep, carved = stratified_split(y[rest], fraction, val_rng)
        val, val_origin = Split(x.select(rest[carved]), y[rest[carved]]), "val-split"
        rest = rest[keep]
    train = Split(x, y) if len(rest) == len(y) else Split(x.select(rest), y[rest])
    return Dataset(name=name, source=str(source), classes=list(decoded.classes), channels=decoded.channels,
                   image_size=decoded.image_size, train=train, test=test, val=val, val_origin=val_origin,
                   skipped=list(decoded.skipped))
