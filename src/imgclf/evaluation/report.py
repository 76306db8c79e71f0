"""Plots and the one-file HTML report of a run, drawn from an :class:`~imgclf.evaluation.metrics.Evaluation`.

    imgclf.report("runs/cifar10-seed-cnn")            # re-score the test split, rewrite plots + report.html
    imgclf.report("runs/cifar10-seed-cnn", tta="flip")

Nothing here computes a metric: every number comes from evaluate.py (the Evaluation's metrics dict)
or from the run folder (metrics.csv, run.json, config.toml). Plots are written at fixed pixel sizes
(:data:`PLOT_SIZES`), headless (matplotlib's Agg backend), in one style; ``report.html`` embeds them as
base64 PNG, so the file can be mailed or archived on its own.
"""
from __future__ import annotations

import base64
import csv
import html
import json
import math
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .._version import __version__
from ..errors import ImgclfError
from ..utils import atomic_write_bytes, atomic_write_text
from .plots import (
    gallery_indices,
    plot_confusion,
    plot_curves,
    plot_gallery,
    plot_per_class,
    plot_reliability,
)

# the galleries again with each image's heat map over it: only for a model that can explain
CAM_PLOTS = ("gallery_misclassified_cam.png", "gallery_correct_cam.png")
RUN_PLOTS = ("curves.png", "confusion_matrix.png", "per_class_accuracy.png", "reliability.png",
             "gallery_misclassified.png", "gallery_correct.png", *CAM_PLOTS)


def report(run: str | Path, *, tta: str | None = None, batch_size: int = 512, device: str = "auto",
           progress: bool = True) -> Path:
    """Score the run's test split once and (re)write evaluation.json, classification_report.{json,txt},
    the plots and report.html in the run folder. ``tta``: also report test-time augmentation (default:
    the mode the last saved evaluation used, if any). -> the report.html path."""
    from ..classifier import load
    from .evaluate import compute_evaluation

    run_dir = _run_dir(run)
    if tta is None:
        saved = _read_json(run_dir / "evaluation.json")
        tta = (saved.get("tta") or {}).get("mode")
    clf = load(run_dir, device=device)  # loaded here, so the galleries' heat maps use the very model scored
    ev = compute_evaluation(clf, tta=tta, batch_size=batch_size, device=device, progress=progress)
    return write_report(run_dir, ev, clf)


def write_report(run_dir: str | Path, ev: Any | None, clf: Any | None = None) -> Path:
    """Write the evaluation files, the plots and report.html for ``ev`` (None: a run without test data;
    only the curves and the run's record are shown). ``clf``: the classifier ``ev`` scored; when it can
    explain (:func:`imgclf.explain.can_explain`), the galleries are drawn again with heat maps (LayerCAM)
    (:data:`CAM_PLOTS`). -> the report.html path."""
    from .evaluate import save_evaluation

    run_dir = Path(run_dir)
    info = _read_json(run_dir / "run.json")
    history = read_history(run_dir / "metrics.csv")
    config_text = _read_text(run_dir / "config.toml")
    images: dict[str, bytes] = {}
    if history:
        images["curves.png"] = plot_curves(history, best_epoch=info.get("best_epoch"),
                                           schedule=_config_value(config_text, "schedule"),
                                           val_label=_val_label(info))
    if ev is not None:
        save_evaluation(ev, run_dir)
        m = ev.metrics
        images["confusion_matrix.png"] = plot_confusion(m["confusion_matrix"], m["confusion_matrix_normalized"],
                                                        ev.classes)
        images["per_class_accuracy.png"] = plot_per_class(m["per_class_accuracy"], m["top1"], m["n"])
        images["reliability.png"] = plot_reliability(m["calibration"])
        wrong, right = gallery_indices(ev)
        images["gallery_misclassified.png"] = plot_gallery(ev, wrong, "Misclassified test images, highest loss first")
        images["gallery_correct.png"] = plot_gallery(ev, right, "Correctly classified test images, "
                                                     "least confident first")
        heat = gallery_heat_maps(ev, clf, [wrong, right])
        if heat is not None:
            images["gallery_misclassified_cam.png"] = plot_gallery(
                ev, wrong, "Misclassified: where the model saw the class it predicted (LayerCAM)", heat[0])
            images["gallery_correct_cam.png"] = plot_gallery(
                ev, right, "Correctly classified: where the model saw the class (LayerCAM)", heat[1])
    for name in CAM_PLOTS:  # an older report's heat maps, of a model that no longer draws them
        if name not in images:
            (run_dir / name).unlink(missing_ok=True)
    for name, png in images.items():
        atomic_write_bytes(run_dir / name, png)
    page = render_html(run_dir, info, history, config_text, None if ev is None else ev.metrics, images)
    atomic_write_text(run_dir / "report.html", page)
    return run_dir / "report.html"


