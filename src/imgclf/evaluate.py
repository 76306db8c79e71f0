"""Score a model: loss, top-1, top-5, per-class accuracy.

    imgclf.evaluate("runs/cifar10-seed-cnn")                       # on the run's own test split
    imgclf.evaluate("runs/x/best.safetensors", data="photos/")    # on other data with the same classes
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .data.tensors import Normalizer, to_tensor
from .errors import ImgclfError


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """bf16 autocast when asked for; a no-op context for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def predict_logits(model: torch.nn.Module, x: torch.Tensor, normalizer: Normalizer, *, batch_size: int = 512,
                   autocast_dtype: torch.dtype | None = None, channels_last: bool = True) -> torch.Tensor:
    """Logits (float32, on the model's device) for a (N, C, H, W) uint8 tensor, in eval mode, batched."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        for i in range(0, len(x), batch_size):
            xb = normalizer(x[i:i + batch_size].to(device, non_blocking=True))
            xb = xb.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            with autocast_context(device, autocast_dtype):
                out.append(model(xb).float())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, getattr(model, "num_classes", 0), device=device)


def metrics_from_logits(logits: torch.Tensor, y: torch.Tensor, classes: list[str]) -> dict[str, Any]:
    """Loss, top-1, top-5 and per-class accuracy (recall) from logits and integer labels."""
    y = y.to(logits.device)
    n = len(y)
    if n == 0:
        raise ImgclfError("nothing to evaluate: the split is empty")
    loss = F.cross_entropy(logits, y).item()
    k = min(5, logits.shape[1])
    topk = logits.topk(k, dim=1).indices
    top1 = (topk[:, 0] == y).float().mean().item()
    top5 = (topk == y[:, None]).any(dim=1).float().mean().item()
    correct = (topk[:, 0] == y).cpu().numpy()
    labels = y.cpu().numpy()
    per_class = {}
    for i, name in enumerate(classes):
        mask = labels == i
        per_class[name] = float(correct[mask].mean()) if mask.any() else None
    return {"n": n, "loss": loss, "top1": top1, "top5": top5, "per_class_accuracy": per_class}


def evaluate(model: str | Path | Any, data: str | None = None, *, split: str = "test", batch_size: int = 512,
             device: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Score a run folder, a checkpoint or a loaded :class:`~imgclf.predict.Classifier`.

    Without ``data`` a run/checkpoint is scored on the split it recorded (same source, same seeded
    split), so a run can always be re-checked by its path alone. With ``data``, the images are decoded
    with the checkpoint's own preprocessing and labels matched to its classes by name."""
    from .data import load_dataset
    from .predict import Classifier, load

    clf = model if isinstance(model, Classifier) else load(model, device=device)
    spec, rec = clf.preprocess, clf.meta.get("data", {})
    if data is None:
        if not rec.get("source"):
            raise ImgclfError("this checkpoint does not record its data; pass --data")
        # a built-in dataset is found again by its name (same cache entry); anything else by its path
        ds = load_dataset(rec.get("builtin") or rec["source"], image_size=spec.image_size,
                          channels=spec.channels, val_split=rec.get("val_split", 0.0),
                          test_split=rec.get("test_split", 0.0), seed=rec.get("seed", 0),
                          skip_bad_images=rec.get("skip_bad_images", False), progress=progress)
    else:
        ds = load_dataset(data, image_size=spec.image_size, channels=spec.channels, progress=progress)
    part = {"test": ds.test, "val": ds.val, "train": ds.train}.get(split, "bad")
    if part == "bad":
        raise ImgclfError(f"split must be test, val or train; got {split!r}")
    if part is None:
        raise ImgclfError(f"{ds.source} has no {split} split; pass --split or data with a {split}/ folder")
    y = remap_labels(part.y, ds.classes, clf.classes)
    logits = clf.logits(to_tensor(part.x), batch_size=batch_size)
    result = metrics_from_logits(logits, torch.as_tensor(y), clf.classes)
    result.update(split=split, data=ds.source, checkpoint=str(clf.path))
    return result


def remap_labels(y: np.ndarray, data_classes: list[str], model_classes: list[str]) -> np.ndarray:
    """Labels of the data -> indices into the model's classes, matched by name (never by position)."""
    if list(data_classes) == list(model_classes):
        return y
    missing = [c for c in data_classes if c not in model_classes]
    if missing:
        raise ImgclfError(f"the data has classes the model does not know: {', '.join(missing[:5])}; "
                          f"the model knows {', '.join(model_classes[:10])}")
    lut = np.array([model_classes.index(c) for c in data_classes], dtype=np.int64)
    return lut[y]
