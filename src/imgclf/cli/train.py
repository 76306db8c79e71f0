"""``imgclf train``: every training flag, its help the config field's own description."""
from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer

from ..config import field_help


def _h(field: str) -> str:
    """A training flag's help: the config field's own description (config.py), written once."""
    return field_help()[field]


def train(
    data: Optional[str] = typer.Option(None, help=_h("data")),
    recipe: Optional[str] = typer.Option(None, help=_h("recipe")),
    time_budget: Optional[str] = typer.Option(None, help=_h("time_budget")),
    model: Optional[str] = typer.Option(None, help=_h("model")),
    pretrained: Optional[str] = typer.Option(None, help=_h("pretrained")),
    init_from: Optional[str] = typer.Option(None, help=_h("init_from")),
    freeze_epochs: Optional[int] = typer.Option(None, help=_h("freeze_epochs")),
    backbone_lr_mult: Optional[float] = typer.Option(None, help=_h("backbone_lr_mult")),
    freeze_blocks: Optional[int] = typer.Option(None, help=_h("freeze_blocks")),
    freeze_bn: Optional[bool] = typer.Option(None, "--freeze-bn/--no-freeze-bn", help=_h("freeze_bn")),
    class_weights: Optional[str] = typer.Option(None, help=_h("class_weights")),
    balanced_sampling: Optional[bool] = typer.Option(None, "--balanced-sampling", help=_h("balanced_sampling")),
    epochs: Optional[int] = typer.Option(None, help=_h("epochs")),
    batch_size: Optional[int] = typer.Option(None, help=_h("batch_size")),
    optimizer: Optional[str] = typer.Option(None, help=_h("optimizer")),
    lr: Optional[float] = typer.Option(None, help=_h("lr")),
    momentum: Optional[float] = typer.Option(None, help=_h("momentum")),
    weight_decay: Optional[float] = typer.Option(None, help=_h("weight_decay")),
    schedule: Optional[str] = typer.Option(None, help=_h("schedule")),
    label_smoothing: Optional[float] = typer.Option(None, help=_h("label_smoothing")),
    augment: Optional[str] = typer.Option(None, help=_h("augment")),
    patience: Optional[int] = typer.Option(None, help=_h("patience")),
    monitor: Optional[str] = typer.Option(None, help=_h("monitor")),
    restore_best: Optional[bool] = typer.Option(None, "--restore-best/--no-restore-best", help=_h("restore_best")),
    progressive: Optional[str] = typer.Option(None, help=_h("progressive")),
    val_split: Optional[float] = typer.Option(None, help=_h("val_split")),
    val_every: Optional[int] = typer.Option(None, help=_h("val_every")),
    tta: Optional[str] = typer.Option(None, help=_h("tta")),
    test_split: Optional[float] = typer.Option(None, help=_h("test_split")),
    fraction: Optional[float] = typer.Option(None, help=_h("fraction")),
    exclude: Optional[str] = typer.Option(None, help=_h("exclude")),
    relabel: Optional[str] = typer.Option(None, help=_h("relabel")),
    image_size: Optional[int] = typer.Option(None, help=_h("image_size")),
    skip_bad_images: Optional[bool] = typer.Option(None, "--skip-bad-images", help=_h("skip_bad_images")),
    data_in_memory: Optional[str] = typer.Option(None, help=_h("data_in_memory")),
    seed: Optional[int] = typer.Option(None, help=_h("seed")),
    device: Optional[str] = typer.Option(None, help=_h("device")),
    precision: Optional[str] = typer.Option(None, help=_h("precision")),
    sync_bn: Optional[bool] = typer.Option(None, "--sync-bn", help=_h("sync_bn")),
    project: Optional[str] = typer.Option(None, help=_h("project")),
    name: Optional[str] = typer.Option(None, help=_h("name")),
    log: Optional[List[str]] = typer.Option(None, help=_h("log")),
    config: Optional[Path] = typer.Option(None, help="TOML/JSON config file; flags override it."),
    resume: Optional[Path] = typer.Option(None, help="Continue the run in this folder from its `last` checkpoint."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and how long the run will take on "
                                 "this machine (from a few timed steps), then stop without writing anything."),
):
    """Train a model; prints one line per epoch and, last, the run folder's path."""
    from ..config import parse_duration
    from ..training.train import train as train_fn
    from ..utils import process_age

    overrides = {k: v for k, v in locals().items()
                 if k not in ("config", "resume", "progress", "dry_run", "train_fn", "parse_duration", "process_age")}
    overrides["time_budget"] = parse_duration(time_budget) if time_budget is not None else None
    overrides["log"] = log or None  # no --log: the config file's (or none), not an empty list over it
    # a time budget covers the whole command, start-up and imports included
    result = train_fn(config, resume=resume, progress=progress, started=time.monotonic() - process_age(),
                      dry_run=dry_run, **overrides)
    if result.status == "interrupted":
        raise typer.Exit(130)