def gallery_heat_maps(ev: Any, clf: Any | None, groups: list[np.ndarray]) -> list[list[np.ndarray]] | None:
    """Heat-map overlays (S, S, 3) uint8 of exactly the images ``ev`` shows for each group of indices, each
    explaining the class ``ev`` predicted for it (for a misclassified image: the wrong class), in one batch;
    None when ``clf`` cannot explain (an ONNX model, a model without ``cam_layer``) or the heat map fails (the
    report is drawn without them, with a warning)."""
    from ..explain import can_explain, explain_arrays

    if clf is None or not can_explain(clf):
        return None
    index = [int(i) for group in groups for i in group]
    if not index:
        return [[] for _ in groups]
    arrays = [np.asarray(ev.images[i]) for i in index]
    try:
        found = explain_arrays(clf, arrays, [f"test image {i}" for i in index],
                               target=[int(ev.pred[i]) for i in index], batch_size=len(index))
    except (ImgclfError, RuntimeError, ValueError) as e:
        warnings.warn(f"the report's heat maps were left out ({type(e).__name__}: {e})", stacklevel=2)
        return None
    overlays = [np.asarray(x.overlay(size=a.shape[0])) for x, a in zip(found, arrays)]
    out, start = [], 0
    for group in groups:
        out.append(overlays[start:start + len(group)])
        start += len(group)
    return out


# ---------------------------------------------------------------------------- run folder
def read_history(path: Path) -> list[dict[str, float]]:
    """metrics.csv -> one dict of floats per epoch ([] if the file is missing)."""
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        return [{k: float(v) if v not in ("", None) else math.nan for k, v in row.items()}
                for row in csv.DictReader(f)]


def _run_dir(run: str | Path) -> Path:
    path = Path(run)
    if path.is_file():
        path = path.parent
    if not (path / "run.json").is_file():
        raise ImgclfError(f"{run} is not a run folder (no run.json); pass a folder written by `imgclf train`")
    return path


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return ""


def _config_value(config_text: str, key: str) -> Any:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(config_text).get(key)
    except tomllib.TOMLDecodeError:
        return None


def _val_label(info: dict[str, Any]) -> str:
    data = info.get("data", {})
    return "test (used as validation)" if not data.get("val") and data.get("test") else "validation"


