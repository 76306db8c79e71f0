"""Export a trained model to ONNX (fp32, or int8 by static quantization) and prove it predicts the same.

    report = imgclf.export("runs/cifar10-seed-cnn", int8=True)   # -> ExportReport; report.table()
    clf = imgclf.load("runs/cifar10-seed-cnn/best.int8.onnx")    # an OnnxClassifier: predict / evaluate

The ``.onnx`` file is self-contained: its input is the preprocessed image as ``uint8`` (N, C, H, W) on the
0..255 scale, the normalisation ``(x / 255 - mean) / std`` is the graph's first two nodes, and the
model's ``metadata_props`` hold the class names, input size, channels, mean/std, the preprocessing spec
(resize method) and the imgclf version, so the file alone is enough to predict (any runtime, any language).

Every export ends with a parity check on real test images (the run's own test split): top-1 agreement and
the largest logit difference against PyTorch; below ``min_agreement`` the export fails (:class:`ParityError`).
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from ..classifier import Classifier
from ..errors import ImgclfError
from ..inference import BaseClassifier
from ..onnx_runtime import INPUT_NAME, OUTPUT_NAME, OnnxClassifier, load_onnx, save_onnx, save_ort
from .graph_rewrites import bn_before_maxpool
from .int8 import needs_reduce_range, quantize_int8
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

OPSET = 20              # the first with a Gelu op: one node instead of five (and one int8 round trip)
MAX_INT8_DROP = 0.005   # int8 may lose at most this much top-1 accuracy (0.5 points)


# ---------------------------------------------------------------------------------------------- export
def onnx_metadata(clf: Classifier, precision: str, extra: dict[str, Any] | None = None) -> dict[str, str]:
    """metadata_props of an exported model: flat keys for any runtime + the full imgclf metadata."""
    spec = clf.preprocess
    meta = {k: v for k, v in clf.meta.items() if k not in ("format", "format_version")}
    meta["onnx"] = {"precision": precision, "input": INPUT_NAME, "output": OUTPUT_NAME,
                    "source": str(clf.path) if clf.path else None, "imgclf_version": __version__, **(extra or {})}
    return {
        "imgclf": json.dumps(meta),
        "imgclf_version": __version__,
        "classes": json.dumps(clf.classes),
        "input_format": f"uint8 (N, {spec.channels}, {spec.image_size}, {spec.image_size}), 0..255, RGB/L; "
                        "resize: " + spec.resize + "; normalisation is inside the graph",
        "image_size": str(spec.image_size),
        "channels": str(spec.channels),
        "mean": json.dumps(list(spec.mean)),
        "std": json.dumps(list(spec.std)),
        "preprocess": json.dumps(spec.to_dict()),
        "precision": precision,
    }


def export_onnx(clf: Classifier, out: str | Path, opset: int = OPSET) -> Path:
    """Write ``clf`` as an fp32 ONNX model with a dynamic batch axis and imgclf metadata (atomically)."""
    import onnx

    spec = clf.preprocess
    wrapped = WithNormalization(clf.model, spec).to("cpu").eval()
    dummy = torch.zeros(1, spec.channels, spec.image_size, spec.image_size, dtype=torch.uint8)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # The TorchScript exporter (dynamo=False) is deprecated in favour of torch.export, which needs the
        # extra onnxscript package; the old one handles every registered model and needs nothing else.
        warnings.simplefilter("ignore")
        raw = Path(tmp) / "model.onnx"
        torch.onnx.export(wrapped, (dummy,), str(raw), dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          do_constant_folding=True)
        model = onnx.load(str(raw))
    bn_before_maxpool(model)  # exact up to rounding; lets ORT fold the BatchNorm into the conv before it
    clf.model.to(clf.device)  # WithNormalization moved it to the CPU for tracing
    return save_onnx(model, out, onnx_metadata(clf, "fp32"))


# ---------------------------------------------------------------------------------------------- parity
def export(checkpoint: str | Path, format: str = "onnx", *, int8: bool = False, out: str | Path | None = None,
           data: str | None = None, calib_data: str | None = None, calib_images: int = 300,
           check_images: int = 2000, min_agreement: float = MIN_AGREEMENT, max_int8_drop: float | None = None,
           speed: bool = True, portable: bool = False, progress: bool = True) -> ExportReport:
    """Export a run folder / checkpoint to ONNX (``int8=True``: also a statically quantized int8 model),
    then check parity with PyTorch on ``check_images`` test images (0 = the whole test split).
    ``format="ort"`` writes ONNX Runtime's own format (``.ort``, for its mobile builds) from the same ONNX
    graph; ``format="tflite"`` a LiteRT flatbuffer (:func:`imgclf.deploy.tflite.export_tflite`).

    out: the file to write (default ``<checkpoint>.onnx``, or ``<checkpoint>.int8.onnx`` with ``int8``; the
        fp32 model is then kept beside it as ``<name>.onnx`` / ``<name>.fp32.onnx``).
    data: images for the parity check (default: the run's own test split); same classes as the model.
    calib_data: images to calibrate int8 on (default: the run's training split), ``calib_images`` of them.
    speed: also measure images/s at batch 256 for each backend.
    portable: int8 weights all at zero point 0, for runtimes that need it (TensorRT); by default each int8
        convolution is stored the way ONNX Runtime runs fastest on this CPU (:func:`conv_kernels_by_measurement`).
    Returns an :class:`ExportReport`; raises :class:`ParityError` (with ``.report``) when the fp32 model's
    top-1 agreement with PyTorch is below ``min_agreement``, or the int8 model loses more than
    ``max_int8_drop`` top-1 accuracy (default 0.005 = 0.5 points; 0.01 for tflite)."""
    if format == "tflite":
        if portable:
            raise ImgclfError("--portable is for ONNX int8 (weight zero points); a tflite int8 file is symmetric "
                              "per channel already")
        from .tflite import MAX_INT8_DROP as TFLITE_INT8_DROP
        from .tflite import export_tflite

        return export_tflite(checkpoint, int8=int8, out=out, data=data, calib_data=calib_data,
                             calib_images=calib_images, check_images=check_images, min_agreement=min_agreement,
                             max_int8_drop=TFLITE_INT8_DROP if max_int8_drop is None else max_int8_drop,
                             speed=speed, progress=progress)
    if format not in ("onnx", "ort"):
        raise ImgclfError(f"unknown export format {format!r}: onnx, ort or tflite")
    max_int8_drop = MAX_INT8_DROP if max_int8_drop is None else max_int8_drop
    clf, src, out, fp32_out = export_paths(checkpoint, out, int8, "." + format)

    x, y, source, ds = check_set(clf, data, check_images, progress)  # the run's test split unless data is given
    ref = clf.logits(x)
    rows = [BackendResult("pytorch fp32", str(src), src.stat().st_size, None, None, accuracy(ref, y), None)]
    models: list[BaseClassifier] = [clf]
    report = ExportReport(out=out, rows=rows, n_images=len(y), data=source, min_agreement=min_agreement,
                          max_int8_drop=max_int8_drop)
    with tempfile.TemporaryDirectory() as tmp:  # .ort: made from .onnx files that are not kept
        onnx_fp32 = fp32_out if format == "onnx" else Path(tmp) / "model.onnx"
        export_onnx(clf, onnx_fp32)
        written = [(onnx_fp32, fp32_out, "fp32")]
        if int8:
            calib = calibration_images(clf, ds, data, calib_data, calib_images, progress)
            report.reduce_range = needs_reduce_range()
            onnx_int8 = out if format == "onnx" else Path(tmp) / "model.int8.onnx"
            quantize_int8(onnx_fp32, onnx_int8, calib, reduce_range=report.reduce_range, tune=not portable)
            written.append((onnx_int8, out, "int8"))
        for onnx_file, final, precision in written:
            if format == "ort":
                save_ort(onnx_file, final)
            models.append(load_onnx(final))
            rows.append(_row(f"{format} {precision}", models[-1], ref, x, y))
    if speed:  # all backends in the same rounds (see `throughput`)
        for row, ips in zip(rows, throughput(models, x)):
            row.images_per_s = ips
        if int8 and rows[2].images_per_s <= rows[1].images_per_s:
            report.warnings.append(f"int8 is not faster than fp32 on this CPU ({rows[2].images_per_s:,.0f} vs "
                                   f"{rows[1].images_per_s:,.0f} images/s at batch 256); ship the fp32 model "
                                   "unless size matters")
    if not report.ok:
        raise ParityError(f"{out}: {'; '.join(report.failures)}: the exported model predicts differently "
                          "from PyTorch (the file is kept for inspection)", report)
    return report


def _row(name: str, clf: OnnxClassifier, ref: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> BackendResult:
    logits = clf.logits(x)
    agree, diff = compare(ref, logits)
    return BackendResult(name, str(clf.path), os.path.getsize(clf.path), agree, diff, accuracy(logits, y), None)
