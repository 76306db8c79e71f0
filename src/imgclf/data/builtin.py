"""Built-in datasets: a name -> where to download it, how to check it and how to parse it.

    path = builtin_archive("cifar10", download=True, progress=True)   # cached under imgclf_home()/datasets

Adding CIFAR-100, MNIST or Fashion-MNIST is one entry each (plus a parser for a new format). Entries are
frozen: tests and mirrors swap one with ``dataclasses.replace`` (e.g. monkeypatch.setitem on BUILTINS).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImgclfError
from ..utils import imgclf_home
from .cifar import load_cifar10
from .decoded import Decoded
from .download import fetch


@dataclass(frozen=True)
class BuiltinDataset:
    name: str                           # what --data accepts
    url: str                            # official download address
    filename: str                       # file name in imgclf_home()/datasets
    checksum: str                       # "md5:<hex>" or "sha256:<hex>", as published
    parser: Callable[..., Decoded]      # (path, *, image_size, channels, skip_bad_images, progress) -> Decoded
    image_size: int                     # native square side
    channels: int                       # native channels


BUILTINS: dict[str, BuiltinDataset] = {
    "cifar10": BuiltinDataset(
        name="cifar10",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        filename="cifar-10-python.tar.gz",
        checksum="md5:c58f30108f718f92721af3b95e74349a",  # published on the CIFAR page
        parser=load_cifar10,
        image_size=32,
        channels=3,
    ),
}


def datasets_dir() -> Path:
    return imgclf_home() / "datasets"


def builtin_archive(name: str, *, download: bool = True, progress: bool = True) -> Path:
    """Path of the built-in dataset's file in the cache, downloading and verifying it the first time."""
    entry = BUILTINS[name]
    path = datasets_dir() / entry.filename
    if path.is_file():
        # Only a verified download is ever renamed into place, so the file is not hashed again here.
        return path
    if not download:
        raise ImgclfError(f"{name} is not downloaded yet ({path} is missing) and downloading is off; "
                          f"pass a local copy with --data PATH, or allow the download")
    return fetch(entry.url, path, entry.checksum, progress=progress)
