"""Load a trained model and predict classes for any image.

    clf = imgclf.load("runs/cifar10-seed-cnn")         # a run folder, a .safetensors checkpoint, .onnx, .ort or .tflite
    clf.predict(["cat.jpg", "dog.png"], top_k=3)        # -> [Prediction(source, top=[(class, prob), ...])]
    clf.explain("cat.jpg")[0].overlay().save("why.png")  # a heat map: where the model looked

Every image gets exactly the training preprocessing, read from the checkpoint (never re-derived):
the one image loader (EXIF orientation, any mode -> the model's channels), the same resize, the same
normalisation. Class names come from the checkpoint too.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

import torch

from .checkpoint import load_checkpoint
from .data.images import Preprocess
from .data.tensors import Normalizer
from .errors import ImgclfError
from .explain import Explanation, explain_arrays
from .inference import BaseClassifier, _describe, predict_logits
from .models import create_model_for
from .onnx_runtime import is_onnx_runtime_file, load_onnx
from .tflite_runtime import load_tflite
from .utils import natural_key, resolve_device

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


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

    def explain(self, images: list[Any] | Any, target: Any = None, batch_size: int = 32,
                method: str = "layercam") -> list[Explanation]:
        """A heat map per image (imgclf.explain: LayerCAM, or ``method="gradcam"``), for paths, bytes, PIL images
        or (S, S, C) uint8 arrays preprocessed as :meth:`predict` does: (S, S) in [0, 1], where the model found
        class ``target`` (a name, an index, or a list with one per image; default: each image's top class), and
        ``.overlay()`` to look at it. An unreadable image raises :class:`ImgclfError` naming it."""
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        arrays = [self._to_array(img) for img in images]
        return explain_arrays(self, arrays, [_describe(img) for img in images], target, batch_size, method)


def load(path: str | Path, device: str = "auto", precision: str = "fp32") -> BaseClassifier:
    """Load a run folder or checkpoint as a :class:`Classifier` (no pickle involved), or an ``.onnx``
    (or ``.ort``) file written by ``imgclf export`` as an :class:`~imgclf.onnx_runtime.OnnxClassifier` (ONNX
    Runtime), or a
    ``.tflite`` one as a :class:`~imgclf.tflite_runtime.TfliteClassifier` (LiteRT).
    An already loaded classifier is returned as it is."""
    if isinstance(path, BaseClassifier):
        return path
    if is_onnx_runtime_file(path):
        return load_onnx(path, device=device)
    if str(path).lower().endswith(".tflite"):
        return load_tflite(path, device=device)
    ckpt = load_checkpoint(path)
    meta = ckpt.meta
    try:
        arch, classes, spec = dict(meta["arch"]), list(meta["classes"]), Preprocess.from_dict(meta["preprocess"])
    except (KeyError, TypeError) as e:
        raise ImgclfError(f"{ckpt.path}: checkpoint metadata is incomplete ({e}); was it written by imgclf?") from e
    dev = resolve_device(device)
    model = create_model_for(arch, {k: v.shape for k, v in ckpt.state_dict.items()})  # pruned: narrower
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
