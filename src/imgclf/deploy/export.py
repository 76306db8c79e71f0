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
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._version import __version__
from ..classifier import Classifier, load
from ..data.images import Preprocess
from ..data.run_data import load_run_data
from ..data.tensors import Normalizer, to_tensor
from ..errors import ImgclfError
from ..inference import BaseClassifier
from ..onnx_runtime import INPUT_NAME, OUTPUT_NAME, OnnxClassifier, load_onnx, save_onnx
from .graph_rewrites import bn_before_maxpool
from .int8 import needs_reduce_range, quantize_int8

OPSET = 20              # the first with a Gelu op: one node instead of five (and one int8 round trip)
MIN_AGREEMENT = 0.995   # fp32 must agree with PyTorch on the top-1 class of at least this share of images
MAX_INT8_DROP = 0.005   # int8 may lose at most this much top-1 accuracy (0.5 points)


# ---------------------------------------------------------------------------------------------- export
class _WithNormalization(nn.Module):
    """uint8 images in, logits out: the exported graph does the ``(x / 255 - mean) / std`` itself."""

    def __init__(self, model: nn.Module, preprocess: Preprocess):
        super().__init__()
        self.model = model
        norm = Normalizer(preprocess.mean, preprocess.std)
        self.register_buffer("scale", norm.scale)
        self.register_buffer("shift", norm.shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.float() * self.scale + self.shift)


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
    wrapped = _WithNormalization(clf.model, spec).to("cpu").eval()
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
    clf.model.to(clf.device)  # _WithNormalization moved it to the CPU for tracing
    return save_onnx(model, out, onnx_metadata(clf, "fp32"))


# ---------------------------------------------------------------------------------------------- parity
@dataclass
class BackendResult:
    """One row of the parity table."""
    name: str                             # "pytorch fp32", "onnx fp32", "onnx int8"
    path: str
    size_bytes: int
    agreement: float | None               # top-1 agreement with PyTorch on the check images
    max_logit_diff: float | None          # max |logit - PyTorch logit|
    accuracy: float | None                # top-1 accuracy on the check images (their labels)
    images_per_s: float | None            # batch 256, this CPU


@dataclass
class ExportReport:
    out: Path                             # the model written (the int8 one with --int8)
    rows: list[BackendResult]
    n_images: int                         # images the parity check used
    data: str                             # where they came from
    min_agreement: float
    max_int8_drop: float = MAX_INT8_DROP
    reduce_range: bool | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[str]:
        """Why the export fails, if it does. fp32 must reproduce PyTorch (any disagreement is a bug: wrong
        preprocessing, train-mode layers...). int8 flips a few borderline images both ways by design (99.2 %
        agreement at equal accuracy on CIFAR-10 seed CNNs), so what it must not do is lose accuracy."""
        out = []
        fp32 = next((r for r in self.rows if r.name == "onnx fp32"), None)
        for r in self.rows:
            if r.name.endswith("fp32") and r.agreement is not None and r.agreement < self.min_agreement:
                out.append(f"{r.name} agrees with PyTorch on {r.agreement:.2%} of top-1 classes, below "
                           f"{self.min_agreement:.1%}")
            if r.name.endswith("int8") and fp32 and fp32.accuracy is not None and r.accuracy is not None \
                    and fp32.accuracy - r.accuracy > self.max_int8_drop:
                out.append(f"{r.name} loses {100 * (fp32.accuracy - r.accuracy):.2f} accuracy points, more "
                           f"than {100 * self.max_int8_drop:.2f}")
        return out

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "ok": self.ok, "failures": self.failures, "n_images": self.n_images,
                "data": self.data, "min_agreement": self.min_agreement, "max_int8_drop": self.max_int8_drop,
                "reduce_range": self.reduce_range, "warnings": self.warnings, "rows": [asdict(r) for r in self.rows]}

    def table(self) -> str:
        def f(v, fmt):
            width = int("".join(c for c in fmt.split(".")[0] if c.isdigit()))
            return f"{'-':>{width}}" if v is None else format(v, fmt)

        head = f"{'model':<13} {'top-1 agree':>11} {'max |dlogit|':>12} {'accuracy':>9} {'size':>10} {'img/s@256':>10}"
        gate = f"fp32 needs >= {self.min_agreement:.1%} top-1 agreement with PyTorch"
        if any(r.name.endswith("int8") for r in self.rows):
            gate += f", int8 <= {100 * self.max_int8_drop:.1f} points accuracy loss"
        lines = [f"parity on {self.n_images:,} test images of {self.data} ({gate})", head, "-" * len(head)]
        for r in self.rows:
            lines.append(f"{r.name:<13} {f(r.agreement, '>11.2%')} {f(r.max_logit_diff, '>12.2e')} "
                         f"{f(r.accuracy, '>9.2%')} {_size(r.size_bytes):>10} {f(r.images_per_s, '>10,.0f')}")
        speed = {r.name: r.images_per_s for r in self.rows if r.images_per_s}
        size = {r.name: r.size_bytes for r in self.rows}
        if "onnx int8" in speed and {"pytorch fp32", "onnx fp32"} <= speed.keys():
            lines.append(f"int8 at batch 256: {speed['onnx int8'] / speed['onnx fp32']:.1f}x ONNX Runtime fp32, "
                         f"{speed['onnx int8'] / speed['pytorch fp32']:.1f}x PyTorch eager fp32, "
                         f"{_size(size['onnx fp32'])} -> {_size(size['onnx int8'])}")
        lines += [f"warning: {w}" for w in self.warnings]
        lines += [f"failed: {f}" for f in self.failures]
        lines.append(f"{'ok' if self.ok else 'FAILED'}: {self.out}")
        return "\n".join(lines)