# ---------------------------------------------------------------------------- HTML
CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;margin:0;background:#f6f7f9}
main{max-width:1240px;margin:0 auto;padding:24px 32px 64px;background:#fff}
h1{font-size:26px;margin:0 0 4px}
h2{font-size:20px;margin:36px 0 10px;border-bottom:2px solid #e4e6ea;padding-bottom:4px}
.sub{color:#666;margin:0 0 18px}.cards{display:flex;flex-wrap:wrap;gap:12px;margin:14px 0}
.card{flex:1 1 150px;border:1px solid #e1e4e8;border-radius:8px;padding:10px 14px;background:#fafbfc}
.card .v{font-size:28px;font-weight:700}.card .k{color:#666;font-size:13px}
.card.main{border-color:#4C72B0;background:#eef3fb}.card.main .v{color:#4C72B0}
.fails{background:#fff6f6;border-left:4px solid #C44E52;padding:8px 14px;margin:12px 0}
.note{background:#fffbe6;border-left:4px solid #e0b000;padding:8px 14px;margin:8px 0}
img{max-width:100%;height:auto;display:block;margin:8px 0}
table{border-collapse:collapse;margin:8px 0;font-size:14px}
th,td{padding:4px 12px;border-bottom:1px solid #eee;text-align:right}th{background:#f3f4f6}
td:first-child,th:first-child{text-align:left}tr.sum td{font-weight:600;border-top:2px solid #ddd}
td.low{color:#C44E52;font-weight:600}
pre{background:#f3f4f6;padding:10px 14px;overflow:auto;white-space:pre-wrap;font-size:13px;border-radius:6px}
.muted{color:#777;font-size:13px}
.two{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr);gap:24px;align-items:start}
.two h2{margin-top:28px}
"""


def render_html(run_dir: Path, info: dict[str, Any], history: list[dict[str, float]], config_text: str,
                metrics: dict[str, Any] | None, images: dict[str, bytes]) -> str:
    """The report page; every image inline (data: URIs), no external file, script or font."""
    e = html.escape
    data = info.get("data", {})
    name = run_dir.name
    model = _config_value(config_text, "model") or "?"
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{e(name)}: imgclf report</title>",
             f"<meta name='viewport' content='width=device-width, initial-scale=1'><style>{CSS}</style></head>"
             "<body><main>",
             f"<h1>{e(name)}</h1>",
             f"<p class='sub'>{e(model)} on {e(data.get('name', '?'))} &middot; {len(history)} epoch(s) &middot; "
             f"status {e(str(info.get('status', '?')))} &middot; {e(str(run_dir))}</p>"]
    if metrics is not None:
        parts += _headline(metrics)
    for note in info.get("notes") or []:
        parts.append(f"<div class='note'>Note: {e(note)}</div>")

    parts.append("<h2 id='curves'>Training curves</h2>")
    if "curves.png" in images:
        parts.append(_img(images["curves.png"], "loss and accuracy per epoch, train and validation"))
        best = info.get("best_epoch")
        if best and history and best <= len(history):
            row = history[int(best) - 1]
            took = _duration(sum(r["seconds"] for r in history))
            kept = (f"The run keeps its last epoch (<b>{best}</b>), the only one validated"
                    if info.get("val_every") == 0 else f"Best epoch <b>{best}</b> of {len(history)}")
            parts.append(f"<p>{kept}: {_val_label(info)} loss "
                         f"{row['val_loss']:.4f}, accuracy {row['val_acc']:.2%}. Training took {took}.</p>")
    else:
        parts.append("<p class='muted'>No epochs recorded.</p>")

    if metrics is not None:
        parts += _metrics_sections(metrics, images)
    else:
        parts.append("<h2>Final metrics</h2><p class='muted'>This run has no test data, so there is nothing to "
                     "score; pass a dataset with a test/ folder or --test-split.</p>")

    parts.append("<h2 id='dataset'>Dataset</h2><table>")
    rows = [("source", data.get("source")), ("classes", f"{len(data.get('classes', []))}: "
                                             + ", ".join(data.get("classes", [])[:20])),
            ("image size", f"{data.get('image_size')}x{data.get('image_size')} "
                           f"{'RGB' if data.get('channels') == 3 else 'greyscale'}"),
            ("train / val / test", f"{data.get('train', 0):,} / {data.get('val', 0):,} / {data.get('test', 0):,}"),
            ("validation from", {"val-folder": "val/ folder", "val-split": "a fraction of train"}.get(
                data.get("val_origin"), "the test set (no validation split)")),
            ("unreadable files skipped", len(data.get("skipped") or []))]
    parts += [f"<tr><td>{e(k)}</td><td style='text-align:left'>{e(str(v))}</td></tr>" for k, v in rows]
    parts.append("</table>")
    parts.append(f"<h2 id='config'>Configuration</h2><pre>{e(config_text or '(config.toml missing)')}</pre>")
    cmd = info.get("command")
    if cmd and cmd.split(" ", 1)[0].endswith("/imgclf"):  # the console script's full path says nothing useful
        cmd = "imgclf " + cmd.split(" ", 1)[1] if " " in cmd else "imgclf"
    parts.append("<h2 id='reproduce'>Reproduce</h2><pre>"
                 + e(f"imgclf train --config {run_dir / 'config.toml'}   # same settings, same seed, same run")
                 + (f"\n# original command: {e(cmd)}" if cmd else "")
                 + e(f"\nimgclf evaluate {run_dir} --json                # the numbers above"
                     f"\nimgclf report {run_dir}                         # re-render this page") + "</pre>")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts.append(f"<p class='muted'>imgclf {__version__}, torch {e(str(info.get('torch_version', '?')))}, "
                 f"{e(str(info.get('device', '?')))}; written {stamp}.</p></main></body></html>")
    return "\n".join(parts)


def _headline(m: dict[str, Any]) -> list[str]:
    e = html.escape
    cal = m["calibration"]
    ece = cal.get("ece_calibrated", cal["ece"])
    ece_note = "after temperature scaling" if cal.get("temperature") else "calibration error"
    cards = [("main", f"{m['top1']:.1%}", f"test accuracy (top-1), {m['n']:,} images"),
             ("", f"{m['top5']:.1%}", "top-5 accuracy"),
             ("", f"{m['macro_f1']:.3f}", "macro F1"),
             ("", f"{m['loss']:.3f}", "test loss (cross-entropy)"),
             ("", f"{ece:.1%}", f"ECE, {ece_note}")]
    if m.get("tta"):
        cards.append(("", f"{m['tta']['top1']:.1%}", f"with TTA ({e(m['tta']['mode'])})"))
    out = ["<div class='cards'>"] + [f"<div class='card {c}'><div class='v'>{v}</div><div class='k'>{k}</div></div>"
                                     for c, v, k in cards] + ["</div>"]
    weakest = sorted(((a, c) for c, a in m["per_class_accuracy"].items() if a is not None))[:3]
    fails = ", ".join(f"<b>{e(c)}</b> {a:.0%}" for a, c in weakest)
    pairs = ", ".join(f"{e(p['true'])} &rarr; {e(p['predicted'])} ({p['count']:,})" for p in m["most_confused"][:3])
    out.append(f"<div class='fails'>Where it fails: weakest classes {fails}"
               + (f"; most often confused: {pairs}" if pairs else "; no confusions") + ".</div>")
    return out


def _metrics_sections(m: dict[str, Any], images: dict[str, bytes]) -> list[str]:
    e = html.escape
    out = ["<div class='two'><div><h2 id='metrics'>Final metrics</h2>",
           f"<p>Scored on the {e(m['split'])} split of {e(str(m['data']))} ({m['n']:,} images) with "
           f"{e(str(m.get('checkpoint')))}.</p>",
           "<table><tr><th>metric</th><th>value</th></tr>"]
    out += [f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in (
        ("loss", f"{m['loss']:.4f}"), ("top-1 accuracy", f"{m['top1']:.2%}"), ("top-5 accuracy", f"{m['top5']:.2%}"),
        ("macro F1", f"{m['macro_f1']:.4f}"), ("ECE", f"{m['calibration']['ece']:.2%}"))]
    out.append("</table></div>")

    rep = m["classification_report"]
    out += ["<div><h2 id='classification-report'>Classification report</h2>",
            "<table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>"]
    low = m["top1"] - 0.1
    for cls, r in rep.items():
        if not isinstance(r, dict) or cls in ("macro avg", "weighted avg"):
            continue
        cells = "".join(f"<td{' class=low' if r[k] < low else ''}>{r[k]:.3f}</td>"
                        for k in ("precision", "recall", "f1-score"))
        out.append(f"<tr><td>{e(cls)}</td>{cells}<td>{int(r['support']):,}</td></tr>")
    out.append(f"<tr class='sum'><td>accuracy</td><td></td><td></td><td>{rep['accuracy']:.3f}</td>"
               f"<td>{m['n']:,}</td></tr>")
    for avg in ("macro avg", "weighted avg"):
        r = rep[avg]
        out.append(f"<tr class='sum'><td>{avg}</td><td>{r['precision']:.3f}</td><td>{r['recall']:.3f}</td>"
                   f"<td>{r['f1-score']:.3f}</td><td>{int(r['support']):,}</td></tr>")
    out.append("</table><p class='muted'>Red: more than 10 points below the overall accuracy. "
               "Also in classification_report.txt / .json.</p></div></div>")

    out += ["<div class='two'><div><h2 id='confusion-matrix'>Confusion matrix</h2>",
            _img(images["confusion_matrix.png"], "confusion matrix heat-map"), "</div>",
            "<div><h2 id='per-class'>Per-class accuracy</h2>",
            _img(images["per_class_accuracy.png"], "per-class accuracy"), "</div></div>"]
    if m["most_confused"]:
        out.append("<p><b>Most-confused pairs</b></p><table><tr><th>true class</th><th>predicted as</th>"
                   "<th>images</th><th>share of the true class</th></tr>")
        totals = {c: sum(row) for c, row in zip(m["per_class_accuracy"], m["confusion_matrix"])}
        out += [f"<tr><td>{e(p['true'])}</td><td style='text-align:left'>{e(p['predicted'])}</td>"
                f"<td>{p['count']:,}</td><td>{p['count'] / max(totals[p['true']], 1):.1%}</td></tr>"
                for p in m["most_confused"]]
        out.append("</table>")

    cal = m["calibration"]
    out += ["<h2 id='calibration'>Calibration</h2><div class='two'>",
            _img(images["reliability.png"], "reliability diagram")]
    text = (f"Expected calibration error (ECE, {cal['n_bins']} bins): <b>{cal['ece']:.2%}</b>: on average the "
            "confidence the model states differs from its actual accuracy by this much.")
    if cal.get("temperature"):
        text += (f" With temperature scaling (T = {cal['temperature']:.3g}, fitted on "
                 f"{e(str(cal.get('fitted_on') or 'validation data'))}) the ECE is <b>{cal['ece_calibrated']:.2%}</b> "
                 "and predictions use the scaled probabilities.")
    else:
        text += " Fit a temperature on validation data with <code>imgclf evaluate RUN --calibrate</code>."
    out.append(f"<p>{text}</p></div>")

    if m.get("tta"):
        t = m["tta"]
        out += ["<h2 id='tta'>Test-time augmentation</h2>",
                f"<p>Averaging the softmax over {t['views']} copies ({e(t['mode'])}): top-1 <b>{t['top1']:.2%}</b> "
                f"against {t['top1_without']:.2%} without ({t['gain'] * 100:+.2f} points); loss {t['loss']:.4f}.</p>"]
    out += ["<h2 id='misclassified'>Misclassified test images</h2>",
            "<p class='muted'>Highest loss first: the model's most confident mistakes. Title: true class, "
            "predicted class and its probability.</p>",
            _img(images["gallery_misclassified.png"], "misclassified test images")]
    if "gallery_misclassified_cam.png" in images:
        out += ["<p class='muted'>The same images, in the same places, with their heat map (LayerCAM): red where "
                "the model found the evidence for the class it <b>predicted</b> (the wrong one).</p>",
                _img(images["gallery_misclassified_cam.png"], "misclassified test images with heat maps "
                     "of the predicted class")]
    out += ["<h2 id='correct'>Correctly classified test images</h2>",
            "<p class='muted'>Highest loss first: the right answers it was least sure of.</p>",
            _img(images["gallery_correct.png"], "correctly classified test images")]
    if "gallery_correct_cam.png" in images:
        out += ["<p class='muted'>The same images with their heat map (LayerCAM): red where the model found the "
                "evidence for its (right) answer.</p>",
                _img(images["gallery_correct_cam.png"], "correctly classified test images with heat maps")]
    return out


def _img(png: bytes, alt: str) -> str:
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode('ascii')}'>"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
