"""The verbs that make a trained model ready to ship: ``imgclf export`` (ONNX, LiteRT; int8) and ``imgclf prune``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def export(
    checkpoint: str = typer.Argument(..., help="Run folder or .safetensors checkpoint."),
    fmt: str = typer.Option("onnx", "--format", help="Export format: onnx, ort (ONNX Runtime's mobile format), or "
                            "tflite (LiteRT; its converter is installed into a venv of its own on first use, see "
                            "docs/export.md)."),
    int8: bool = typer.Option(False, "--int8", help="Also write a statically quantized int8 model (ONNX: QDQ, "
                              "per-channel; tflite: full-integer) and compare accuracy, size and speed."),
    out: Optional[Path] = typer.Option(None, help="File to write (default <checkpoint>.onnx / .int8.onnx, "
                                       ".ort / .int8.ort, .tflite / .int8.tflite)."),
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
    """Export to ONNX, ORT or LiteRT (tflite), then check parity with PyTorch on real test images: exit 1 when fp32
    agrees on fewer than 99.5% of top-1 classes, or int8 loses more than 0.5 (tflite: 1) accuracy points."""
    from ..deploy.export import ParityError
    from ..deploy.export import export as export_fn

    try:
        report = export_fn(checkpoint, fmt, int8=int8, out=out, data=data, calib_data=calib_data,
                           calib_images=calib_images, check_images=check_images, min_agreement=min_agreement,
                           max_int8_drop=max_int8_drop, speed=speed, portable=portable, progress=progress)
    except ParityError as e:
        typer.echo(json.dumps(e.report.to_dict(), indent=2) if as_json else e.report.table())
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.table())


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
    from ..training.prune import prune as prune_fn

    result = prune_fn(run, amount, epochs=epochs, importance=importance, global_ranking=global_ranking, name=name,
                      project=project, progress=progress)
    if result.status == "interrupted":
        raise typer.Exit(130)

