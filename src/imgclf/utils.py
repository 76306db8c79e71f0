"""Small shared helpers: atomic writes, natural sort, the cache folder, device choice."""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path

import torch

from .errors import ImgclfError


def imgclf_home() -> Path:
    """The cache folder: ``$IMGCLF_HOME``, default ``~/.cache/imgclf``."""
    return Path(os.environ.get("IMGCLF_HOME") or Path.home() / ".cache" / "imgclf").expanduser()


def natural_key(s: str) -> list:
    """Sort key that orders ``2`` before ``10`` (``class2`` < ``class10``); case-insensitive, stable."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t.lower()) for t in re.split(r"(\d+)", s) if t] + [(2, 0, s)]


def natural_sorted(items) -> list[str]:
    return sorted(items, key=natural_key)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success it is renamed over ``path`` (atomic on POSIX),
    on failure removed, so a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu. Asking for cuda without one is a clear error."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ImgclfError(f"--device {name} asked for, but no CUDA GPU is available here; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise ImgclfError(f"unknown device {name!r}: use auto, cpu or cuda[:N]") from e
