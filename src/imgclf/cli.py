"""The ``imgclf`` command: a thin verb -> function layer over the Python API.

    imgclf train --data ../shared/datasets/cifar10-jpeg.tar.gz --epochs 10
    imgclf evaluate runs/cifar10-seed-cnn
    imgclf predict runs/cifar10-seed-cnn cat.jpg photos/ "more/*.png" --top-k 3
    imgclf export runs/cifar10-seed-cnn --format onnx --int8
    imgclf prune runs/cifar10-seed-cnn --amount 0.5
    imgclf serve runs/cifar10-seed-cnn/best.int8.onnx
    imgclf models

Each verb calls the public function of the same name with the same arguments. Bad input ends with
one ``error: ...`` line and exit status 2, never a traceback.
"""
from __future__ import annotations

import csv
import json
import os
import sys
import time
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from .config import field_help
from .errors import ImgclfError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Train, judge and ship convolutional image classifiers.")


def _h(field: str) -> str:
    """A training flag's help: the config field's own description (config.py), written once."""
    return field_help()[field]


class Format(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


@app.command()
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
    from .config import parse_duration
    from .training.train import train as train_fn
    from .utils import process_age

    overrides = {k: v for k, v in locals().items()
                 if k not in ("config", "resume", "progress", "dry_run", "train_fn", "parse_duration", "process_age")}
    overrides["time_budget"] = parse_duration(time_budget) if time_budget is not None else None
    overrides["log"] = log or None  # no --log: the config file's (or none), not an empty list over it
    # a time budget covers the whole command, start-up and imports included
    result = train_fn(config, resume=resume, progress=progress, started=time.monotonic() - process_age(),
                      dry_run=dry_run, **overrides)
    if result.status == "interrupted":
        raise typer.Exit(130)


@app.command()
def evaluate(
    model: str = typer.Argument(..., help="Run folder, .safetensors checkpoint, .onnx or .tflite file."),
    data: Optional[str] = typer.Option(None, help="Other data to score on (default: the run's own test split)."),
    split: str = typer.Option("test", help="test, val or train."),
    batch_size: int = typer.Option(512, help="Evaluation batch size."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    tta: Optional[str] = typer.Option(None, help="Test-time augmentation: flip, flip+translate or translate "
                                      "(reports top-1 with and without)."),
    calibrate: bool = typer.Option(False, "--calibrate", help="Fit a temperature on the run's validation split, "
                                   "store it in the checkpoint (predict uses it), report ECE before/after."),
    calibration_data: Optional[str] = typer.Option(None, help="Held-out labelled images to fit the temperature on "
                                                   "(for runs without a validation split)."),
    save: Optional[bool] = typer.Option(None, "--save/--no-save", help="Write evaluation.json and "
                                        "classification_report.json/.txt beside the checkpoint (default: when "
                                        "scoring the run's own test split)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for machines."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
):
    """Loss, top-1/top-5, classification report, confusion matrix, most-confused pairs, calibration (ECE)."""
    from .evaluation.evaluate import evaluate as evaluate_fn
    from .evaluation.evaluate import format_evaluation

    m = evaluate_fn(model, data, split=split, batch_size=batch_size, device=device, tta=tta, calibrate=calibrate,
                    calibration_data=calibration_data, save=save, progress=progress)
    typer.echo(json.dumps(m, indent=2) if as_json else format_evaluation(m))


@app.command()
def predict(
    model: str = typer.Argument(..., help="Run folder, .safetensors checkpoint, .onnx or .tflite file."),
    paths: Optional[List[str]] = typer.Argument(None, help="Image files, folders or globs."),
    top_k: int = typer.Option(3, help="How many classes to show per image."),
    fmt: Format = typer.Option(Format.table, "--format", help="table, json or csv (one line per frame for "
                               "--source)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    source: Optional[str] = typer.Option(None, help="Label a video instead: a file, a camera index (0) or a "
                                         "stream URL (rtsp://, http://); Ctrl-C stops."),
    every: int = typer.Option(1, help="--source: classify every Nth frame."),
    smooth: int = typer.Option(1, help="--source: average the probabilities of the last N classified frames."),
    save: Optional[str] = typer.Option(None, help="--source: write the video with the labels drawn on it "
                                       "(.mp4, .mkv, .mov, .webm or .avi)."),
    batch_size: Optional[int] = typer.Option(None, help="--source: most frames per forward pass (default 32; a "
                                             "camera or stream sends those waiting)."),
    timeout: float = typer.Option(10.0, help="--source: seconds a camera or stream may give no frame."),
    explain: Optional[Path] = typer.Option(None, help="Also write a heat map (LayerCAM) over each image (where the "
                                           "model looked for its top class) as a PNG into this folder; needs a "
                                           "run folder or checkpoint, not an exported .onnx or .tflite file."),
):
    """Predict classes for images, or for every frame of a video (--source); unreadable files get their own
    error line (exit 1 if any)."""
    from .classifier import expand_inputs, load

    if source is not None:
        if paths:
            raise ImgclfError("give images or --source, not both")
        if explain is not None:
            raise ImgclfError("--explain explains images, not --source videos; give image files instead")
        from .data.video import VideoError
        from .deploy.video import label_video

        try:
            summary = label_video(load(model, device=device), source, top_k=top_k, every=every, smooth=smooth,
                                  batch_size=batch_size, save=save, fmt=fmt.value, timeout=timeout)
        except VideoError as e:  # the frames before it were printed (and saved): say how many, then why
            if getattr(e, "summary", None):
                typer.echo(e.summary.line(), err=True)
            raise
        typer.echo(summary.line(), err=True)
        if summary.stopped == "interrupted":
            raise typer.Exit(130)
        return
    if not paths:
        raise ImgclfError("give image files, folders or globs to predict, or --source for a video")
    clf = load(model, device=device)
    files = expand_inputs(paths)
    if not files:
        raise ImgclfError("no images found in the given paths")
    if explain is not None:
        clf.explain([])  # an exported model refuses here, before any output
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
    if explain is not None:
        from .explain import write_overlays

        written = write_overlays(clf, [p.source for p in preds if p.error is None], explain)
        typer.echo(f"explained {len(written)} images -> {explain}", err=True)
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
    # Keras counts BatchNorm's running mean/variance as (non-trainable) parameters; shown for comparison
    typer.echo(f"{'model':<{width}}  {'parameters':>12}  {'Keras count':>12}  description")
    for r in rows:
        typer.echo(f"{r['name']:<{width}}  {r['params']:>12,}  {r.get('keras_params', r['params']):>12,}  "
                   f"{r.get('description', '')}")


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


@app.command()
def export(
    checkpoint: str = typer.Argument(..., help="Run folder or .safetensors checkpoint."),
    fmt: str = typer.Option("onnx", "--format", help="Export format: onnx, or tflite (LiteRT; its converter is "
                            "installed into a venv of its own on first use, see docs/export.md)."),
    int8: bool = typer.Option(False, "--int8", help="Also write a statically quantized int8 model (ONNX: QDQ, "
                              "per-channel; tflite: full-integer) and compare accuracy, size and speed."),
    out: Optional[Path] = typer.Option(None, help="File to write (default <checkpoint>.onnx / .int8.onnx, "
                                       ".tflite / .int8.tflite)."),
    data: Optional[str] = typer.Option(None, help="Images for the parity check (default: the run's test split)."),
    calib_data: Optional[str] = typer.Option(None, help="Images to calibrate int8 on (default: the run's "
                                             "training split)."),
    calib_images: int = typer.Option(300, help="How many images to calibrate int8 on."),
    check_images: int = typer.Option(2000, help="Test images for the parity check (0 = all)."),
    min_agreement: float = typer.Option(0.995, help="Least top-1 agreement of the fp32 export with PyTorch that "
                                        "passes."),
    max_int8_drop: Optional[float] = typer.Option(None, help="Most top-1 accuracy int8 may lose (default 0.005 = "
                                                  "0.5 points for onnx, 0.01 for tflite)."),
    speed: bool = typer.Option(True, "--speed/--no-speed", help="Measure images/s (onnx: batch 256; tflite: "
                               "batch 1 and 64)."),
    portable: bool = typer.Option(False, "--portable", help="int8: keep every weight zero point at 0 (runtimes "
                                  "such as TensorRT need it) instead of picking ONNX Runtime's faster kernel per "
                                  "layer on this CPU."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for machines."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
):
    """Export to ONNX or LiteRT (tflite), then check parity with PyTorch on real test images: exit 1 when fp32
    agrees on fewer than 99.5% of top-1 classes, or int8 loses more than 0.5 (tflite: 1) accuracy points."""
    from .deploy.export import ParityError
    from .deploy.export import export as export_fn

    try:
        report = export_fn(checkpoint, fmt, int8=int8, out=out, data=data, calib_data=calib_data,
                           calib_images=calib_images, check_images=check_images, min_agreement=min_agreement,
                           max_int8_drop=max_int8_drop, speed=speed, portable=portable, progress=progress)
    except ParityError as e:
        typer.echo(json.dumps(e.report.to_dict(), indent=2) if as_json else e.report.table())
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.table())


@app.command()
def prune(
    run: str = typer.Argument(..., help="Run folder (or its checkpoint): its config.toml sets the fine-tune."),
    amount: float = typer.Option(0.5, help="Share of every prunable layer's channels to remove, strictly between 0 "
                                 "and 1 (0.5: half)."),
    epochs: Optional[int] = typer.Option(None, help="Fine-tuning epochs (default: an eighth of the run's, at least "
                                         "1)."),
    importance: str = typer.Option("taylor", help="How channels are ranked: taylor (|weight x gradient| on 2,000 of "
                                   "the run's training images) or magnitude (their weights' L2 norm, no data)."),
    global_ranking: bool = typer.Option(False, "--global", help="Rank all layers' channels together (wide layers "
                                        "may give up more) instead of the same share of each layer."),
    name: Optional[str] = typer.Option(None, help="Run folder name (default: <run>-pruned<amount>)."),
    project: Optional[str] = typer.Option(None, help="Parent folder of the new run (default: the run's project)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
):
    """Remove channels from a trained run's model (structured pruning), fine-tune it briefly with the run's recipe,
    and write a new run folder; prints parameters and MACs before and after, and, last, the folder."""
    from .training.prune import prune as prune_fn

    result = prune_fn(run, amount, epochs=epochs, importance=importance, global_ranking=global_ranking, name=name,
                      project=project, progress=progress)
    if result.status == "interrupted":
        raise typer.Exit(130)


@app.command()
def serve(
    model: str = typer.Argument(..., help="Run folder, .safetensors checkpoint, .onnx or .tflite file."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (127.0.0.1: this machine only)."),
    port: int = typer.Option(8000, help="Port."),
    max_batch: int = typer.Option(64, help="Most images in one forward pass."),
    max_wait_ms: float = typer.Option(5.0, help="How long to collect requests into one batch."),
    max_queue: int = typer.Option(512, help="Images waiting at most; past it, 503 with Retry-After."),
    max_files: int = typer.Option(16, help="Most images in one request (more: 413)."),
    max_upload_mb: float = typer.Option(20.0, help="Largest request body in MB (more: 413)."),
    max_pixels: int = typer.Option(50_000_000, help="Largest image in pixels, read from its header before "
                                   "decoding (more: 413, a decompression bomb)."),
    max_connections: int = typer.Option(64, help="Open connections or requests in progress at most; past it, "
                                        "503 with Retry-After."),
    header_timeout: float = typer.Option(5.0, help="Seconds a client has to send a request's headers (then "
                                         "disconnected: slowloris)."),
    body_timeout: float = typer.Option(10.0, help="Seconds a request's whole body may take to arrive (then 408); "
                                       "raise it for large uploads over slow links."),
    shutdown_timeout: int = typer.Option(5, help="On SIGTERM or Ctrl-C, seconds requests in progress get to "
                                         "finish."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N (checkpoints)."),
):
    """Serve the model over HTTP: POST /predict, GET /health, GET /model, a web page at /, API docs at /docs."""
    from .deploy.serve import ServeConfig
    from .deploy.serve import serve as serve_fn

    serve_fn(model, host=host, port=port, device=device,
             config=ServeConfig(max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
                                max_files=max_files, max_upload_bytes=int(max_upload_mb * 1024 * 1024),
                                max_pixels=max_pixels, max_connections=max_connections,
                                header_timeout_s=header_timeout, body_timeout_s=body_timeout,
                                shutdown_timeout_s=shutdown_timeout))


@app.command()
def report(
    run: str = typer.Argument(..., help="Run folder."),
    tta: Optional[str] = typer.Option(None, help="Also report test-time augmentation: flip, flip+translate or "
                                      "translate (default: what the last evaluation used)."),
    batch_size: int = typer.Option(512, help="Evaluation batch size."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
):
    """Re-score the run's test split and rewrite its plots and report.html; prints the report's path."""
    from .evaluation.report import report as report_fn

    typer.echo(report_fn(run, tta=tta, batch_size=batch_size, device=device, progress=progress))


@app.command()
def inspect(
    data: str = typer.Argument(..., help="Dataset: built-in name, archive, or image folder (as --data takes)."),
    out: Optional[Path] = typer.Option(None, help="Folder for class_counts.png, samples.png, inspect.json "
                                       "(default inspect-<name>)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for machines."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
):
    """Images per class per split, stored sizes and modes, imbalance, train/test duplicates, unreadable files."""
    from .evaluation.inspect import format_inspect
    from .evaluation.inspect import inspect as inspect_fn

    info = inspect_fn(data, out=out, progress=progress)
    typer.echo(json.dumps(info, indent=2) if as_json else format_inspect(info))


@app.command()
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
    from .evaluation.doctor import doctor as doctor_fn
    from .evaluation.doctor import format_doctor

    typer.echo(format_doctor(doctor_fn(data, out=out, folds=folds, image_size=image_size, seed=seed,
                                       skip_bad_images=skip_bad_images, progress=progress)))


@app.command()
def shards(
    source: Path = typer.Argument(..., help="Image folder (train/<class>/*, test/<class>/*, or <class>/*) or a "
                                  ".tar/.tar.gz/.zip of one."),
    out: Path = typer.Argument(..., help="Folder for the shards (empty or new)."),
    per_shard: int = typer.Option(1000, help="Images per shard."),
):
    """Write an image folder as WebDataset-style tar shards (key.jpg + key.cls, split-named), for --data."""
    from .data.webdataset import write_shards

    info = write_shards(source, out, per_shard=per_shard)
    splits = ", ".join(f"{k} {v:,}" for k, v in info.items() if k not in ("shards", "classes"))
    typer.echo(f"wrote {info['shards']} shards to {out} ({splits} images; {info['classes']} classes in "
               f"{out / 'classes.txt'}); train with --data {out}")


@app.command()
def compare(
    runs: List[str] = typer.Argument(..., help="Run folders."),
    out: Optional[Path] = typer.Option(None, help="Folder for compare.html and compare.png (default: the "
                                       "first run's parent)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for machines."),
):
    """One table of the runs (model, parameters, time, accuracy, macro F1) and their validation curves."""
    from .evaluation.runs import compare as compare_fn
    from .evaluation.runs import format_runs, to_json

    result = compare_fn(runs, out=out)
    if as_json:
        typer.echo(to_json(result["runs"]))
        return
    typer.echo(format_runs(result["runs"]))
    typer.echo(f"written: {', '.join(result['files'])}")


@app.command()
def runs(
    folder: Path = typer.Argument(Path("runs"), help="Folder holding run folders."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for machines."),
):
    """List the runs in a folder, newest first, with their headline figures."""
    from .evaluation.runs import format_runs, to_json
    from .evaluation.runs import runs as runs_fn

    rows = runs_fn(folder)
    if as_json:
        typer.echo(to_json(rows))
    elif not rows:
        typer.echo(f"no runs in {folder}")
    else:
        typer.echo(format_runs(rows))


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``imgclf`` console script and ``python -m imgclf``."""
    try:
        app(args=argv, prog_name="imgclf")
    except ImgclfError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except OSError as e:
        from .utils import DISK_ERRNOS

        if e.errno not in DISK_ERRNOS:  # a bug, not the disk: the traceback is what helps
            raise
        where = f"{e.filename}: " if e.filename else ""
        typer.echo(f"error: {where}{os.strerror(e.errno)}; free disk space or check permissions, then run again",
                   err=True)
        sys.exit(2)
    except MemoryError:  # what was being built is gone with the stack; the process can still say so
        typer.echo("error: out of memory; use a smaller --batch-size or --eval-batch-size, --data-in-memory no, "
                   "or free memory", err=True)
        sys.exit(1)
