"""Predict classes for any image with a trained model.

    clf = imgclf.load("runs/cifar10-seed-cnn")         # a run folder or a .safetensors checkpoint
    clf.predict(["cat.jpg", "dog.png"], top_k=3)        # -> [Prediction(source, top=[(class, prob), ...])]

Every image gets exactly the training preprocessing, read from the checkpoint (never re-derived):
the one image loader (EXIF orientation, any mode -> the model's channels), the same resize, the same
normalisation. Class names come from the checkpoint too.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import load_checkpoint
from .data.images import Preprocess, preprocess_image
from .data.tensors import Normalizer, to_tensor
from .errors import ImgclfError
from .evaluate import predict_logits
from .models import create_model
from .utils import natural_key, resolve_device

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


@dataclass
class Prediction:
    source: str
    top: list[tuple[str, float]] = field(default_factory=list)  # (class name, probability), best first
    error: str | None = None                                     # set when the image could not be read

    @property
    def label(self) -> str | None:
        return self.top[0][0] if self.top else None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"source": self.source}
        if self.error:
            d["error"] = self.error
        else:
            d["top"] = [{"class": c, "probability": round(p, 6)} for c, p in self.top]
        return d


class BaseClassifier:
    """Classes + preprocessing + a ``logits`` backend -> predictions for any image. Subclasses (PyTorch:
    :class:`Classifier`; ONNX Runtime: :class:`imgclf.export.OnnxClassifier`) set ``classes``,
    ``preprocess``, ``meta`` and ``path`` and implement :meth:`logits`; everything else is shared, so
    every backend decodes, ranks and reports images the same way."""

    classes: list[str]
    preprocess: Preprocess
    meta: dict[str, Any]
    path: Path | None

    @property
    def temperature(self) -> float:
        """Divides the logits before the softmax of :meth:`predict_proba`: fitted by ``imgclf evaluate
        --calibrate`` so probabilities match observed accuracy; 1.0 (no change) until then."""
        return float(self.meta.get("temperature") or 1.0)

    def logits(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Float32 CPU logits (N, num_classes) for a (N, C, H, W) uint8 tensor of preprocessed images."""
        raise NotImplementedError

    def predict_proba(self, images: list[Any] | Any, batch_size: int = 256) -> np.ndarray:
        """Class probabilities (N, num_classes) for paths, bytes, PIL images or (H, W, C) uint8 arrays.
        An unreadable image raises :class:`ImgclfError` naming it."""
        images = images if isinstance(images, (list, tuple)) else [images]
        if not images:
            return np.zeros((0, len(self.classes)), np.float32)
        x = to_tensor(np.stack([self._to_array(img) for img in images]))
        return torch.softmax(self.logits(x, batch_size=batch_size) / self.temperature, dim=1).numpy()

    def predict(self, images: list[Any] | Any, top_k: int = 3, errors: str = "raise") -> list[Prediction]:
        """Top-k classes per image. ``errors="report"`` returns a Prediction with ``error`` set for an
        unreadable image and still predicts the rest; ``"raise"`` (default) stops at the first."""
        if errors not in ("raise", "report"):
            raise ValueError("errors must be 'raise' or 'report'")
        if top_k < 1:
            raise ImgclfError(f"top_k must be at least 1, got {top_k}")
        images = images if isinstance(images, (list, tuple)) else [images]
        k = min(top_k, len(self.classes))  # asking for more than there are returns them all
        results: list[Prediction] = []
        good: list[tuple[int, np.ndarray]] = []
        for img in images:
            pred = Prediction(source=_describe(img))
            try:
                good.append((len(results), self._to_array(img)))
            except ImgclfError as e:
                if errors == "raise":
                    raise
                pred.error = str(e)
            results.append(pred)
        if good:
            probs = self.predict_proba([a for _, a in good])
            for (i, _), top in zip(good, self.rank(probs, k)):
                results[i].top = top
        return results

    def rank(self, probs: np.ndarray, top_k: int) -> list[list[tuple[str, float]]]:
        """(N, num_classes) probabilities -> per image the top-k (class name, probability), best first."""
        k = min(top_k, len(self.classes))
        return [[(self.classes[j], float(p[j])) for j in np.argsort(-p, kind="stable")[:k]] for p in probs]

    def _to_array(self, img: Any) -> np.ndarray:
        if isinstance(img, np.ndarray):  # already decoded: must already match the model's input
            want = (self.preprocess.image_size, self.preprocess.image_size, self.preprocess.channels)
            if img.dtype != np.uint8 or img.shape != want:
                raise ImgclfError(f"array input must be uint8 of shape {want}, got {img.dtype} {img.shape}")
            return img
        return preprocess_image(img, self.preprocess)


