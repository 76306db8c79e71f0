"""Built-in datasets: a name -> which files to download, how to check them and how to parse them.

    path = builtin_source("mnist", download=True, progress=True)   # cached under imgclf_home()/datasets

Adding a dataset is one entry (plus a parser for a new format). Entries are frozen: tests and mirrors swap
one with ``dataclasses.replace`` (e.g. monkeypatch.setitem on BUILTINS).
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImgclfError
from ..utils import imgclf_home
from .cifar import load_cifar10, load_cifar100
from .decoded import Decoded
from .download import fetch
from .idx import FASHION_MNIST_CLASSES, MNIST_CLASSES, load_idx_folder


@dataclass(frozen=True)
class RemoteFile:
    url: str                            # official download address
    filename: str                       # name it is stored under
    checksum: str                       # "md5:<hex>" or "sha256:<hex>", as published


@dataclass(frozen=True)
class BuiltinDataset:
    name: str                           # what --data accepts
    files: tuple[RemoteFile, ...]       # everything to download
    parser: Callable[..., Decoded]      # (path, *, image_size, channels, skip_bad_images, progress) -> Decoded
    image_size: int                     # native square side
    channels: int                       # native channels
    num_classes: int
    description: str
    folder: str = ""                    # sub-folder of imgclf_home()/datasets ("" = the folder itself)
    mirror_safe: bool = True            # a mirror image shows the same class (False for digits)

    def source_path(self) -> Path:
        """What the parser reads: the single file, or the folder holding several."""
        base = datasets_dir() / self.folder
        return base / self.files[0].filename if len(self.files) == 1 else base

    def is_downloaded(self) -> bool:
        base = datasets_dir() / self.folder
        return all((base / f.filename).is_file() for f in self.files)


def _idx_files(base_url: str, checksums: tuple[str, str, str, str]) -> tuple[RemoteFile, ...]:
    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    return tuple(RemoteFile(base_url + n, n, f"md5:{c}") for n, c in zip(names, checksums))


_CIFAR100 = RemoteFile("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "cifar-100-python.tar.gz",
                       "md5:eb9058c3a382ffc7106e4002c42a8d85")  # checksums as published by each dataset's authors

BUILTINS: dict[str, BuiltinDataset] = {d.name: d for d in (
    BuiltinDataset(
        name="cifar10", parser=load_cifar10, image_size=32, channels=3, num_classes=10,
        description="CIFAR-10: 50,000 train / 10,000 test colour images, 10 classes",
        files=(RemoteFile("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-python.tar.gz",
                          "md5:c58f30108f718f92721af3b95e74349a"),)),
    BuiltinDataset(
        name="cifar100", parser=load_cifar100, image_size=32, channels=3, num_classes=100, files=(_CIFAR100,),
        description="CIFAR-100: 50,000 train / 10,000 test colour images, 100 fine classes"),
    BuiltinDataset(
        name="cifar100-coarse", parser=functools.partial(load_cifar100, labels="coarse"), image_size=32,
        channels=3, num_classes=20, files=(_CIFAR100,),
        description="CIFAR-100 with its 20 coarse super-classes (same download as cifar100)"),
    BuiltinDataset(
        name="mnist", parser=functools.partial(load_idx_folder, classes=MNIST_CLASSES), image_size=28,
        channels=1, num_classes=10, folder="mnist", mirror_safe=False,
        description="MNIST: 60,000 train / 10,000 test handwritten digits, 28x28 greyscale",
        # the original yann.lecun.com host is often unreachable; this mirror serves the identical files
        files=_idx_files("https://ossci-datasets.s3.amazonaws.com/mnist/",
                         ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
                          "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"))),
    BuiltinDataset(
        name="fashion-mnist", parser=functools.partial(load_idx_folder, classes=FASHION_MNIST_CLASSES),
        image_size=28, channels=1, num_classes=10, folder="fashion-mnist",
        description="Fashion-MNIST: 60,000 train / 10,000 test clothing images, 28x28 greyscale",
        files=_idx_files("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                         ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                          "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"))),
)}


def datasets_dir() -> Path:
    return imgclf_home() / "datasets"


def builtin_source(name: str, *, download: bool = True, progress: bool = True) -> Path:
    """Path of the built-in dataset's file (or folder of files) in the cache, downloading and verifying
    what is missing the first time. Only a verified download is ever renamed into place, so files already
    there are not hashed again."""
    entry = BUILTINS[name]
    base = datasets_dir() / entry.folder
    missing = [f for f in entry.files if not (base / f.filename).is_file()]
    if missing and not download:
        raise ImgclfError(f"{name} is not downloaded yet ({base / missing[0].filename} is missing) and "
                          "downloading is off; pass a local copy with --data PATH, or allow the download")
    for f in missing:
        fetch(f.url, base / f.filename, f.checksum, progress=progress)
    return entry.source_path()


def list_datasets() -> list[dict]:
    """One row per built-in dataset for ``imgclf datasets``: name, classes, size, where it is cached."""
    return [{"name": d.name, "classes": d.num_classes, "image_size": d.image_size, "channels": d.channels,
             "description": d.description, "downloaded": d.is_downloaded(), "path": str(d.source_path()),
             "urls": [f.url for f in d.files]} for d in BUILTINS.values()]
