"""Every number of an evaluation from one set of logits: loss, top-1/top-5, per-class accuracy, scikit-learn's
classification report, the confusion matrix, the most-confused pairs, calibration (ECE, reliability bins)
and the temperature that calibrates them.

    ev = evaluation_from_logits(logits, y, classes, images)   # -> Evaluation (metrics + per-image arrays)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ImgclfError


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


# Bins of the reliability diagram and ECE: 15 equal-width confidence bins, as in Guo et al. (2017),
# "On Calibration of Modern Neural Networks", so figures compare with the literature.
ECE_BINS = 15


MOST_CONFUSED = 10          # pairs listed in the report


@dataclass
class Evaluation:
    """One scoring of one split: the JSON-ready ``metrics`` plus the per-image arrays the plots need."""
    metrics: dict[str, Any]   # what `imgclf evaluate --json` prints and evaluation.json holds
    probs: np.ndarray         # (N, K) float32 softmax, calibrated with the checkpoint's temperature if it has one
    y: np.ndarray             # (N,) int64 true labels (indices into classes)
    images: np.ndarray        # (N, H, W, C) uint8: the split as decoded (ImageRows: read only where drawn)
    classes: list[str]

    @property
    def pred(self) -> np.ndarray:
        return self.probs.argmax(1)

    @property
    def losses(self) -> np.ndarray:
        """Per-image cross-entropy under ``probs``: what galleries sort by (highest first)."""
        return -np.log(np.clip(self.probs[np.arange(len(self.y)), self.y], 1e-12, None))


def evaluation_from_logits(logits: torch.Tensor, y: np.ndarray | torch.Tensor, classes: list[str],
                           images: np.ndarray, *, temperature: float | None = None) -> Evaluation:
    """Every number of the report from one set of logits: :func:`metrics_from_logits` (at temperature 1,
    so it equals what training printed) + classification report, confusion matrix, most-confused pairs
    and calibration (before and, with a ``temperature``, after scaling)."""
    from sklearn.metrics import classification_report, confusion_matrix

    logits = logits.float().cpu()
    y_t = torch.as_tensor(np.asarray(y), dtype=torch.int64)
    metrics = metrics_from_logits(logits, y_t, classes)
    y_np = y_t.numpy()
    probs_raw = torch.softmax(logits, dim=1).numpy()
    pred = probs_raw.argmax(1)
    labels = list(range(len(classes)))
    report = classification_report(y_np, pred, labels=labels, target_names=classes, output_dict=True,
                                   zero_division=0)
    text = classification_report(y_np, pred, labels=labels, target_names=classes, digits=4, zero_division=0)
    cm = confusion_matrix(y_np, pred, labels=labels)
    calibration = {"n_bins": ECE_BINS, **calibration_metrics(probs_raw, y_np), "temperature": None}
    probs = probs_raw
    if temperature:
        probs = torch.softmax(logits / temperature, dim=1).numpy()
        after = calibration_metrics(probs, y_np)
        calibration.update(temperature=temperature, ece_calibrated=after["ece"], bins_calibrated=after["bins"],
                           loss_calibrated=F.cross_entropy(logits / temperature, y_t).item())
    metrics.update(
        macro_f1=report["macro avg"]["f1-score"],
        classification_report=report,
        classification_report_text=text,
        confusion_matrix=cm.tolist(),
        confusion_matrix_normalized=normalize_rows(cm).round(6).tolist(),
        most_confused=most_confused(cm, classes),
        calibration=calibration,
    )
    return Evaluation(metrics=metrics, probs=probs.astype(np.float32), y=y_np, images=images, classes=list(classes))


def normalize_rows(cm: np.ndarray) -> np.ndarray:
    """Each row (a true class) divided by its count: the diagonal is that class's recall; empty rows stay 0."""
    cm = np.asarray(cm, dtype=np.float64)
    totals = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, totals, out=np.zeros_like(cm), where=totals > 0)


def most_confused(cm: np.ndarray, classes: list[str], top: int = MOST_CONFUSED) -> list[dict[str, Any]]:
    """Off-diagonal cells of the confusion matrix, largest first: [{true, predicted, count}]."""
    cm = np.asarray(cm)
    off = [(int(cm[i, j]), i, j) for i in range(len(cm)) for j in range(len(cm)) if i != j and cm[i, j] > 0]
    off.sort(key=lambda t: (-t[0], t[1], t[2]))
    return [{"true": classes[i], "predicted": classes[j], "count": c} for c, i, j in off[:top]]


def calibration_metrics(probs: np.ndarray, y: np.ndarray, n_bins: int = ECE_BINS) -> dict[str, Any]:
    """Expected calibration error and reliability bins from softmax outputs.

    Confidence = the top probability; bins split (0, 1] into ``n_bins`` equal widths (a confidence of
    exactly 1 falls in the last bin). ECE = sum over bins of (images in bin / N) * |accuracy - mean
    confidence|. -> {"ece", "bins": [{"lo", "hi", "count", "confidence", "accuracy"}]} (empty bins have
    confidence/accuracy None)."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        mask = which == b
        count = int(mask.sum())
        c = float(conf[mask].mean()) if count else None
        a = float(correct[mask].mean()) if count else None
        if count:
            ece += count / len(y) * abs(a - c)
        bins.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": count, "confidence": c,
                     "accuracy": a})
    return {"ece": float(ece), "bins": bins}


def fit_temperature(logits: torch.Tensor, y: np.ndarray | torch.Tensor) -> float:
    """The temperature T > 0 that minimises the cross-entropy of ``logits / T`` (Guo et al. 2017);
    a one-dimensional bounded search over log T (T in 0.05 .. 20), so it cannot diverge."""
    from scipy.optimize import minimize_scalar

    logits = logits.float().cpu().double()
    y_t = torch.as_tensor(np.asarray(y), dtype=torch.int64)

    def nll(log_t: float) -> float:
        return F.cross_entropy(logits / float(np.exp(log_t)), y_t).item()

    res = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded", options={"xatol": 1e-4})
    return round(float(np.exp(res.x)), 5)
