"""Corrections a person made to a dataset, fed back to training: images to leave out, images to move to
another class. One CSV format for both, the one ``imgclf doctor`` writes:

    path,split,given,suggested,confidence,issue,detail,action
    cloudy/cloudy12.jpg,all,cloudy,shine,0.93,label,,relabel      # -> class "shine" (the suggested column)
    rain/rain146.jpg,all,rain,rain,0.99,duplicate,same as rain/rain153.jpg,exclude

    exclude = read_edits("doctor.csv", "exclude")      # ["rain/rain146.jpg"]
    relabel = read_edits("doctor.csv", "relabel")      # {"cloudy/cloudy12.jpg": "shine"}
    decoded, counts = apply_edits(decoded, exclude, relabel, where="photos/")

``path`` names an image as the data names it: its path relative to the data folder, an archive's member name,
or ``<split>/<index>`` for the official formats. Only the ``path`` column is required: a list without an
``action`` column excludes (or relabels) every row. The edits are applied after the decode cache, as the
val/test fractions are, so the cache stays what it is and changing the list costs no decoding.
"""
from __future__ import annotations

import csv
from collections.abc import Collection, Mapping
from pathlib import Path

import numpy as np

from ..errors import ImgclfError
from .decoded import Decoded, split_names

COLUMNS = ("path", "split", "given", "suggested", "confidence", "issue", "detail", "action")
ACTIONS = ("keep", "exclude", "relabel")


def read_edits(path: str | Path, action: str) -> list[str] | dict[str, str]:
    """The rows of the CSV at ``path`` whose action is ``action`` ("exclude" -> their paths; "relabel" ->
    {path: the class in the suggested column}); every row when the file has no action column."""
    if action not in ("exclude", "relabel"):
        raise ValueError(f"action must be exclude or relabel, not {action!r}")
    rows = _read_rows(Path(path), need=("path", "suggested") if action == "relabel" else ("path",))
    chosen = [r for r in rows if r.get("action") in (None, action)]
    if action == "exclude":
        return list(dict.fromkeys(r["path"] for r in chosen))
    out: dict[str, str] = {}
    for r in chosen:
        if not r["suggested"]:
            raise ImgclfError(f"{path} line {r['line']}: {r['path']} is to be relabelled but its suggested "
                              "column is empty; write the class it belongs to there")
        if out.setdefault(r["path"], r["suggested"]) != r["suggested"]:
            raise ImgclfError(f"{path}: {r['path']} is relabelled to both {out[r['path']]} and {r['suggested']}")
    return out


def _read_rows(path: Path, need: tuple[str, ...]) -> list[dict]:
    try:
        # utf-8-sig: a spreadsheet saving CSV as UTF-8 starts it with a byte-order mark
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            header = [h.strip().lower() for h in reader.fieldnames or []]
            missing = [c for c in need if c not in header]
            if missing:
                raise ImgclfError(f"{path} has no {' or '.join(missing)} column (its header: {', '.join(header)}); "
                                  f"write a CSV with the columns {', '.join(COLUMNS)} as `imgclf doctor` does")
            reader.fieldnames = header
            rows = []
            for r in reader:
                row = {k: (v or "").strip() for k, v in r.items() if k is not None}
                row["line"] = reader.line_num
                if not any(row.get(c) for c in header):
                    continue  # a blank line a person left
                if not row["path"]:
                    raise ImgclfError(f"{path} line {reader.line_num}: the path column is empty")
                if "action" in header:
                    row["action"] = row["action"].lower() or "keep"
                    if row["action"] not in ACTIONS:
                        raise ImgclfError(f"{path} line {reader.line_num}: action {row['action']!r} is not one of "
                                          f"{', '.join(ACTIONS)} (empty means keep)")
                rows.append(row)
            return rows
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ImgclfError(f"cannot read {path} as a CSV list of images: {e}") from None


def apply_edits(decoded: Decoded, exclude: Collection[str], relabel: Mapping[str, str], *, where: str
                ) -> tuple[Decoded, dict[str, int]]:
    """``decoded`` without the ``exclude`` images and with the ``relabel`` ones moved to their new class ->
    (Decoded, {"excluded": n, "relabelled": n}). ImgclfError for a path the data does not have, a class it
    does not have, or a class left with no training images."""
    exclude, relabel = set(exclude), dict(relabel)
    if not exclude and not relabel:
        return decoded, {"excluded": 0, "relabelled": 0}
    both = sorted(exclude & set(relabel))
    if both:
        raise ImgclfError(f"{len(both)} image(s) are both excluded and relabelled, e.g. {both[0]}; keep one action")
    index = {c: i for i, c in enumerate(decoded.classes)}
    unknown = sorted({c for c in relabel.values() if c not in index})
    if unknown:
        raise ImgclfError(f"cannot relabel to {', '.join(map(repr, unknown[:3]))}: not a class of {where} (its "
                          f"classes: {', '.join(decoded.classes[:20])})")
    names = {split: split_names(decoded, split) for split in decoded.splits}
    known = {n for split_list in names.values() for n in split_list} | set(decoded.skipped)
    missing = sorted((exclude | set(relabel)) - known)
    if missing:
        raise ImgclfError(f"{len(missing)} image(s) listed are not in {where}: {', '.join(missing[:3])}"
                          f"{' ...' if len(missing) > 3 else ''}; paths are relative to the data folder (or archive "
                          "member names), as `imgclf doctor` writes them")
    splits, kept_names, moved = {}, {}, 0
    for split, (x, y) in decoded.splits.items():
        y = np.array(y, dtype=np.int64)
        for i, name in enumerate(names[split]):
            if name in relabel:
                new = index[relabel[name]]
                moved += int(new != y[i])
                y[i] = new
        keep = np.array([n not in exclude for n in names[split]], dtype=bool)
        splits[split] = (x.select(np.flatnonzero(keep)), y[keep])
        kept_names[split] = [n for n, k in zip(names[split], keep) if k]
    main = "train" if "train" in splits else "all"
    empty = [c for c, n in zip(decoded.classes, np.bincount(splits[main][1], minlength=len(index))) if n == 0]
    if empty:
        kind = "training images" if main == "train" else "images"
        raise ImgclfError(f"class {empty[0]!r} of {where} has no {kind} left after the exclusions and relabels; "
                          "keep some or remove its folder")
    excluded = sum(len(decoded.splits[s][1]) - len(splits[s][1]) for s in splits)
    return (Decoded(decoded.classes, decoded.channels, decoded.image_size, splits, skipped=decoded.skipped,
                    names=kept_names), {"excluded": excluded, "relabelled": moved})
