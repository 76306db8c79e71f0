"""Look at a dataset before training: counts, sizes, modes, imbalance, duplicates, unreadable files.

    info = imgclf.inspect("../shared/datasets/cifar10-jpeg.tar.gz")   # also writes class_counts.png, samples.png
    info["counts"]["train"]["cat"], info["duplicates"]["train_test"]

Counts and pixels come from :func:`~imgclf.data.load_dataset` (so from the decode cache that training
shares); image sizes and modes are read from the file headers (no pixel decoding), since the decoded
arrays are already resized. Duplicates are exact: the same decoded pixels in train and test.
"""
from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ImgclfError
from ..utils import atomic_write_bytes, atomic_write_text

IMBALANCE_RATIO = 1.5   # largest / smallest training class above this: warn


def inspect(data: str, *, out: str | Path | None = None, plots: bool = True, progress: bool = True) -> dict[str, Any]:
    """Summarise ``data`` (anything ``--data`` takes). Writes class_counts.png, samples.png and inspect.json
    into ``out`` (default ``inspect-<dataset name>``) unless ``plots=False``. -> the summary dict:
    classes, counts {split: {class: n}}, totals, image_size/channels (as decoded), sizes and modes (as
    stored), imbalance, duplicates {train_test, examples, within_train}, unreadable, warnings."""
    from ..data import load_dataset

    try:  # the same cache entry as training, when every file is readable
        ds = load_dataset(data, progress=progress)
    except ImgclfError as first:
        try:
            ds = load_dataset(data, skip_bad_images=True, progress=progress)
        except ImgclfError:
            raise first from None
    splits = {name: part for name, part in (("train", ds.train), ("val", ds.val), ("test", ds.test))
              if part is not None}
    counts = {name: {c: int(n) for c, n in zip(ds.classes, np.bincount(p.y, minlength=len(ds.classes)))}
              for name, p in splits.items()}
    sizes, modes = _header_summary(Path(ds.source))
    if not sizes:  # no image files (official binary formats): every image has the decoded size
        total = sum(len(p.y) for p in splits.values())
        sizes, modes = {f"{ds.image_size}x{ds.image_size}": total}, {"RGB" if ds.channels == 3 else "L": total}
    train_counts = counts["train"]
    lo, hi = min(train_counts, key=train_counts.get), max(train_counts, key=train_counts.get)
    ratio = train_counts[hi] / max(train_counts[lo], 1)
    warnings = []
    if ratio > IMBALANCE_RATIO:
        warnings.append(f"class imbalance: {hi} has {train_counts[hi]:,} training images, {lo} only "
                        f"{train_counts[lo]:,} ({ratio:.1f}x); consider class weights or resampling")
    dup = _duplicates(splits)
    if dup["train_test"]:
        warnings.append(f"{dup['train_test']:,} test image(s) also appear in train (identical pixels): the test "
                        "score overstates accuracy on new images")
    if ds.skipped:
        warnings.append(f"{len(ds.skipped):,} unreadable file(s), e.g. {ds.skipped[0]}; train with "
                        "--skip-bad-images or remove them")
    info = {
        "data": ds.source, "name": ds.name, "classes": ds.classes, "counts": counts,
        "totals": {name: int(len(p.y)) for name, p in splits.items()},
        "image_size": ds.image_size, "channels": ds.channels,
        "sizes": sizes, "modes": modes,
        "imbalance": {"largest": hi, "smallest": lo, "ratio": round(ratio, 3)},
        "duplicates": dup, "unreadable": list(ds.skipped), "warnings": warnings,
    }
    if plots:
        from .plots import plot_class_counts, plot_samples

        folder = Path(out) if out is not None else Path(f"inspect-{ds.name}")
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / "class_counts.png", plot_class_counts(counts, ds.classes))
        atomic_write_bytes(folder / "samples.png", plot_samples(ds.train.x, ds.train.y, ds.classes))
        info["files"] = [str(folder / n) for n in ("class_counts.png", "samples.png", "inspect.json")]
        atomic_write_text(folder / "inspect.json", json.dumps(info, indent=2) + "\n")
    return info