class Classifier(BaseClassifier):
    """A trained model with its classes and preprocessing, ready to predict."""

    def __init__(self, model: torch.nn.Module, classes: list[str], preprocess: Preprocess,
                 meta: dict[str, Any] | None = None, path: Path | None = None,
                 autocast_dtype: torch.dtype | None = None, channels_last: bool = True):
        self.model = model.eval()
        self.classes = list(classes)
        self.preprocess = preprocess
        self.meta = meta or {}
        self.path = path
        self.device = next(model.parameters()).device
        self.autocast_dtype = autocast_dtype
        self.channels_last = channels_last
        self.normalizer = Normalizer(preprocess.mean, preprocess.std, self.device)

    def __repr__(self) -> str:
        arch = self.meta.get("arch", {}).get("name", type(self.model).__name__)
        return (f"Classifier({arch}, {len(self.classes)} classes, {self.preprocess.image_size}px "
                f"x{self.preprocess.channels}, device={self.device})")

    def logits(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Float32 logits on the CPU for preprocessed images: a (N, C, H, W) uint8 tensor (see
        ``data.tensors.to_tensor``). Every scoring path (evaluate, predict) goes through here, so another
        backend (e.g. ONNX Runtime) only has to provide this method."""
        return predict_logits(self.model, x, self.normalizer, batch_size=batch_size,
                              autocast_dtype=self.autocast_dtype, channels_last=self.channels_last).cpu()


def load(path: str | Path, device: str = "auto", precision: str = "fp32") -> BaseClassifier:
    """Load a run folder or checkpoint as a :class:`Classifier` (no pickle involved), or an ``.onnx``
    file written by ``imgclf export`` as an :class:`~imgclf.export.OnnxClassifier` (ONNX Runtime).
    An already loaded classifier is returned as it is."""
    if isinstance(path, BaseClassifier):
        return path
    if str(path).lower().endswith(".onnx"):
        from .export import load_onnx

        return load_onnx(path, device=device)
    ckpt = load_checkpoint(path)
    meta = ckpt.meta
    try:
        arch, classes, spec = dict(meta["arch"]), list(meta["classes"]), Preprocess.from_dict(meta["preprocess"])
    except (KeyError, TypeError) as e:
        raise ImgclfError(f"{ckpt.path}: checkpoint metadata is incomplete ({e}); was it written by imgclf?") from e
    dev = resolve_device(device)
    model = create_model(**arch)
    missing, unexpected = model.load_state_dict(ckpt.state_dict, strict=False)
    if missing or unexpected:
        raise ImgclfError(f"{ckpt.path}: weights do not fit {arch.get('name')} "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    channels_last = bool(meta.get("channels_last", True))
    model.to(dev, memory_format=torch.channels_last if channels_last else torch.contiguous_format).eval()
    dtype = torch.bfloat16 if precision == "bf16" else None
    return Classifier(model, classes, spec, meta=meta, path=ckpt.path, autocast_dtype=dtype,
                      channels_last=channels_last)


def expand_inputs(items: list[str]) -> list[str]:
    """Files as given; folders -> their images (recursively, natural order); globs expanded.
    A name that matches nothing is kept, so it gets its own error line."""
    out: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = [str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                     and not any(part.startswith(".") for part in f.relative_to(p).parts)]
            out.extend(sorted(found, key=natural_key))
        elif p.exists():
            out.append(item)
        elif glob.has_magic(item):
            matches = sorted((m for m in glob.glob(item, recursive=True) if os.path.isfile(m)), key=natural_key)
            out.extend(matches or [item])
        else:
            out.append(item)
    return out


def _describe(img: Any) -> str:
    if isinstance(img, (str, os.PathLike)):
        return str(img)
    return f"<{type(img).__name__}>"
