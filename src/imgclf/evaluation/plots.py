"""The plots of a run, as PNG bytes at fixed pixel sizes (:data:`PLOT_SIZES`), headless (matplotlib's Agg
backend), in one style. Nothing here computes a metric: each plot draws numbers it is given.

    png = plot_confusion(m["confusion_matrix"], m["confusion_matrix_normalized"], classes)
"""
from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

DPI = 100


# (width, height) in pixels of every plot file; tests check them, layouts rely on them.
PLOT_SIZES = {
    "curves.png": (1200, 450),
    "confusion_matrix.png": (800, 720),
    "per_class_accuracy.png": (800, 480),
    "reliability.png": (640, 640),
    "gallery_misclassified.png": (1200, 720),
    "gallery_correct.png": (1200, 720),
    "gallery_misclassified_cam.png": (1200, 720),
    "gallery_correct_cam.png": (1200, 720),
    "compare.png": (1200, 450),
    "class_counts.png": (1000, 450),
    "samples.png": (1000, 800),
}


GALLERY_ROWS, GALLERY_COLS = 4, 8


TRAIN_COLOUR, VAL_COLOUR, ACCENT, GOOD, BAD = "#4C72B0", "#DD8452", "#8172B3", "#55A868", "#C44E52"


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


def plot_gallery(ev: Any, indices: Sequence[int], title: str,
                 pictures: Sequence[np.ndarray] | None = None) -> bytes:
    """A grid of test images (from the arrays in memory: only those shown are touched), each titled with
    the true class, the prediction and its probability; green when right, red when wrong. ``pictures``
    (one per index, e.g. heat-map overlays of those images) are drawn in the images' place."""
    fig, ax = _figure("gallery_misclassified.png")
    cells = []
    for k, i in enumerate(indices):
        p, t = int(ev.pred[i]), int(ev.y[i])
        ok = p == t
        text = (f"{_short(ev.classes[t])} {ev.probs[i, p]:.0%}" if ok
                else f"true: {_short(ev.classes[t])}\npred: {_short(ev.classes[p])} {ev.probs[i, p]:.0%}")
        cells.append((ev.images[i] if pictures is None else pictures[k], text, GOOD if ok else BAD))
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