class ParityError(ImgclfError):
    """The exported model disagrees with PyTorch; ``.report`` holds the figures."""

    def __init__(self, message: str, report: ExportReport):
        super().__init__(message)
        self.report = report


def throughput(clf: BaseClassifier | list[BaseClassifier], x: torch.Tensor, batch_size: int = 256,
               seconds: float = 1.5, rounds: int = 3) -> float | list[float]:
    """Images/s of ``clf.logits`` at ``batch_size`` on this machine: one warm-up batch, then the best of
    ``rounds`` rounds of >= ``seconds`` each (with one round, two exports of the same model on a 2-core VM
    measured ORT fp32 at 413 and 590 img/s). Given a list of models, each round times them one after the
    other, so that a drift in the machine's speed (a third within an hour on the 2-core VM) reaches all of
    them alike instead of favouring whichever was timed in the fast minutes; returns a list then."""
    clfs = clf if isinstance(clf, list) else [clf]
    if len(x) < batch_size:
        x = x.repeat((batch_size + len(x) - 1) // len(x), 1, 1, 1)
    xb = x[:batch_size].contiguous(memory_format=torch.channels_last)
    best = [0.0] * len(clfs)
    for c in clfs:
        c.logits(xb, batch_size=batch_size)
    for _ in range(rounds):
        for i, c in enumerate(clfs):
            n, t0 = 0, time.perf_counter()
            while n < 3 * batch_size or time.perf_counter() - t0 < seconds:
                c.logits(xb, batch_size=batch_size)
                n += batch_size
            best[i] = max(best[i], n / (time.perf_counter() - t0))
    return best if isinstance(clf, list) else best[0]


def compare(reference: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement, max |logit difference|) of ``logits`` against ``reference``."""
    agree = (reference.argmax(1) == logits.argmax(1)).float().mean().item()
    return agree, (reference - logits).abs().max().item()


def export(checkpoint: str | Path, format: str = "onnx", *, int8: bool = False, out: str | Path | None = None,
           data: str | None = None, calib_data: str | None = None, calib_images: int = 300,
           check_images: int = 2000, min_agreement: float = MIN_AGREEMENT, max_int8_drop: float = MAX_INT8_DROP,
           speed: bool = True, portable: bool = False, progress: bool = True) -> ExportReport:
    """Export a run folder / checkpoint to ONNX (``int8=True``: also a statically quantized int8 model),
    then check parity with PyTorch on ``check_images`` test images (0 = the whole test split).

    out: the file to write (default ``<checkpoint>.onnx``, or ``<checkpoint>.int8.onnx`` with ``int8``; the
        fp32 model is then kept beside it as ``<name>.onnx`` / ``<name>.fp32.onnx``).
    data: images for the parity check (default: the run's own test split); same classes as the model.
    calib_data: images to calibrate int8 on (default: the run's training split), ``calib_images`` of them.
    speed: also measure images/s at batch 256 for each backend.
    portable: int8 weights all at zero point 0, for runtimes that need it (TensorRT); by default each int8
        convolution is stored the way ONNX Runtime runs fastest on this CPU (:func:`conv_kernels_by_measurement`).
    Returns an :class:`ExportReport`; raises :class:`ParityError` (with ``.report``) when the fp32 model's
    top-1 agreement with PyTorch is below ``min_agreement``, or the int8 model loses more than
    ``max_int8_drop`` top-1 accuracy (0.005 = 0.5 points)."""
    if format != "onnx":
        raise ImgclfError(f"unknown export format {format!r}: this version writes onnx")
    clf = load(checkpoint, device="cpu")
    if not isinstance(clf, Classifier):
        raise ImgclfError(f"{checkpoint}: export needs a run folder or .safetensors checkpoint, not an ONNX file")
    src = Path(clf.path)
    out = Path(out) if out else src.with_suffix(".int8.onnx" if int8 else ".onnx")
    if out.suffix != ".onnx":
        raise ImgclfError(f"--out {out}: name the file *.onnx")
    fp32_out = out
    if int8:
        fp32_out = out.with_name(out.name[:-len(".int8.onnx")] + ".onnx") if out.name.endswith(".int8.onnx") \
            else out.with_suffix(".fp32.onnx")

    # the check images: the run's own test split (a seeded sample) unless other data is given
    ds = load_run_data(clf, data, progress=progress)
    part = ds.test if ds.test is not None else (ds.train if data is not None else None)
    if part is None or len(part.y) == 0:
        raise ImgclfError(f"{ds.source} has no test images for the parity check; pass --data with a test/ folder")
    from ..data.run_data import remap_labels

    idx = sample_indices(len(part.y), check_images, seed=0)
    x, y = to_tensor(part.x[idx]), torch.as_tensor(remap_labels(part.y[idx], ds.classes, clf.classes))

    ref = clf.logits(x)
    rows = [BackendResult("pytorch fp32", str(src), src.stat().st_size, None, None, _acc(ref, y), None)]
    export_onnx(clf, fp32_out)
    models: list[BaseClassifier] = [clf, load_onnx(fp32_out)]
    rows.append(_row("onnx fp32", models[1], ref, x, y))
    report = ExportReport(out=out, rows=rows, n_images=len(idx), data=ds.source, min_agreement=min_agreement,
                          max_int8_drop=max_int8_drop)
    if int8:
        if calib_data:
            cds = load_run_data(clf, calib_data, progress=progress)
            pool = cds.train
        else:
            pool = ds.train if data is None else load_run_data(clf, None, progress=progress).train
        if pool is None or len(pool.x) == 0:
            raise ImgclfError("no training images to calibrate int8 on; pass --calib-data FOLDER")
        calib = pool.x[sample_indices(len(pool.x), calib_images, seed=1)]
        report.reduce_range = needs_reduce_range()
        quantize_int8(fp32_out, out, calib, reduce_range=report.reduce_range, tune=not portable)
        models.append(load_onnx(out))
        rows.append(_row("onnx int8", models[2], ref, x, y))
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
    return BackendResult(name, str(clf.path), os.path.getsize(clf.path), agree, diff, _acc(logits, y), None)


def _acc(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1) == y).float().mean().item()


def sample_indices(n: int, k: int, seed: int) -> np.ndarray:
    """A seeded sample of min(k, n) indices (all when k <= 0), in ascending order."""
    if k <= 0 or k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, k, replace=False))


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
