"""The verbs that look at what there is: ``imgclf models``, ``datasets``, ``report``, ``inspect``, ``doctor``,
``compare`` and ``runs``; and ``imgclf shards``, which writes an image folder as shards for --data."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer


def models(
    num_classes: int = typer.Option(10, help="Classes, for the parameter count."),
    in_channels: int = typer.Option(3, help="Input channels, for the parameter count."),
    image_size: int = typer.Option(32, help="Input size, for the parameter count."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for machines."),
):
    """List the registered models with their parameter counts."""
    from ..models import list_models, model_info

    rows = [model_info(n, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
            for n in list_models()]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    width = max(len(r["name"]) for r in rows)
    # Keras counts BatchNorm's running mean/variance as (non-trainable) parameters; shown for comparison
    typer.echo(f"{'model':<{width}}  {'parameters':>12}  {'Keras count':>12}  description")
    for r in rows:
        typer.echo(f"{r['name']:<{width}}  {r['params']:>12,}  {r.get('keras_params', r['params']):>12,}  "
                   f"{r.get('description', '')}")


def datasets(as_json: bool = typer.Option(False, "--json", help="Print JSON for machines.")):
    """List the built-in datasets, whether they are downloaded, and where they are cached."""
    from ..data import list_datasets

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


def report(
    run: str = typer.Argument(..., help="Run folder."),
    tta: Optional[str] = typer.Option(None, help="Also report test-time augmentation: flip, flip+translate or "
                                      "translate (default: what the last evaluation used)."),
    batch_size: int = typer.Option(512, help="Evaluation batch size."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
):
    """Re-score the run's test split and rewrite its plots and report.html; prints the report's path."""
    from ..evaluation.report import report as report_fn

    typer.echo(report_fn(run, tta=tta, batch_size=batch_size, device=device, progress=progress))


def inspect(
    data: str = typer.Argument(..., help="Dataset: built-in name, archive, or image folder (as --data takes)."),
    out: Optional[Path] = typer.Option(None, help="Folder for class_counts.png, samples.png, inspect.json "
                                       "(default inspect-<name>)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for machines."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
):
    """Images per class per split, stored sizes and modes, imbalance, train/test duplicates, unreadable files."""
    from ..evaluation.inspect import format_inspect
    from ..evaluation.inspect import inspect as inspect_fn

    info = inspect_fn(data, out=out, progress=progress)
    typer.echo(json.dumps(info, indent=2) if as_json else format_inspect(info))


def doctor(
    data: str = typer.Argument(..., help="Dataset: an image folder or archive (or anything --data takes)."),
    out: Optional[Path] = typer.Option(None, help="Folder for doctor.html and doctor.csv (default doctor/<name>)."),
    folds: int = typer.Option(5, help="Folds of the cross-validation that gives each image's out-of-fold "
                              "probabilities (every class needs this many images)."),
    image_size: int = typer.Option(192, help="Side the images are embedded at, px."),
    seed: int = typer.Option(0, help="Seed of the folds."),
    skip_bad_images: bool = typer.Option(False, "--skip-bad-images", help="Leave unreadable images out."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
):
    """Label issues (images whose label looks wrong), near-duplicates within and across splits, outliers: a
    page with thumbnails (doctor.html) and a CSV to mark exclude/relabel and give to `train --exclude/--relabel`."""
    from ..evaluation.doctor import doctor as doctor_fn
    from ..evaluation.doctor import format_doctor

    typer.echo(format_doctor(doctor_fn(data, out=out, folds=folds, image_size=image_size, seed=seed,
                                       skip_bad_images=skip_bad_images, progress=progress)))


def shards(
    source: Path = typer.Argument(..., help="Image folder (train/<class>/*, test/<class>/*, or <class>/*) or a "
                                  ".tar/.tar.gz/.zip of one."),
    out: Path = typer.Argument(..., help="Folder for the shards (empty or new)."),
    per_shard: int = typer.Option(1000, help="Images per shard."),
):
    """Write an image folder as WebDataset-style tar shards (key.jpg + key.cls, split-named), for --data."""
    from ..data.webdataset import write_shards

    info = write_shards(source, out, per_shard=per_shard)
    splits = ", ".join(f"{k} {v:,}" for k, v in info.items() if k not in ("shards", "classes"))
    typer.echo(f"wrote {info['shards']} shards to {out} ({splits} images; {info['classes']} classes in "
               f"{out / 'classes.txt'}); train with --data {out}")


def compare(
    runs: List[str] = typer.Argument(..., help="Run folders."),
    out: Optional[Path] = typer.Option(None, help="Folder for compare.html and compare.png (default: the "
                                       "first run's parent)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for machines."),
):
    """One table of the runs (model, parameters, time, accuracy, macro F1) and their validation curves."""
    from ..evaluation.runs import compare as compare_fn
    from ..evaluation.runs import format_runs, to_json

    result = compare_fn(runs, out=out)
    if as_json:
        typer.echo(to_json(result["runs"]))
        return
    typer.echo(format_runs(result["runs"]))
    typer.echo(f"written: {', '.join(result['files'])}")


def runs(
    folder: Path = typer.Argument(Path("runs"), help="Folder holding run folders."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for machines."),
):
    """List the runs in a folder, newest first, with their headline figures."""
    from ..evaluation.runs import format_runs, to_json
    from ..evaluation.runs import runs as runs_fn

    rows = runs_fn(folder)
    if as_json:
        typer.echo(to_json(rows))
    elif not rows:
        typer.echo(f"no runs in {folder}")
    else:
        typer.echo(format_runs(rows))

