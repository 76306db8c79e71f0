"""Score a model: every number behind the CLI table, the JSON, the plots and report.html.

    imgclf.evaluate("runs/cifar10-seed-cnn")                       # on the run's own test split
    imgclf.evaluate("runs/x/best.safetensors", data="photos/")    # on other data with the same classes
    imgclf.evaluate("runs/x", calibrate=True, tta="flip")         # + temperature scaling, test-time augmentation

One forward pass gives the logits; :func:`evaluation_from_logits` turns them into loss, top-1/top-5,
scikit-learn's classification report, the confusion matrix, the most-confused pairs and calibration
(ECE + reliability bins), and keeps the probabilities so report.py can draw galleries without scoring
again. Every view reads the same :class:`Evaluation`, so no number is computed twice.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .config import TTA_MODES
from .data.tensors import Normalizer, to_tensor
from .errors import ImgclfError
from .utils import atomic_write_text


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


# Bins of the reliability diagram and ECE: 15 equal-width confidence bins, as in Guo et al. (2017),
# "On Calibration of Modern Neural Networks", so figures compare with the literature.
ECE_BINS = 15
MOST_CONFUSED = 10          # pairs listed in the report
TTA_SHIFT = 1               # pixels a translated copy moves (as in airbench; 2 px scored ~0.1 point lower
                            # on three FastNet CIFAR-10 runs: 90.51 vs 90.62 % mean)


@dataclass
class Evaluation:
    """One scoring of one split: the JSON-ready ``metrics`` plus the per-image arrays the plots need."""
    metrics: dict[str, Any]   # what `imgclf evaluate --json` prints and evaluation.json holds
    probs: np.ndarray         # (N, K) float32 softmax, calibrated with the checkpoint's temperature if it has one
    y: np.ndarray             # (N,) int64 true labels (indices into classes)
    images: np.ndarray        # (N, H, W, C) uint8: the split as decoded (a view, never copied)
    classes: list[str]

    @property
    def pred(self) -> np.ndarray:
        return self.probs.argmax(1)

    @property
    def losses(self) -> np.ndarray:
        """Per-image cross-entropy under ``probs``: what galleries sort by (highest first)."""
        return -np.log(np.clip(self.probs[np.arange(len(self.y)), self.y], 1e-12, None))


def evaluate(model: str | Path | Any, data: str | None = None, *, split: str = "test", batch_size: int = 512,
             device: str = "auto", tta: str | None = None, calibrate: bool = False,
             calibration_data: str | None = None, save: bool | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Score a run folder, a checkpoint or a loaded :class:`~imgclf.predict.Classifier`.

    Without ``data`` a run/checkpoint is scored on the split it recorded (same source, same seeded
    split), so a run can always be re-checked by its path alone. With ``data``, the images are decoded
    with the checkpoint's own preprocessing and labels matched to its classes by name.

    tta: ``"flip"``, ``"flip+translate"`` or ``"translate"``: also score the average softmax over flipped
        and/or shifted copies (:func:`tta_views`); the result's ``tta`` entry gives top-1 with and without.
    calibrate: fit a temperature on the run's validation split (or on every image of
        ``calibration_data``), store it in the checkpoint (predict then uses it) and report ECE before/after.
    save: write evaluation.json and classification_report.{json,txt} beside the checkpoint; default: when
        scoring a checkpoint on its own test split.

    Returns the metrics dict (``Evaluation.metrics``): n, loss, top1, top5, per_class_accuracy,
    classification_report, confusion_matrix (+ _normalized), most_confused, calibration, [tta]."""
    ev = compute_evaluation(model, data, split=split, batch_size=batch_size, device=device, tta=tta,
                            calibrate=calibrate, calibration_data=calibration_data, progress=progress)
    own_run = data is None and split == "test" and str(ev.metrics.get("checkpoint")).endswith(".safetensors")
    if save if save is not None else own_run:
        save_evaluation(ev, Path(ev.metrics["checkpoint"]).parent)
    return ev.metrics