def format_inspect(info: dict[str, Any]) -> str:
    """The human-readable table `imgclf inspect` prints."""
    splits = list(info["counts"])
    width = max(len(c) for c in info["classes"] + ["class", "total"])
    lines = [f"{info['data']}: {len(info['classes'])} classes, "
             + ", ".join(f"{info['totals'][s]:,} {s}" for s in splits),
             f"{'class':<{width}}  " + "  ".join(f"{s:>8}" for s in splits)]
    for c in info["classes"]:
        lines.append(f"{c:<{width}}  " + "  ".join(f"{info['counts'][s][c]:>8,}" for s in splits))
    lines.append(f"{'total':<{width}}  " + "  ".join(f"{info['totals'][s]:>8,}" for s in splits))
    size_txt = ", ".join(f"{k} ({v:,})" for k, v in list(info["sizes"].items())[:5]) or "n/a"
    mode_txt = ", ".join(f"{k} ({v:,})" for k, v in info["modes"].items()) or "n/a"
    lines += [f"stored sizes  {size_txt}" + (" ..." if len(info["sizes"]) > 5 else ""),
              f"stored modes  {mode_txt}",
              f"decoded as    {info['image_size']}x{info['image_size']} "
              f"{'RGB' if info['channels'] == 3 else 'greyscale'}",
              f"duplicates    {info['duplicates']['train_test']:,} train/test, "
              f"{info['duplicates']['within_train']:,} within train (identical pixels)",
              f"unreadable    {len(info['unreadable']):,}"]
    lines += [f"warning: {w}" for w in info["warnings"]]
    if info.get("files"):
        lines.append(f"plots in {Path(info['files'][0]).parent}")
    return "\n".join(lines)


def _duplicates(splits: dict[str, Any]) -> dict[str, Any]:
    """Exact pixel duplicates: test (and val) images whose decoded pixels also occur in train."""
    def digests(x: np.ndarray) -> list[bytes]:
        return [hashlib.blake2b(img.tobytes(), digest_size=16).digest() for img in x]

    train = digests(splits["train"].x)
    first_in_train: dict[bytes, int] = {}
    for i, h in enumerate(train):
        first_in_train.setdefault(h, i)
    out: dict[str, Any] = {"within_train": len(train) - len(first_in_train)}
    for name in ("test", "val"):
        if name in splits:
            hits = [(first_in_train[h], j) for j, h in enumerate(digests(splits[name].x)) if h in first_in_train]
            out[f"train_{name}"] = len(hits)
            out[f"examples_{name}"] = [{"train_index": i, f"{name}_index": j} for i, j in hits[:10]]
    out.setdefault("train_test", 0)
    return out


def _header_summary(source: Path) -> tuple[dict[str, int], dict[str, int]]:
    """{"WxH": count} and {mode: count} from the image headers of a folder or archive (most common first).
    Only headers are parsed: Image.open does not decode pixels."""
    from PIL import Image

    from ..data.archives import is_archive, iter_archive
    from ..data.folder import is_image_path, walk

    sizes, modes = Counter(), Counter()

    def add(fp) -> None:
        try:
            with Image.open(fp) as img:
                sizes[f"{img.width}x{img.height}"] += 1
                modes[img.mode] += 1
        except Exception:  # noqa: BLE001 -- unreadable files are counted by the decoder, not here
            return

    if source.is_dir():
        files, _ = walk(source)
        if any(f.endswith("batches.meta") for f in files):
            return {"32x32": 60_000}, {"RGB": 60_000}  # the official CIFAR-10 batches: one size by definition
        for rel in files:
            if is_image_path(rel):
                add(source / rel)
    elif is_archive(source):
        for entry in iter_archive(source):
            if entry.kind == "file" and entry.name.rsplit("/", 1)[-1] == "batches.meta":
                return {"32x32": 60_000}, {"RGB": 60_000}
            if entry.kind == "file" and is_image_path(entry.name):
                add(io.BytesIO(entry.data))
    return dict(sizes.most_common()), dict(modes.most_common())
