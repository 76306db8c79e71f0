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

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..config import TTA_MODES
from ..data.run_data import load_run_data, remap_labels
from ..data.tensors import chunks, to_tensor
from ..errors import ImgclfError
from ..inference import tta_views
from ..utils import atomic_write_text
from .metrics import Evaluation, evaluation_from_logits, fit_temperature


def evaluate(model: str | Path | Any, data: str | None = None, *, split: str = "test", batch_size: int = 512,
             device: str = "auto", tta: str | None = None, calibrate: bool = False,
             calibration_data: str | None = None, save: bool | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Score a run folder, a checkpoint or a loaded :class:`~imgclf.classifier.Classifier`.

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
    from ..classifier import load

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
    logits = clf.logits_of(part.x, batch_size=batch_size)  # a chunk of images at a time
    ev = evaluation_from_logits(logits, y, clf.classes, part.x, temperature=clf.meta.get("temperature"))
    if clf.meta.get("temperature"):
        ev.metrics["calibration"]["fitted_on"] = clf.meta.get("temperature_fitted_on")
    if tta is not None:
        ev.metrics["tta"] = tta_metrics(clf.logits, part.x, y, tta, batch_size=batch_size,
                                        plain_top1=ev.metrics["top1"])
    ev.metrics.update(split=split, data=ds.source, checkpoint=None if clf.path is None else str(clf.path))
    return ev


def calibrate(model: str | Path, calibration_data: str | None = None, *, batch_size: int = 512,
              device: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Fit a temperature on the run's validation split (or every image of ``calibration_data``) and store
    it in the checkpoint, whose predictions then use it. -> {temperature, fitted_on, ...}."""
    from ..classifier import load

    return calibrate_classifier(load(model, device=device), None, calibration_data, batch_size=batch_size,
                                progress=progress)


def calibrate_classifier(clf: Any, ds: Any, calibration_data: str | None, *, batch_size: int,
                         progress: bool) -> dict[str, Any]:
    """Fit + store the temperature for a loaded Classifier, on the val split of ``ds`` (default: the run's
    own dataset) or on all of ``calibration_data``."""
    from ..checkpoint import load_checkpoint, save_checkpoint

    if calibration_data is not None:
        ds = load_run_data(clf, calibration_data, progress=progress)
        parts = [p for p in (ds.train, ds.val, ds.test) if p is not None]
        logits = torch.cat([clf.logits_of(p.x, batch_size=batch_size) for p in parts])
        y = np.concatenate([remap_labels(p.y, ds.classes, clf.classes) for p in parts])
        where = f"all {len(y):,} images of {ds.source}"
    else:
        ds = ds if ds is not None else load_run_data(clf, None, progress=progress)
        if ds.val is None:
            raise ImgclfError("this run has no validation split (it validated on its test set), so a temperature "
                              "fitted here would be tuned on test data; pass --calibration-data FOLDER with "
                              "held-out labelled images, or train with --val-split 0.1")
        logits, y = clf.logits_of(ds.val.x, batch_size=batch_size), remap_labels(ds.val.y, ds.classes, clf.classes)
        where = f"the run's validation split ({len(y):,} images)"
    if clf.path is None:
        raise ImgclfError("calibrate needs a checkpoint file to store the temperature in; load one with imgclf.load")
    t = fit_temperature(logits, y)
    ckpt = load_checkpoint(clf.path)
    meta = {k: v for k, v in ckpt.meta.items() if k not in ("format", "format_version")}
    meta["temperature"] = t
    meta["temperature_fitted_on"] = where
    save_checkpoint(clf.path, ckpt.state_dict, meta, ckpt.train_state)
    clf.meta["temperature"], clf.meta["temperature_fitted_on"] = t, where
    return {"temperature": t, "fitted_on": where}


def tta_metrics(logits: Callable[..., torch.Tensor], images, y: np.ndarray, mode: str, *, batch_size: int,
                plain_top1: float, plain_logits: torch.Tensor | None = None) -> dict[str, Any]:
    """Top-1 and loss of the softmax averaged over :func:`tta_views`, next to the plain top-1. ``images``:
    (N, H, W, C) uint8 (an array or ImageRows), read a chunk at a time; ``logits(views, batch_size=)`` scores
    a (N, C, H, W) uint8 tensor; ``plain_logits``, when given, stand for the un-augmented view."""
    probs, n_views = [], 0
    for start, part in chunks(images, batch_size):
        x = to_tensor(part)
        views = tta_views(x, mode)
        n_views = len(views)
        p = sum(torch.softmax(plain_logits[start:start + len(x)] if v is x and plain_logits is not None else
                              logits(v, batch_size=batch_size), dim=1).cpu() for v in views)
        probs.append(p / n_views)
    probs = torch.cat(probs) if probs else torch.zeros(0, 1)
    y_t = torch.as_tensor(np.asarray(y), dtype=torch.int64)
    top1 = (probs.argmax(1) == y_t).float().mean().item()
    loss = F.nll_loss(probs.clamp_min(1e-12).log(), y_t).item()
    return {"mode": mode, "views": n_views, "top1": top1, "loss": loss, "top1_without": plain_top1,
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


