"""The proof every export ends with: the exported model against PyTorch on the run's own test images.

    x, y, source, ds = check_set(clf, data=None, n=2000)     # seeded sample of the run's test split
    report = ExportReport(out, rows, n_images=len(y), data=source, min_agreement=0.995)
    print(report.table())                                     # agreement, accuracy, size, images/s

Shared by the ONNX export (export.py) and the LiteRT one (tflite.py): one table, one gate, and the uint8 front
both exported graphs start with (WithNormalization). fp32 must
reproduce PyTorch (any disagreement is a bug); int8 flips a few borderline images both ways, so its gate is
the accuracy it loses.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..classifier import Classifier, load
from ..data.images import Preprocess
from ..data.run_data import load_run_data, remap_labels
from ..data.tensors import Normalizer, to_tensor
from ..errors import ImgclfError
from ..inference import BaseClassifier

MIN_AGREEMENT = 0.995   # fp32 must agree with PyTorch on the top-1 class of at least this share of images
RUNTIMES = {"onnx": "ONNX Runtime", "tflite": "LiteRT"}


class WithNormalization(nn.Module):
    """uint8 (N, C, H, W) images in, logits out: the exported graph does the ``(x / 255 - mean) / std`` itself."""

    def __init__(self, model: nn.Module, preprocess: Preprocess):
        super().__init__()
        self.model = model
        norm = Normalizer(preprocess.mean, preprocess.std)
        self.register_buffer("scale", norm.scale)
        self.register_buffer("shift", norm.shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.float() * self.scale + self.shift)


@dataclass
class BackendResult:
    """One row of the parity table."""
    name: str                             # "pytorch fp32", "onnx fp32", "onnx int8", "tflite int8"
    path: str
    size_bytes: int
    agreement: float | None               # top-1 agreement with PyTorch on the check images
    max_logit_diff: float | None          # max |logit - PyTorch logit|
    accuracy: float | None                # top-1 accuracy on the check images (their labels)
    images_per_s: float | None            # at the report's speed_batch, this CPU
    images_per_s_batch: float | None = None  # at its second_batch (None: not measured, or cannot batch)


@dataclass
class ExportReport:
    out: Path                             # the model written (the int8 one with --int8)
    rows: list[BackendResult]
    n_images: int                         # images the parity check used
    data: str                             # where they came from
    min_agreement: float
    max_int8_drop: float = 0.005
    reduce_range: bool | None = None
    warnings: list[str] = field(default_factory=list)
    speed_batch: int = 256                # the batch of images_per_s
    second_batch: int | None = None       # the batch of images_per_s_batch, when measured

    @property
    def failures(self) -> list[str]:
        """Why the export fails, if it does. fp32 must reproduce PyTorch (any disagreement is a bug: wrong
        preprocessing, train-mode layers...). int8 flips a few borderline images both ways by design (99.2 %
        agreement at equal accuracy on CIFAR-10 seed CNNs), so what it must not do is lose accuracy against
        the fp32 model of its own format."""
        out = []
        fp32 = {r.name.split()[0]: r for r in self.rows if r.name.endswith("fp32")}
        for r in self.rows:
            if r.name.endswith("fp32") and r.agreement is not None and r.agreement < self.min_agreement:
                out.append(f"{r.name} agrees with PyTorch on {r.agreement:.2%} of top-1 classes, below "
                           f"{self.min_agreement:.1%}")
            base = fp32.get(r.name.split()[0])
            if r.name.endswith("int8") and base and base.accuracy is not None and r.accuracy is not None \
                    and base.accuracy - r.accuracy > self.max_int8_drop:
                out.append(f"{r.name} loses {100 * (base.accuracy - r.accuracy):.2f} accuracy points, more "
                           f"than {100 * self.max_int8_drop:.2f}")
        return out

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "ok": self.ok, "failures": self.failures, "n_images": self.n_images,
                "data": self.data, "min_agreement": self.min_agreement, "max_int8_drop": self.max_int8_drop,
                "reduce_range": self.reduce_range, "warnings": self.warnings, "speed_batch": self.speed_batch,
                "second_batch": self.second_batch, "rows": [asdict(r) for r in self.rows]}

    def table(self) -> str:
        def f(v, fmt):
            width = int("".join(c for c in fmt.split(".")[0] if c.isdigit()))
            return f"{'-':>{width}}" if v is None else format(v, fmt)

        second = self.second_batch is not None
        head = (f"{'model':<13} {'top-1 agree':>11} {'max |dlogit|':>12} {'accuracy':>9} {'size':>10} "
                f"{f'img/s@{self.speed_batch}':>10}" + (f" {f'img/s@{self.second_batch}':>10}" if second else ""))
        gate = f"fp32 needs >= {self.min_agreement:.1%} top-1 agreement with PyTorch"
        if any(r.name.endswith("int8") for r in self.rows):
            gate += f", int8 <= {100 * self.max_int8_drop:.1f} points accuracy loss"
        lines = [f"parity on {self.n_images:,} test images of {self.data} ({gate})", head, "-" * len(head)]
        for r in self.rows:
            lines.append(f"{r.name:<13} {f(r.agreement, '>11.2%')} {f(r.max_logit_diff, '>12.2e')} "
                         f"{f(r.accuracy, '>9.2%')} {human_size(r.size_bytes):>10} {f(r.images_per_s, '>10,.0f')}"
                         + (f" {f(r.images_per_s_batch, '>10,.0f')}" if second else ""))
        speed = {r.name: r.images_per_s for r in self.rows if r.images_per_s}
        size = {r.name: r.size_bytes for r in self.rows}
        for fmt, runtime in RUNTIMES.items():
            fp32, int8 = f"{fmt} fp32", f"{fmt} int8"
            if int8 in speed and {"pytorch fp32", fp32} <= speed.keys():
                lines.append(f"int8 at batch {self.speed_batch}: {speed[int8] / speed[fp32]:.1f}x {runtime} fp32, "
                             f"{speed[int8] / speed['pytorch fp32']:.1f}x PyTorch eager fp32, "
                             f"{human_size(size[fp32])} -> {human_size(size[int8])}")
        lines += [f"warning: {w}" for w in self.warnings]
        lines += [f"failed: {f}" for f in self.failures]
        lines.append(f"{'ok' if self.ok else 'FAILED'}: {self.out}")
        return "\n".join(lines)


class ParityError(ImgclfError):
    """The exported model disagrees with PyTorch; ``.report`` holds the figures."""

    def __init__(self, message: str, report: ExportReport):
        super().__init__(message)
        self.report = report


def check_set(clf: BaseClassifier, data: str | None, n: int, progress: bool = True):
    """(x, y, source, dataset) of the parity check: a seeded sample of ``n`` images (0 = all) of the run's
    own test split, or of ``data``; x is a (N, C, H, W) uint8 tensor, y its labels in the model's classes."""
    ds = load_run_data(clf, data, progress=progress)
    part = ds.test if ds.test is not None else (ds.train if data is not None else None)
    if part is None or len(part.y) == 0:
        raise ImgclfError(f"{ds.source} has no test images for the parity check; pass --data with a test/ folder")
    idx = sample_indices(len(part.y), n, seed=0)
    x, y = to_tensor(part.x[idx]), torch.as_tensor(remap_labels(part.y[idx], ds.classes, clf.classes))
    return x, y, ds.source, ds


