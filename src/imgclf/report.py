"""Plots and the one-file HTML report of a run, drawn from an :class:`~imgclf.evaluate.Evaluation`.

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
import io
import json
import math
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .errors import ImgclfError
from .utils import atomic_write_bytes, atomic_write_text

DPI = 100
# (width, height) in pixels of every plot file; tests check them, layouts rely on them.
PLOT_SIZES = {
    "curves.png": (1200, 450),
    "confusion_matrix.png": (800, 720),
    "per_class_accuracy.png": (800, 480),
    "reliability.png": (640, 640),
    "gallery_misclassified.png": (1200, 720),
    "gallery_correct.png": (1200, 720),
    "compare.png": (1200, 450),
    "class_counts.png": (1000, 450),
    "samples.png": (1000, 800),
}
GALLERY_ROWS, GALLERY_COLS = 4, 8
TRAIN_COLOUR, VAL_COLOUR, ACCENT, GOOD, BAD = "#4C72B0", "#DD8452", "#8172B3", "#55A868", "#C44E52"
RUN_PLOTS = ("curves.png", "confusion_matrix.png", "per_class_accuracy.png", "reliability.png",
             "gallery_misclassified.png", "gallery_correct.png")


def report(run: str | Path, *, tta: str | None = None, batch_size: int = 512, device: str = "auto",
           progress: bool = True) -> Path:
    """Score the run's test split once and (re)write evaluation.json, classification_report.{json,txt},
    the plots and report.html in the run folder. ``tta``: also report test-time augmentation (default:
    the mode the last saved evaluation used, if any). -> the report.html path."""
    from .evaluate import compute_evaluation

    run_dir = _run_dir(run)
    if tta is None:
        saved = _read_json(run_dir / "evaluation.json")
        tta = (saved.get("tta") or {}).get("mode")
    ev = compute_evaluation(run_dir, tta=tta, batch_size=batch_size, device=device, progress=progress)
    return write_report(run_dir, ev)


def write_report(run_dir: str | Path, ev: Any | None) -> Path:
    """Write the evaluation files, the plots and report.html for ``ev`` (None: a run without test data;
    only the curves and the run's record are shown). -> the report.html path."""
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
    for name, png in images.items():
        atomic_write_bytes(run_dir / name, png)
    page = render_html(run_dir, info, history, config_text, None if ev is None else ev.metrics, images)
    atomic_write_text(run_dir / "report.html", page)
    return run_dir / "report.html"


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


# ---------------------------------------------------------------------------- plots
def _figure(name: str, **kwargs):
    import matplotlib

    matplotlib.use("Agg", force=True)  # headless: never needs a display
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.titlesize": 12, "axes.titleweight": "bold",
                         "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
                         "grid.alpha": 0.3, "legend.frameon": False, "figure.facecolor": "white"})
    w, h = PLOT_SIZES[name]
    return plt.subplots(figsize=(w / DPI, h / DPI), dpi=DPI, **kwargs)


