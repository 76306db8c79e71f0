"""The run folder's files that training writes as it goes: a fresh folder per run, and metrics.csv."""
from __future__ import annotations

import csv
import io
from pathlib import Path

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


def write_metrics_csv(path: Path, history: list[dict[str, float]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())
