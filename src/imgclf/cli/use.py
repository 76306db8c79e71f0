"""The verbs that use a trained model: ``imgclf evaluate``, ``imgclf predict`` (images, or a video with
--source) and ``imgclf serve``."""
from __future__ import annotations

import csv
import json
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import ImgclfError


class Format(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


def evaluate(
    model: str = typer.Argument(..., help="Run folder, .safetensors checkpoint, .onnx, .ort or .tflite file."),
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
    from ..evaluation.evaluate import evaluate as evaluate_fn
    from ..evaluation.evaluate import format_evaluation

    m = evaluate_fn(model, data, split=split, batch_size=batch_size, device=device, tta=tta, calibrate=calibrate,
                    calibration_data=calibration_data, save=save, progress=progress)
    typer.echo(json.dumps(m, indent=2) if as_json else format_evaluation(m))


def predict(
    model: str = typer.Argument(..., help="Run folder, .safetensors checkpoint, .onnx, .ort or .tflite file."),
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
    if source is not None:
        if paths:
            raise ImgclfError("give images or --source, not both")
        if explain is not None:
            raise ImgclfError("--explain explains images, not --source videos; give image files instead")
        from ..data.video_process import start_decoding

        # a file starts decoding in a process of its own now, while torch and the model load (no torch above)
        early = start_decoding(model, source, every, timeout) if save is None else None
        from ..classifier import load
        from ..data.video import VideoError
        from ..deploy.video import label_video

        try:
            clf = load(model, device=device)
            video = (early.checked(clf) if early is not None else None) or source
            summary = label_video(clf, video, top_k=top_k, every=every, smooth=smooth, batch_size=batch_size,
                                  save=save, fmt=fmt.value, timeout=timeout)
        except VideoError as e:  # the frames before it were printed (and saved): say how many, then why
            if getattr(e, "summary", None):
                typer.echo(e.summary.line(), err=True)
            raise
        finally:
            if early is not None:  # whatever happened: the decoding process ends with the command's work
                early.close()
        typer.echo(summary.line(), err=True)
        if summary.stopped == "interrupted":
            raise typer.Exit(130)
        return
    if not paths:
        raise ImgclfError("give image files, folders or globs to predict, or --source for a video")
    from ..classifier import expand_inputs, load

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
        from ..explain import write_overlays

        written = write_overlays(clf, [p.source for p in preds if p.error is None], explain)
        typer.echo(f"explained {len(written)} images -> {explain}", err=True)
    failed = sum(p.error is not None for p in preds)
    if failed:
        typer.echo(f"{failed} of {len(preds)} image(s) could not be read", err=True)
        raise typer.Exit(1)



def serve(
    model: str = typer.Argument(..., help="Run folder, .safetensors checkpoint, .onnx, .ort or .tflite file."),
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
    from ..deploy.serve import ServeConfig
    from ..deploy.serve import serve as serve_fn

    serve_fn(model, host=host, port=port, device=device,
             config=ServeConfig(max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
                                max_files=max_files, max_upload_bytes=int(max_upload_mb * 1024 * 1024),
                                max_pixels=max_pixels, max_connections=max_connections,
                                header_timeout_s=header_timeout, body_timeout_s=body_timeout,
                                shutdown_timeout_s=shutdown_timeout))