def _png(fig) -> bytes:
    """The figure as PNG bytes at exactly its PLOT_SIZES size (no bbox_inches="tight", which would crop)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return buf.getvalue()


def plot_curves(history: Sequence[dict[str, float]], *, best_epoch: int | None = None, schedule: str | None = None,
                val_label: str = "validation") -> bytes:
    """Loss and accuracy per epoch, train vs validation; the best epoch and any learning-rate drop of a
    step schedule (constant/plateau) are marked."""
    fig, axes = _figure("curves.png", ncols=2, layout="constrained")
    epochs = [r["epoch"] for r in history]
    drops = []
    if schedule in (None, "constant", "plateau"):  # smooth schedules change the lr every step: nothing to mark
        drops = [(history[i]["epoch"], history[i]["lr"]) for i in range(1, len(history))
                 if history[i]["lr"] < history[i - 1]["lr"] * 0.99]
    for ax, key, title in ((axes[0], "loss", "Loss (lower is better)"), (axes[1], "acc", "Accuracy")):
        ax.plot(epochs, [r[f"train_{key}"] for r in history], "o-", color=TRAIN_COLOUR, label="train", ms=4)
        val = [r[f"val_{key}"] for r in history]
        if not all(math.isnan(v) for v in val):
            ax.plot(epochs, val, "o-", color=VAL_COLOUR, label=val_label, ms=4)
        if best_epoch:
            ax.axvline(best_epoch, color=GOOD, ls="--", lw=1.5, label=f"best epoch ({best_epoch})")
        for i, (e, lr) in enumerate(drops):
            ax.axvline(e - 0.5, color="grey", ls=":", lw=1.2, label="lr lowered" if i == 0 else None)
            ax.annotate(f"lr {lr:.2g}", (e - 0.5, 1), xycoords=("data", "axes fraction"), fontsize=8,
                        color="grey", ha="left", va="top", rotation=90)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        if key == "acc":
            ax.yaxis.set_major_formatter(_percent())
        ax.legend(loc="best")
    return _png(fig)


def plot_confusion(counts: Sequence[Sequence[int]], normalized: Sequence[Sequence[float]],
                   classes: Sequence[str]) -> bytes:
    """Heat-map coloured by row share (each true class sums to 100%), cells labelled with counts."""
    fig, ax = _figure("confusion_matrix.png", layout="constrained")
    cm, share = np.asarray(counts), np.asarray(normalized)
    k = len(classes)
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.grid(False)
    ax.set_xticks(range(k), classes, rotation=45 if k > 4 else 0, ha="right" if k > 4 else "center",
                  fontsize=9 if k <= 20 else 6)
    ax.set_yticks(range(k), classes, fontsize=9 if k <= 20 else 6)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("Confusion matrix (counts; colour = share of the true class)")
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, f"{cm[i, j]:,}", ha="center", va="center", fontsize=8 if k > 10 else 10,
                            color="white" if share[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, format=_percent())
    return _png(fig)


def plot_per_class(per_class: dict[str, float | None], overall: float, n: int) -> bytes:
    """Horizontal bars of each class's accuracy (recall), worst at the bottom, overall accuracy dashed."""
    fig, ax = _figure("per_class_accuracy.png", layout="constrained")
    items = sorted(((c, a) for c, a in per_class.items() if a is not None), key=lambda t: t[1])
    names, accs = [c for c, _ in items], [a for _, a in items]
    colours = [BAD if a < overall - 0.1 else (GOOD if a > overall + 0.1 else TRAIN_COLOUR) for a in accs]
    ax.barh(range(len(items)), accs, color=colours)
    ax.set_yticks(range(len(items)), names, fontsize=9 if len(items) <= 25 else 6)
    ax.axvline(overall, color="black", ls="--", lw=1, label=f"overall {overall:.1%}")
    if len(items) <= 25:
        for i, a in enumerate(accs):
            inside = a > 0.2
            ax.text(a - 0.01 if inside else a + 0.01, i, f"{a:.1%}", va="center", ha="right" if inside else "left",
                    fontsize=9, color="white" if inside else "black")
    ax.set_xlim(0, 1)
    ax.xaxis.set_major_formatter(_percent())
    ax.set_title(f"Per-class accuracy (recall) on {n:,} test images")
    ax.legend(loc="lower right")
    ax.grid(axis="y", visible=False)
    return _png(fig)