def compute_evaluation(model: str | Path | Any, data: str | None = None, *, split: str = "test",
                       batch_size: int = 512, device: str = "auto", tta: str | None = None,
                       calibrate: bool = False, calibration_data: str | None = None,
                       progress: bool = True) -> Evaluation:
    """:func:`evaluate`, returning the whole :class:`Evaluation` (report.py draws from it)."""
    from .predict import load

    if tta is not None and tta not in TTA_MODES:
        raise ImgclfError(f"--tta must be one of {', '.join(TTA_MODES)}; got {tta!r}")
    clf = model if hasattr(model, "logits") else load(model, device=device)  # any backend's classifier
    ds = load_run_data(clf, data, progress=progress)
    part = {"test": ds.test, "val": ds.val, "train": ds.train}.get(split, "bad")
    if part == "bad":
        raise ImgclfError(f"split must be test, val or train; got {split!r}")
    if part is None:
        raise ImgclfError(f"{ds.source} has no {split} split; pass --split or data with a {split}/ folder")
    if calibrate:  # the run's own dataset (just loaded, unless `data` is another one) holds the val split
        calibrate_classifier(clf, ds if data is None else None, calibration_data, batch_size=batch_size,
                             progress=progress)
    y = remap_labels(part.y, ds.classes, clf.classes)
    x = to_tensor(part.x)
    logits = clf.logits(x, batch_size=batch_size)
    ev = evaluation_from_logits(logits, y, clf.classes, part.x, temperature=clf.meta.get("temperature"))
    if clf.meta.get("temperature"):
        ev.metrics["calibration"]["fitted_on"] = clf.meta.get("temperature_fitted_on")
    if tta is not None:
        ev.metrics["tta"] = tta_metrics(clf, x, y, tta, batch_size=batch_size, plain_top1=ev.metrics["top1"])
    ev.metrics.update(split=split, data=ds.source, checkpoint=None if clf.path is None else str(clf.path))
    return ev


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


