"""Runs side by side: list the runs of a folder, compare several in one table and one plot.

    imgclf.runs("runs")                                        # -> [summary per run], newest first
    imgclf.compare(["runs/naive", "runs/bn", "runs/bn-aug"])   # writes compare.html + compare.png

Every figure is read from the run folders (run.json, metrics.csv, evaluation.json, the checkpoint's
metadata); nothing is re-scored.
"""
from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from ..errors import ImgclfError
from ..utils import atomic_write_bytes, atomic_write_text


def summarize_run(run_dir: str | Path) -> dict[str, Any]:
    """Headline figures of one run folder (missing ones are None)."""
    from .report import _config_value, _read_json, _read_text, _val_label, read_history

    run_dir = Path(run_dir)
    info = _read_json(run_dir / "run.json")
    if not info:
        raise ImgclfError(f"{run_dir} is not a run folder (no readable run.json); pass folders written by "
                          "`imgclf train`")
    config = _read_text(run_dir / "config.toml")
    history = read_history(run_dir / "metrics.csv")
    evaluation = _read_json(run_dir / "evaluation.json")
    model = _config_value(config, "model")
    test = info.get("test_metrics") or {}
    best = info.get("best_epoch")
    val = [r["val_acc"] for r in history if not math.isnan(r["val_acc"])]
    return {
        "name": run_dir.name, "path": str(run_dir), "status": info.get("status"), "model": model,
        # a pruned run's layers are narrower than its model's registry entry: its own count is in run.json
        "params": (info.get("pruning") or {}).get("params_after") or _params(model, info.get("data", {})),
        "data": info.get("data", {}).get("name"),
        "epochs": len(history), "train_seconds": round(sum(r["seconds"] for r in history), 1),
        "best_epoch": best, "validated_on": _val_label(info),
        "best_val_acc": max(val) if val else None, "final_val_acc": val[-1] if val else None,
        "test_top1": test.get("top1"), "test_loss": test.get("loss"),
        "macro_f1": evaluation.get("macro_f1"), "ece": (evaluation.get("calibration") or {}).get("ece"),
        "history": history,
    }


def runs(folder: str | Path = "runs") -> list[dict[str, Any]]:
    """Every run folder directly under ``folder`` (those holding run.json), newest first, summarised."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImgclfError(f"{folder}: no such folder; pass the folder that holds your runs (default runs/)")
    dirs = sorted((d for d in folder.iterdir() if (d / "run.json").is_file()),
                  key=lambda d: (d / "run.json").stat().st_mtime, reverse=True)
    return [summarize_run(d) for d in dirs]


def compare(run_dirs: list[str | Path], *, out: str | Path | None = None) -> dict[str, Any]:
    """One table of the runs and their validation curves overlaid, written as compare.html and compare.png
    into ``out`` (default: the folder holding the first run). -> {"runs": [summaries], "files": [...]}."""
    from .plots import plot_compare
    from .report import CSS, _img

    if not run_dirs:
        raise ImgclfError("give at least one run folder to compare")
    rows = [summarize_run(d) for d in run_dirs]
    folder = Path(out) if out is not None else Path(run_dirs[0]).resolve().parent
    folder.mkdir(parents=True, exist_ok=True)
    png = plot_compare(rows)
    atomic_write_bytes(folder / "compare.png", png)
    e = html.escape
    table = format_runs(rows).splitlines()
    page = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>imgclf: compare "
            f"{len(rows)} runs</title><style>{CSS}</style></head><body><main>",
            f"<h1>Comparing {len(rows)} runs</h1>", "<h2>Runs</h2><table><tr>"
            + "".join(f"<th>{e(h)}</th>" for h in HEADERS) + "</tr>"]
    for r in rows:
        page.append("<tr>" + "".join(f"<td>{e(v)}</td>" for v in _cells(r)) + "</tr>")
    page += ["</table>", "<h2>Validation curves</h2>", _img(png, "validation loss and accuracy of each run"),
             "<pre>" + e("\n".join(table)) + "</pre></main></body></html>"]
    atomic_write_text(folder / "compare.html", "\n".join(page))
    return {"runs": rows, "files": [str(folder / "compare.html"), str(folder / "compare.png")]}


HEADERS = ("run", "model", "params", "epochs", "train time", "best val acc", "final val acc", "test acc",
           "macro F1")


def format_runs(rows: list[dict[str, Any]]) -> str:
    """Plain-text table of run summaries (`imgclf runs`, `imgclf compare`)."""
    cells = [HEADERS] + [_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADERS))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    if any(r["validated_on"] != "validation" for r in rows):
        lines.append("(val acc of runs without a validation split is measured on their test set)")
    return "\n".join(lines)


def _cells(r: dict[str, Any]) -> tuple[str, ...]:
    def pct(v):
        return "-" if v is None else f"{v:.2%}"
    best = pct(r["best_val_acc"]) + (f" (ep {r['best_epoch']})" if r["best_epoch"] else "")
    return (r["name"], r["model"] or "?", "-" if r["params"] is None else f"{r['params']:,}", str(r["epochs"]),
            f"{r['train_seconds']:.0f} s", best, pct(r["final_val_acc"]), pct(r["test_top1"]),
            "-" if r["macro_f1"] is None else f"{r['macro_f1']:.4f}")


def _params(model: str | None, data: dict[str, Any]) -> int | None:
    from ..models import model_info

    try:
        return model_info(model, num_classes=len(data["classes"]), in_channels=data["channels"],
                          image_size=data["image_size"])["params"]
    except (ImgclfError, KeyError, TypeError):
        return None


def to_json(rows: list[dict[str, Any]]) -> str:
    """Summaries as JSON, without the per-epoch history."""
    return json.dumps([{k: v for k, v in r.items() if k != "history"} for r in rows], indent=2)