def plot_reliability(calibration: dict[str, Any]) -> bytes:
    """Reliability diagram: accuracy per confidence bin against the diagonal of perfect calibration, the
    calibrated model's points when a temperature was fitted, and below, how many images fall in each bin."""
    fig, (ax, hist) = _figure("reliability.png", nrows=2, sharex=True, layout="constrained",
                              gridspec_kw={"height_ratios": [3, 1]})
    bins = calibration["bins"]
    lo = np.array([b["lo"] for b in bins])
    width = lo[1] - lo[0] if len(lo) > 1 else 1.0
    acc = np.array([b["accuracy"] if b["count"] else 0.0 for b in bins])
    conf = np.array([b["confidence"] if b["count"] else np.nan for b in bins])
    ax.bar(lo, acc, width=width, align="edge", color=TRAIN_COLOUR, edgecolor="white",
           label=f"accuracy per bin (ECE {calibration['ece']:.2%})")
    gap_lo, gap_hi = np.minimum(acc, np.nan_to_num(conf)), np.maximum(acc, np.nan_to_num(conf))
    ax.bar(lo, gap_hi - gap_lo, bottom=gap_lo, width=width, align="edge", color=BAD, alpha=0.3,
           edgecolor=BAD, hatch="//", label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    if calibration.get("bins_calibrated"):
        after = [b for b in calibration["bins_calibrated"] if b["count"]]
        ax.plot([b["confidence"] for b in after], [b["accuracy"] for b in after], "o-", color=VAL_COLOUR,
                label=f"after temperature {calibration['temperature']:.3g} "
                      f"(ECE {calibration['ece_calibrated']:.2%})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.yaxis.set_major_formatter(_percent())
    ax.set_title("Reliability: is a 90% confidence right 90% of the time?", fontsize=11)
    ax.legend(loc="upper left", fontsize=8)
    hist.bar(lo, [b["count"] for b in bins], width=width, align="edge", color="grey", edgecolor="white")
    hist.set_xlabel("confidence (top probability)")
    hist.set_ylabel("images")
    hist.xaxis.set_major_formatter(_percent())
    return _png(fig)


def gallery_indices(ev: Any, count: int = GALLERY_ROWS * GALLERY_COLS) -> tuple[np.ndarray, np.ndarray]:
    """(misclassified, correct) image indices, highest loss first (like fastai's top losses)."""
    order = np.argsort(-ev.losses, kind="stable")
    right = ev.pred[order] == ev.y[order]
    return order[~right][:count], order[right][:count]


def plot_gallery(ev: Any, indices: Sequence[int], title: str) -> bytes:
    """A grid of test images (from the arrays in memory: only those shown are touched), each titled with
    the true class, the prediction and its probability; green when right, red when wrong."""
    fig, ax = _figure("gallery_misclassified.png")
    cells = []
    for i in indices:
        p, t = int(ev.pred[i]), int(ev.y[i])
        ok = p == t
        text = (f"{_short(ev.classes[t])} {ev.probs[i, p]:.0%}" if ok
                else f"true: {_short(ev.classes[t])}\npred: {_short(ev.classes[p])} {ev.probs[i, p]:.0%}")
        cells.append((ev.images[i], text, GOOD if ok else BAD))
    _mosaic(fig, ax, cells, GALLERY_ROWS, GALLERY_COLS, title if len(cells) else f"{title}: none", top=0.9)
    return _png(fig)


def _mosaic(fig, ax, cells: list[tuple[np.ndarray, str, str]], rows: int, cols: int, title: str, *,
            top: float, row_labels: Sequence[str] = ()) -> None:
    """Draw (image, caption, colour) cells as ONE image, captions above each cell (or ``row_labels`` on the
    left): a single imshow is ~10x faster than a grid of subplots, and every training run draws two."""
    left = 0.12 if row_labels else 0.005
    fig.subplots_adjust(left=left, right=0.995, bottom=0.005, top=top)
    fig.suptitle(title, fontsize=13, fontweight="bold")
    ax.set_axis_off()
    s = cells[0][0].shape[0] if cells else 32
    pad = max(1, round(0.4 * s)) if not row_labels else max(1, round(0.08 * s))
    cell_w = s + pad
    if any(text for _, text, _ in cells):
        w_px, h_px = fig.get_size_inches() * fig.dpi * np.array([0.995 - left, top - 0.005])
        cell_h = max(s + 1, round(cell_w * cols * h_px / (rows * w_px)))  # fills the figure, images square
    else:
        cell_h = s + pad
    band = cell_h - s
    canvas = np.full((rows * cell_h, cols * cell_w, 3), 255, np.uint8)
    for k, (img, text, colour) in enumerate(cells[:rows * cols]):
        r, c = divmod(k, cols)
        y0, x0 = r * cell_h + band, c * cell_w + pad // 2
        canvas[y0:y0 + s, x0:x0 + s] = img[:s, :s] if img.shape[2] == 3 else img[:s, :s, :1]
        if text:
            ax.text(x0 + s / 2, y0 - 1, text, ha="center", va="bottom", fontsize=8, color=colour, linespacing=1.1)
    for r, label in enumerate(row_labels):
        ax.text(-pad, r * cell_h + band + s / 2, _short(label, 16), ha="right", va="center", fontsize=10)
    ax.imshow(canvas, interpolation="nearest", aspect="equal" if band == pad else "auto")


def plot_compare(runs: Sequence[dict[str, Any]]) -> bytes:
    """Validation loss and accuracy of several runs, overlaid; each run's best epoch is a dot."""
    fig, axes = _figure("compare.png", ncols=2, layout="constrained")
    colours = _cycle(len(runs))
    for run, colour in zip(runs, colours):
        h = run["history"]
        epochs = [r["epoch"] for r in h]
        for ax, key in ((axes[0], "val_loss"), (axes[1], "val_acc")):
            ax.plot(epochs, [r[key] for r in h], "-", color=colour, label=run["name"], lw=1.8)
            best = run.get("best_epoch")
            if best and 0 < best <= len(h):
                ax.plot([best], [h[best - 1][key]], "o", color=colour, ms=6)
    axes[0].set_title("Validation loss (dot: best epoch)")
    axes[1].set_title("Validation accuracy (dot: best epoch)")
    axes[1].yaxis.set_major_formatter(_percent())
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[1].legend(loc="lower right", fontsize=8)
    return _png(fig)


def plot_class_counts(counts: dict[str, dict[str, int]], classes: Sequence[str]) -> bytes:
    """Images per class, one bar group per split."""
    fig, ax = _figure("class_counts.png", layout="constrained")
    splits = [s for s in ("train", "val", "test", "all") if s in counts]
    width = 0.8 / max(len(splits), 1)
    x = np.arange(len(classes))
    colours = {"train": TRAIN_COLOUR, "val": ACCENT, "test": VAL_COLOUR, "all": TRAIN_COLOUR}
    for k, split in enumerate(splits):
        ax.bar(x + (k - (len(splits) - 1) / 2) * width, [counts[split].get(c, 0) for c in classes], width,
               color=colours[split], label=split)
    tilt = sum(len(c) + 2 for c in classes) > 90  # labels would collide side by side
    ax.set_xticks(x, classes, rotation=45 if tilt else 0, ha="right" if tilt else "center",
                  fontsize=9 if len(classes) <= 30 else 6)
    ax.set_ylabel("images")
    ax.set_title("Images per class")
    ax.legend()
    ax.grid(axis="x", visible=False)
    return _png(fig)


def plot_samples(images: np.ndarray, labels: np.ndarray, classes: Sequence[str], per_class: int = 8,
                 max_classes: int = 10) -> bytes:
    """The first ``per_class`` images of each class (at most ``max_classes`` classes), a row per class."""
    shown = list(range(min(len(classes), max_classes)))
    fig, ax = _figure("samples.png")
    cells = []
    for c in shown:
        idx = np.flatnonzero(labels == c)[:per_class]
        blank = np.full_like(images[0], 255) if len(images) else np.full((32, 32, 3), 255, np.uint8)
        row = [(images[i], "", "black") for i in idx]
        cells += row + [(blank, "", "black")] * (per_class - len(row))
    title = "Samples per class" + (f" (first {max_classes} of {len(classes)} classes)"
                                   if len(classes) > max_classes else "")
    _mosaic(fig, ax, cells, len(shown), per_class, title, top=0.93, row_labels=[classes[c] for c in shown])
    return _png(fig)


def _percent():
    from matplotlib.ticker import PercentFormatter

    return PercentFormatter(1.0, decimals=0)


def _cycle(n: int) -> list:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _short(name: str, limit: int = 12) -> str:
    return name if len(name) <= limit else name[:limit - 1] + "…"


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
            parts.append(f"<p>Best epoch <b>{best}</b> of {len(history)}: {_val_label(info)} loss "
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
            _img(images["gallery_misclassified.png"], "misclassified test images"),
            "<h2 id='correct'>Correctly classified test images</h2>",
            "<p class='muted'>Highest loss first: the right answers it was least sure of.</p>",
            _img(images["gallery_correct.png"], "correctly classified test images")]
    return out


def _img(png: bytes, alt: str) -> str:
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode('ascii')}'>"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