def calibrate(model: str | Path, calibration_data: str | None = None, *, batch_size: int = 512,
              device: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Fit a temperature on the run's validation split (or every image of ``calibration_data``) and store
    it in the checkpoint, whose predictions then use it. -> {temperature, fitted_on, ...}."""
    from .predict import load

    return calibrate_classifier(load(model, device=device), None, calibration_data, batch_size=batch_size,
                                progress=progress)


def calibrate_classifier(clf: Any, ds: Any, calibration_data: str | None, *, batch_size: int,
                         progress: bool) -> dict[str, Any]:
    """Fit + store the temperature for a loaded Classifier, on the val split of ``ds`` (default: the run's
    own dataset) or on all of ``calibration_data``."""
    from .checkpoint import load_checkpoint, save_checkpoint

    if calibration_data is not None:
        ds = load_run_data(clf, calibration_data, progress=progress)
        parts = [p for p in (ds.train, ds.val, ds.test) if p is not None]
        x = np.concatenate([p.x for p in parts])
        y = np.concatenate([remap_labels(p.y, ds.classes, clf.classes) for p in parts])
        where = f"all {len(y):,} images of {ds.source}"
    else:
        ds = ds if ds is not None else load_run_data(clf, None, progress=progress)
        if ds.val is None:
            raise ImgclfError("this run has no validation split (it validated on its test set), so a temperature "
                              "fitted here would be tuned on test data; pass --calibration-data FOLDER with "
                              "held-out labelled images, or train with --val-split 0.1")
        x, y = ds.val.x, remap_labels(ds.val.y, ds.classes, clf.classes)
        where = f"the run's validation split ({len(y):,} images)"
    if clf.path is None:
        raise ImgclfError("calibrate needs a checkpoint file to store the temperature in; load one with imgclf.load")
    t = fit_temperature(clf.logits(to_tensor(x), batch_size=batch_size), y)
    ckpt = load_checkpoint(clf.path)
    meta = {k: v for k, v in ckpt.meta.items() if k not in ("format", "format_version")}
    meta["temperature"] = t
    meta["temperature_fitted_on"] = where
    save_checkpoint(clf.path, ckpt.state_dict, meta, ckpt.train_state)
    clf.meta["temperature"], clf.meta["temperature_fitted_on"] = t, where
    return {"temperature": t, "fitted_on": where}


def tta_views(x: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The copies of a (N, C, H, W) uint8 batch that ``mode`` averages over: the images and their mirror
    images ("flip"); for "flip+translate" also both shifted by TTA_SHIFT pixels down-right and up-left
    (edge pixels repeated, so no black borders appear); "translate" is the images and their two shifts,
    with no mirror images (for digits and letters, which a mirror changes)."""
    bases = [x] if mode == "translate" else [x, x.flip(3)]
    views = list(bases)
    if mode in ("flip+translate", "translate"):
        h, w = x.shape[2], x.shape[3]
        for d in (TTA_SHIFT, -TTA_SHIFT):
            rows = (torch.arange(h, device=x.device) - d).clamp(0, h - 1)
            cols = (torch.arange(w, device=x.device) - d).clamp(0, w - 1)
            views += [v.index_select(2, rows).index_select(3, cols) for v in bases]
    return views


def tta_metrics(clf: Any, x: torch.Tensor, y: np.ndarray, mode: str, *, batch_size: int,
                plain_top1: float) -> dict[str, Any]:
    """Top-1 and loss of the softmax averaged over :func:`tta_views`, next to the plain top-1."""
    views = tta_views(x, mode)
    probs = sum(torch.softmax(clf.logits(v, batch_size=batch_size), dim=1).cpu() for v in views) / len(views)
    y_t = torch.as_tensor(np.asarray(y), dtype=torch.int64)
    top1 = (probs.argmax(1) == y_t).float().mean().item()
    loss = F.nll_loss(probs.clamp_min(1e-12).log(), y_t).item()
    return {"mode": mode, "views": len(views), "top1": top1, "loss": loss, "top1_without": plain_top1,
            "gain": top1 - plain_top1}


def save_evaluation(ev: Evaluation, folder: Path) -> list[Path]:
    """evaluation.json (the metrics, as `imgclf evaluate --json` prints them) and classification_report.json/.txt."""
    folder = Path(folder)
    m = ev.metrics
    files = {
        folder / "evaluation.json": json.dumps(m, indent=2) + "\n",
        folder / "classification_report.json": json.dumps(m["classification_report"], indent=2) + "\n",
        folder / "classification_report.txt": m["classification_report_text"],
    }
    for path, text in files.items():
        atomic_write_text(path, text)
    return list(files)


def format_evaluation(m: dict[str, Any]) -> str:
    """The human-readable table `imgclf evaluate` prints, from the metrics dict."""
    classes = list(m["per_class_accuracy"])
    lines = [f"{m['split']} on {m['data']}  ({m['n']:,} images, {m['checkpoint']})",
             f"loss {m['loss']:.4f}   top-1 {m['top1']:.2%}   top-5 {m['top5']:.2%}   macro F1 {m['macro_f1']:.4f}",
             "", m["classification_report_text"].rstrip(), ""]
    if len(classes) <= 20:
        width = max(4, *(len(c) for c in classes))
        cw = max(5, *(len(f"{v:,}") for row in m["confusion_matrix"] for v in row), *(len(c[:8]) for c in classes))
        lines.append("confusion matrix (rows: true, columns: predicted)")
        lines.append(" " * width + "  " + " ".join(f"{c[:8]:>{cw}}" for c in classes))
        for c, row in zip(classes, m["confusion_matrix"]):
            lines.append(f"{c:>{width}}  " + " ".join(f"{v:>{cw},}" for v in row))
        lines.append("")
    if m["most_confused"]:
        lines.append("most confused: " + ", ".join(f"{p['true']} -> {p['predicted']} ({p['count']:,})"
                                                   for p in m["most_confused"][:5]))
    cal = m["calibration"]
    line = f"calibration: ECE {cal['ece']:.2%}"
    if cal.get("temperature"):
        line += (f" -> {cal['ece_calibrated']:.2%} with temperature {cal['temperature']:.4g}"
                 + (f" (fitted on {cal['fitted_on']})" if cal.get("fitted_on") else ""))
    lines.append(line)
    if m.get("tta"):
        t = m["tta"]
        lines.append(f"TTA {t['mode']} ({t['views']} views): top-1 {t['top1']:.2%} vs {t['top1_without']:.2%} "
                     f"without ({t['gain'] * 100:+.2f} points)")
    return "\n".join(lines)


def load_run_data(clf: Any, data: str | None, *, progress: bool):
    """The run's own dataset (same source, same seeded splits) or ``data`` decoded as the checkpoint expects."""
    from .data import load_dataset

    spec, rec = clf.preprocess, clf.meta.get("data", {})
    if data is not None:
        return load_dataset(data, image_size=spec.image_size, channels=spec.channels, progress=progress)
    if not rec.get("source"):
        raise ImgclfError("this checkpoint does not record its data; pass --data")
    # a built-in dataset is found again by its name, anything else by its path; asked for as training asked
    # (e.g. native size, image_size None), the decoded arrays come from training's cache entry
    def load(image_size, channels):
        return load_dataset(rec.get("builtin") or rec["source"], image_size=image_size, channels=channels,
                            val_split=rec.get("val_split", 0.0), test_split=rec.get("test_split", 0.0),
                            seed=rec.get("seed", 0), skip_bad_images=rec.get("skip_bad_images", False),
                            progress=progress)

    if "image_size" in rec:
        ds = load(rec["image_size"], rec.get("channels"))
        if (ds.image_size, ds.channels) == (spec.image_size, spec.channels):
            return ds
    return load(spec.image_size, spec.channels)


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
