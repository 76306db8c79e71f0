"""The run folder's files that training writes as it goes: a fresh folder per run, metrics.csv, run.json,
and the metadata every checkpoint carries."""
from __future__ import annotations

import csv
import io
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

try:
    import fcntl
except ImportError:  # Windows: run folders go unlocked
    fcntl = None

from .._version import __version__
from ..data import BUILTINS
from ..data.dataset import split_size
from ..errors import ImgclfError
from ..utils import atomic_write_text

METRIC_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]


def new_run_dir(project: Path, name: str) -> Path:
    """runs/NAME, or NAME-2, NAME-3 ... if taken: a run folder is never reused or overwritten."""
    project.mkdir(parents=True, exist_ok=True)
    for i in range(1, 10_000):
        path = project / (name if i == 1 else f"{name}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise ImgclfError(f"too many runs named {name} in {project}; pass --name")


class RunLock:
    """An exclusive lock on a run folder (``.lock``, an flock) while a process writes it: a second ``train
    --resume`` of the same run is a clear error instead of two writers interleaving. The kernel drops the
    lock when its process ends, however it ends (kill -9 included), so a dead process's lock is simply
    taken over. The file holds the owner's pid (for the message) and is removed on a clean exit."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        while fcntl is not None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                owner = os.read(fd, 32).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise ImgclfError(f"{self.path.parent} is in use by process {owner} (another `imgclf train` of "
                                  "this run); wait for it to end, or stop it first") from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the owner removed the file between our open and our lock: lock the new one
        else:
            return self
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.unlink(self.path)  # while still locked: whoever opened it meanwhile sees it gone and retries
            os.close(self.fd)     # releases the flock
            self.fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def write_metrics_csv(path: Path, history: list[dict[str, float]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


def checkpoint_meta(setup, state, kind: str, row: dict | None = None, extra: dict | None = None) -> dict:
    """What a checkpoint says of itself: architecture, classes, preprocessing, where its data came from (so
    evaluate/export find the same images again), the epoch and its metrics, the best score so far."""
    cfg, ds = setup.cfg, setup.ds
    return {
        "kind": kind,
        "imgclf_version": __version__,
        "torch_version": torch.__version__,
        "arch": setup.model.arch_args,
        "classes": ds.classes,
        "preprocess": setup.preprocess.to_dict(),
        "channels_last": cfg.channels_last,
        "data": {"source": ds.source, "name": ds.name, "builtin": cfg.data if cfg.data in BUILTINS else None,
                 "val_split": cfg.val_split,
                 "test_split": cfg.test_split, "seed": cfg.seed, "skip_bad_images": cfg.skip_bad_images,
                 **setup.decode_args},
        "epoch": state.epoch,
        "metrics": dict(row or (state.history[-1] if state.history else {})),
        "best": {"epoch": state.best_epoch, "monitor": cfg.monitor, "score": state.best_score},
        **(extra or {}),
    }


def write_run_json(path: Path, setup, status: str, processes: int, notes: list[str], **extra: Any) -> None:
    """run.json: the run's status, versions, machine and data summary (and, at the end, its test metrics)."""
    ds = setup.ds
    info = {
        "status": status,
        "imgclf_version": __version__, "torch_version": torch.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "device": str(setup.device), "precision": "bf16" if setup.autocast_dtype else "fp32",
        "processes": processes,
        "lr": setup.cfg.resolved_lr(), "val_every": setup.cfg.val_every,
        "command": " ".join(sys.argv) if sys.argv and sys.argv[0] else None,
        "data": {"source": ds.source, "name": ds.name, "classes": ds.classes, "channels": ds.channels,
                 "image_size": ds.image_size, "train": len(ds.train.y), "val": split_size(ds.val),
                 "test": split_size(ds.test),
                 "val_origin": ds.val_origin, "skipped": ds.skipped, **ds.edits},
        "notes": notes,
        **extra,
    }
    atomic_write_text(path, json.dumps(info, indent=2, default=str) + "\n")

