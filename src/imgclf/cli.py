"""The ``imgclf`` command: a thin verb -> function layer over the Python API.

    imgclf train --data ../shared/datasets/cifar10-jpeg.tar.gz --epochs 10
    imgclf evaluate runs/cifar10-seed-cnn
    imgclf predict runs/cifar10-seed-cnn cat.jpg photos/ "more/*.png" --top-k 3
    imgclf models

Each verb calls the public function of the same name with the same arguments. Bad input ends with
one ``error: ...`` line and exit status 2, never a traceback.
"""
from __future__ import annotations

import csv
import json
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from .errors import ImgclfError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Train, judge and ship convolutional image classifiers.")


class Format(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


@app.command()
def train(
    data: Optional[str] = typer.Option(None, help="Built-in name (cifar10), official archive/folder, or an image "
                                       "folder / .tar(.gz) / .zip of one (train/<class>/*, test/<class>/*)."),
    model: Optional[str] = typer.Option(None, help="Model name; see `imgclf models`."),
    epochs: Optional[int] = typer.Option(None, help="Number of epochs."),
    batch_size: Optional[int] = typer.Option(None, help="Training batch size."),
    optimizer: Optional[str] = typer.Option(None, help="adam, adamw or sgd (Nesterov)."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (default: adam 1e-3, sgd 0.05)."),
    momentum: Optional[float] = typer.Option(None, help="SGD momentum."),
    weight_decay: Optional[float] = typer.Option(None, help="Weight decay."),
    schedule: Optional[str] = typer.Option(None, help="constant, onecycle, cosine or plateau."),
    label_smoothing: Optional[float] = typer.Option(None, help="Label smoothing (0 = off)."),
    augment: Optional[str] = typer.Option(None, help="Augmentation preset: none, flip, standard, strong, seed004."),
    patience: Optional[int] = typer.Option(None, help="Early stopping patience in epochs (0 = off)."),
    monitor: Optional[str] = typer.Option(None, help="val_loss or val_acc: picks the best epoch."),
    restore_best: Optional[bool] = typer.Option(None, "--restore-best/--no-restore-best",
                                                help="End with the best epoch's weights."),
    val_split: Optional[float] = typer.Option(None, help="Fraction of train held out for validation."),
    test_split: Optional[float] = typer.Option(None, help="Fraction held out for test if the data has no test/."),
    fraction: Optional[float] = typer.Option(None, help="Train on this fraction of the training images "
                                             "(stratified, seeded), for quick runs."),
    image_size: Optional[int] = typer.Option(None, help="Input size in pixels (default: the data's native size)."),
    skip_bad_images: Optional[bool] = typer.Option(None, "--skip-bad-images",
                                                   help="Skip unreadable images (listed) instead of stopping."),
    seed: Optional[int] = typer.Option(None, help="Random seed (same seed, same run)."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda or cuda:N."),
    precision: Optional[str] = typer.Option(None, help="auto, fp32 or bf16."),
    project: Optional[str] = typer.Option(None, help="Folder that holds run folders (default runs)."),
    name: Optional[str] = typer.Option(None, help="Run folder name (default <data>-<model>, auto-numbered)."),
    config: Optional[Path] = typer.Option(None, help="TOML/JSON config file; flags override it."),
    resume: Optional[Path] = typer.Option(None, help="Continue the run in this folder from its `last` checkpoint."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
):
    """Train a model; prints one line per epoch and, last, the run folder's path."""
    from .train import train as train_fn

    overrides = {k: v for k, v in locals().items() if k not in ("config", "resume", "progress", "train_fn")}
    result = train_fn(config, resume=resume, progress=progress, **overrides)
    if result.status == "interrupted":
        raise typer.Exit(130)


@app.command()
def evaluate(
    model: str = typer.Argument(..., help="Run folder or .safetensors checkpoint."),
    data: Optional[str] = typer.Option(None, help="Other data to score on (default: the run's own test split)."),
    split: str = typer.Option("test", help="test, val or train."),
    batch_size: int = typer.Option(512, help="Evaluation batch size."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for machines."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
):
    """Test loss, top-1, top-5 and per-class accuracy."""
    from .evaluate import evaluate as evaluate_fn

    m = evaluate_fn(model, data, split=split, batch_size=batch_size, device=device, progress=progress)
    if as_json:
        typer.echo(json.dumps(m, indent=2))
        return
    typer.echo(f"{m['split']} on {m['data']}  ({m['n']:,} images, {m['checkpoint']})")
    typer.echo(f"loss {m['loss']:.4f}   top-1 {m['top1']:.2%}   top-5 {m['top5']:.2%}")
    width = max(len(c) for c in m["per_class_accuracy"])
    for cls, acc in m["per_class_accuracy"].items():
        typer.echo(f"  {cls:<{width}}  {'-' if acc is None else f'{acc:.2%}'}")


@app.command()
def predict(
    model: str = typer.Argument(..., help="Run folder or .safetensors checkpoint."),
    paths: List[str] = typer.Argument(..., help="Image files, folders or globs."),
    top_k: int = typer.Option(3, help="How many classes to show per image."),
    fmt: Format = typer.Option(Format.table, "--format", help="table, json or csv."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
):
    """Predict classes for images; unreadable files get their own error line (exit 1 if any)."""
    from .predict import expand_inputs, load

    clf = load(model, device=device)
    files = expand_inputs(paths)
    if not files:
        raise ImgclfError("no images found in the given paths")
    preds = clf.predict(files, top_k=top_k, errors="report")
    if fmt == Format.json:
        typer.echo(json.dumps([p.to_dict() for p in preds], indent=2))
    elif fmt == Format.csv:
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(["source", "rank", "class", "probability", "error"])
        for p in preds:
            if p.error:
                w.writerow([p.source, "", "", "", p.error])
            for rank, (c, prob) in enumerate(p.top, 1):
                w.writerow([p.source, rank, c, f"{prob:.6f}", ""])
    else:
        for p in preds:
            if p.error:
                typer.echo(f"{p.source}: error: {p.error}")
            else:
                typer.echo(f"{p.source}: " + "  ".join(f"{c} {prob:.1%}" for c, prob in p.top))
    failed = sum(p.error is not None for p in preds)
    if failed:
        typer.echo(f"{failed} of {len(preds)} image(s) could not be read", err=True)
        raise typer.Exit(1)


@app.command()
def models(
    num_classes: int = typer.Option(10, help="Classes, for the parameter count."),
    in_channels: int = typer.Option(3, help="Input channels, for the parameter count."),
    image_size: int = typer.Option(32, help="Input size, for the parameter count."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for machines."),
):
    """List the registered models with their parameter counts."""
    from .models import list_models, model_info

    rows = [model_info(n, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
            for n in list_models()]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    width = max(len(r["name"]) for r in rows)
    typer.echo(f"{'model':<{width}}  {'parameters':>12}  description")
    for r in rows:
        typer.echo(f"{r['name']:<{width}}  {r['params']:>12,}  {r.get('description', '')}")


@app.command()
def datasets(as_json: bool = typer.Option(False, "--json", help="Print JSON for machines.")):
    """List the built-in datasets, whether they are downloaded, and where they are cached."""
    from .data import list_datasets

    rows = list_datasets()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        state = "downloaded" if r["downloaded"] else "not downloaded"
        typer.echo(f"{r['name']:<{width}}  {r['classes']:>3} classes  {r['image_size']}px  {state:<14}  "
                   f"{r['description']}")
        typer.echo(f"{'':<{width}}  {r['path']}")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``imgclf`` console script and ``python -m imgclf``."""
    try:
        app(args=argv, prog_name="imgclf")
    except ImgclfError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
