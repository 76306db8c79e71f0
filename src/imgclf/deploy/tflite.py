"""Export a trained model to LiteRT (TensorFlow Lite): a ``.tflite`` flatbuffer for phones and edge devices,
fp32 and full-integer int8, with the same parity check as the ONNX export.

    report = imgclf.export("runs/x", "tflite", int8=True)   # best.int8.tflite (best.tflite beside it)
    clf = imgclf.load("runs/x/best.int8.tflite")            # a TfliteClassifier: predict / evaluate

The way there: ``torch.export`` of the model behind a uint8 NHWC front (here, with imgclf's torch), then
litert-torch converts that program in its own Python (litert_venv.py) and ai-edge-quantizer makes the int8
file from the fp32 one, calibrated on training images. The file takes uint8 (1, H, W, C) pixels, 0..255 after
imgclf's resize (a camera frame's layout; the normalisation is inside), gives the logits, and holds the
classes and preprocessing as a metadata entry (tflite_runtime.py reads it back).
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._version import __version__
from ..classifier import Classifier
from ..errors import ImgclfError
from ..inference import BaseClassifier
from ..tflite_runtime import META_KEY, TfliteClassifier, load_tflite, write_metadata
from .litert_venv import LITERT_TORCH, converter_python, run_converter
from .parity import (
    MIN_AGREEMENT,
    BackendResult,
    ExportReport,
    ParityError,
    WithNormalization,
    accuracy,
    calibration_images,
    check_set,
    compare,
    export_paths,
    throughput,
)

MAX_INT8_DROP = 0.01    # int8 may lose at most 1 point: ai-edge-quantizer's plain min/max calibration
SECOND_BATCH = 64       # the batch speed is also measured at, for files the interpreter can resize to it


class _Pixels(WithNormalization):
    """uint8 (N, H, W, C) pixels in, as camera frames and bitmaps come, ``{"logits": ...}`` out (the dict names
    the file's output): the normalisation ``(x / 255 - mean) / std`` is the program's first two ops."""

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": super().forward(image.permute(0, 3, 1, 2))}


def _global_max_pool(x: torch.Tensor, output_size) -> tuple[torch.Tensor, torch.Tensor]:
    """adaptive_max_pool2d to 1x1 (FastNet's pooling) as a max over the plane: litert-torch has no lowering
    for adaptive_max_pool2d, and its REDUCE_MAX is the same thing. The indices are never used."""
    v = x.amax(dim=(2, 3), keepdim=True)
    return v, torch.zeros_like(v, dtype=torch.int64)


def program(clf: Classifier) -> torch.export.ExportedProgram:
    """The model as a ``torch.export`` program of batch 1 (dynamic batches fail in litert-torch's lowering)."""
    spec = clf.preprocess
    # A copy in the plain layout: the program holds the very weight tensors it was traced with, and litert-torch
    # reads channels-last ones (how imgclf keeps them) in the wrong order (FastNet: 92 % agreement).
    model = copy.deepcopy(clf.model).to("cpu", memory_format=torch.contiguous_format)
    image = torch.zeros(1, spec.image_size, spec.image_size, spec.channels, dtype=torch.uint8)
    with warnings.catch_warnings():  # torch.export's deprecation notes about its own internals
        warnings.simplefilter("ignore")
        try:
            ep = torch.export.export(_Pixels(model, spec).eval(), (), {"image": image})
        except Exception as e:  # torch.export raises many types (Unsupported, UserError, ...)
            raise ImgclfError(f"torch.export cannot trace {clf.meta.get('arch', {}).get('name', 'the model')} "
                              f"({' '.join(str(e).split())[:200]})") from None
        table = decompositions(model)
        if table:
            ep = ep.run_decompositions(table)
    return ep


def decompositions(model: nn.Module) -> dict:
    """The ops of ``model`` rewritten before conversion, into ops litert-torch lowers."""
    pools = [m for m in model.modules() if isinstance(m, nn.AdaptiveMaxPool2d)]
    if pools and all(m.output_size in (1, (1, 1), [1, 1]) for m in pools):
        return {torch.ops.aten.adaptive_max_pool2d.default: _global_max_pool}
    return {}


def tflite_metadata(clf: Classifier, precision: str) -> dict[str, str]:
    """Metadata entries of an exported file: the full imgclf metadata + flat ones for any reader."""
    spec = clf.preprocess
    meta = {k: v for k, v in clf.meta.items() if k not in ("format", "format_version")}
    meta["tflite"] = {
        "precision": precision, "converter": LITERT_TORCH, "source": str(clf.path) if clf.path else None,
        "input": f"image: uint8 (1, {spec.image_size}, {spec.image_size}, {spec.channels}) NHWC, 0..255, RGB/L; "
                 f"resize: {spec.resize}; normalisation is inside the graph",
        "output": "logits: float32" if precision == "fp32" else "logits: int8, real = scale * (q - zero_point)",
        "quantization": None if precision == "fp32" else "ai-edge-quantizer static_wi8_ai8: int8 weights per "
                        "channel, int8 activations calibrated on training images",
        "imgclf_version": __version__}
    return {META_KEY: json.dumps(meta), "classes": json.dumps(clf.classes), "preprocess": json.dumps(spec.to_dict()),
            "imgclf_version": __version__}


def convert(clf: Classifier, fp32_out: Path, int8_out: Path | None = None, calib: np.ndarray | None = None,
            progress: bool = True) -> None:
    """Write ``clf`` as an fp32 .tflite (and, given calibration images, an int8 one), metadata included."""
    arch = clf.meta.get("arch", {}).get("name", "the model")
    ep = program(clf)  # before the converter's venv, which may take a minute to build
    python = converter_python(progress)
    with tempfile.TemporaryDirectory(prefix="imgclf-litert-") as tmp:
        work = Path(tmp)
        with warnings.catch_warnings():  # "No complete tensor found in the group": about GPU weights, not ours
            warnings.simplefilter("ignore")
            torch.export.save(ep, str(work / "model.pt2"))
        job: dict[str, Any] = {"program": str(work / "model.pt2"), "out": str(work / "fp32.tflite"),
                               "shape": [1, clf.preprocess.image_size, clf.preprocess.image_size,
                                         clf.preprocess.channels], "int8_out": None}
        if int8_out is not None:
            np.save(work / "calib.npy", calib)
            job.update(int8_out=str(work / "int8.tflite"), calib=str(work / "calib.npy"))
        result = run_converter(python, job, work)
        if not result.get("ok"):
            why = f"litert-torch has no lowering for {result['op']}" if result.get("op") else result.get("error")
            raise ImgclfError(f"LiteRT cannot convert {arch}: {why}")
        write_metadata(work / "fp32.tflite", tflite_metadata(clf, "fp32"), out=fp32_out)
        if int8_out is not None:
            write_metadata(work / "int8.tflite", tflite_metadata(clf, "int8"), out=int8_out)


def export_tflite(checkpoint: str | Path, *, int8: bool = False, out: str | Path | None = None,
                  data: str | None = None, calib_data: str | None = None, calib_images: int = 300,
                  check_images: int = 2000, min_agreement: float = MIN_AGREEMENT,
                  max_int8_drop: float = MAX_INT8_DROP, speed: bool = True, progress: bool = True) -> ExportReport:
    """Export to ``<checkpoint>.tflite`` (``int8``: ``<checkpoint>.int8.tflite``, the fp32 file beside it), then
    run the files in the LiteRT interpreter on the run's test images against PyTorch, as :func:`export` does
    for ONNX: raises :class:`ParityError` when fp32 agrees on fewer than ``min_agreement`` of the top-1
    classes or int8 loses more than ``max_int8_drop`` accuracy (0.01 = 1 point). Speed: images/s at batch 1,
    and at batch 64 where the interpreter can resize the file to it."""
    clf, src, out, fp32_out = export_paths(checkpoint, out, int8, ".tflite")

    x, y, source, ds = check_set(clf, data, check_images, progress)
    calib = calibration_images(clf, ds, data, calib_data, calib_images, progress) if int8 else None
    ref = clf.logits(x)
    rows = [BackendResult("pytorch fp32", str(src), src.stat().st_size, None, None, accuracy(ref, y), None)]
    convert(clf, fp32_out, out if int8 else None, calib, progress)
    models: list[BaseClassifier] = [clf, load_tflite(fp32_out)] + ([load_tflite(out)] if int8 else [])
    rows += [_row(name, m, ref, x, y) for name, m in zip(("tflite fp32", "tflite int8"), models[1:])]
    report = ExportReport(out=out, rows=rows, n_images=len(y), data=source, min_agreement=min_agreement,
                          max_int8_drop=max_int8_drop, speed_batch=1)
    if speed:
        _measure(report, models, x)
    if not report.ok:
        raise ParityError(f"{out}: {'; '.join(report.failures)}: the exported model predicts differently "
                          "from PyTorch (the file is kept for inspection)", report)
    return report


def _measure(report: ExportReport, models: list[BaseClassifier], x: torch.Tensor) -> None:
    """Images/s at batch 1 (a phone's case) for every row, then at SECOND_BATCH for those that can batch."""
    rows = report.rows
    for row, ips in zip(rows, throughput(models, x, batch_size=1)):
        row.images_per_s = ips
    batched = [i for i, m in enumerate(models) if not isinstance(m, TfliteClassifier) or m.resizable]
    if len(batched) > 1:
        report.second_batch = SECOND_BATCH
        for i, ips in zip(batched, throughput([models[i] for i in batched], x, batch_size=SECOND_BATCH)):
            rows[i].images_per_s_batch = ips
    if len(rows) == 3 and rows[2].images_per_s <= rows[1].images_per_s:
        report.warnings.append(f"int8 is not faster than fp32 on this CPU ({rows[2].images_per_s:,.0f} vs "
                               f"{rows[1].images_per_s:,.0f} images/s at batch 1); phones with int8 units differ")


def _row(name: str, clf: TfliteClassifier, ref: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> BackendResult:
    logits = clf.logits(x)
    agree, diff = compare(ref, logits)
    return BackendResult(name, str(clf.path), os.path.getsize(clf.path), agree, diff, accuracy(logits, y), None)