def calibration_images(clf: BaseClassifier, ds, data: str | None, calib_data: str | None, n: int,
                       progress: bool = True) -> np.ndarray:
    """(n, H, W, C) uint8 images to calibrate int8 on: a seeded sample of the run's training split (``ds``
    when it is the run's own data), or of ``calib_data``."""
    if calib_data:
        pool = load_run_data(clf, calib_data, progress=progress).train
    else:
        pool = ds.train if data is None else load_run_data(clf, None, progress=progress).train
    if pool is None or len(pool.x) == 0:
        raise ImgclfError("no training images to calibrate int8 on; pass --calib-data FOLDER")
    return np.asarray(pool.x[sample_indices(len(pool.x), n, seed=1)])


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


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1) == y).float().mean().item()


def sample_indices(n: int, k: int, seed: int) -> np.ndarray:
    """A seeded sample of min(k, n) indices (all when k <= 0), in ascending order."""
    if k <= 0 or k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, k, replace=False))


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def export_paths(checkpoint, out, int8: bool, ext: str):
    """The checkpoint to export as a Classifier, its path, the file to write and the fp32 file beside an int8 one
    (``x.int8.onnx`` -> ``x.onnx``), for files ending in ``ext`` (".onnx", ".tflite")."""
    clf = load(checkpoint, device="cpu")
    if not isinstance(clf, Classifier):
        raise ImgclfError(f"{checkpoint}: export needs a run folder or .safetensors checkpoint, not an exported model")
    src = Path(clf.path)
    out = Path(out) if out else src.with_suffix((".int8" if int8 else "") + ext)
    if out.suffix != ext:
        raise ImgclfError(f"--out {out}: name the file *{ext}")
    fp32_out = out
    if int8:
        fp32_out = out.with_name(out.name[:-len(".int8" + ext)] + ext) if out.name.endswith(".int8" + ext) \
            else out.with_suffix(".fp32" + ext)
    return clf, src, out, fp32_out
