"""doctor.csv and doctor.html: what ``imgclf doctor`` found, to act on and to look at.

doctor.csv has a row for each image found (label issue, near-duplicate copy, outlier), in the columns of
:data:`imgclf.data.edits.COLUMNS`, most suspicious label issues first; its ``action`` column says ``keep``
until a person writes ``exclude`` or ``relabel`` (to the class in ``suggested``, which they may change), and
``imgclf train --exclude/--relabel`` read it back. doctor.html shows the same images as thumbnails (inline
base64 JPEG: the page is one file) with given and suggested labels, the duplicate pairs side by side.
"""
from __future__ import annotations

import base64
import csv
import html
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from .._version import __version__
from ..data.edits import COLUMNS
from ..utils import atomic_write_text

THUMB_SIDE = 128     # thumbnails on the page, px
MAX_CARDS = 300      # per section; the CSV lists every image found


def csv_rows(r) -> list[dict[str, str]]:
    """One row per image found, label issues first (most suspicious first), then duplicate copies, then
    outliers; an image found twice gets one row naming both issues."""
    rows: dict[int, dict[str, str]] = {}

    def add(i: int, issue: str, detail: str) -> None:
        row = rows.setdefault(i, {"path": r.paths[i], "split": r.splits[i], "given": r.classes[r.labels[i]],
                                  "suggested": r.classes[r.suggested[i]], "confidence": f"{r.confidence[i]:.3f}",
                                  "issue": "", "detail": "", "action": "keep"})
        row["issue"] = ";".join(filter(None, (row["issue"], issue)))
        row["detail"] = "; ".join(filter(None, (row["detail"], detail)))

    for i in r.issues:
        add(int(i), "label", f"given label's probability {r.quality[i]:.3f}")
    for i, j, cos, corr in r.duplicates:
        copy, original = r.copy_of(i, j)
        add(copy, "duplicate", f"near-duplicate of {r.paths[original]} ({r.splits[original]}; embedding {cos:.2f}, "
                               f"pixels {corr:.3f})")
    for i in r.outliers:
        add(int(i), "outlier", f"outlier score {r.outlier_scores[i]:.3f}")
    return list(rows.values())


def write_csv(r, path: Path) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(csv_rows(r))
    atomic_write_text(path, buf.getvalue())
    return path


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
main{max-width:1180px;margin:0 auto;padding:24px}
h1{margin:0 0 4px}h2{margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub,.muted{color:#666;font-size:14px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:12px}
.card{background:#fff;border:1px solid #e3e3e3;border-radius:6px;padding:8px;font-size:12px;overflow-wrap:anywhere}
.card img{width:100%;border-radius:4px;display:block;margin-bottom:4px}
.pairs{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:12px}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:6px}
.across{border-color:#C44E52}
.bad{color:#C44E52;font-weight:600}.good{color:#2a7d3f;font-weight:600}
pre{background:#f3f4f6;padding:10px 14px;white-space:pre-wrap;font-size:13px;border-radius:6px}
"""


def write_html(r, image: Callable[[int], np.ndarray], path: Path) -> Path:
    """The page: label issues, near-duplicate pairs, outliers, each with thumbnails; how to act on them."""
    e = html.escape
    across = [p for p in r.duplicates if r.splits[p[0]] != r.splits[p[1]]]
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{e(r.name)}: imgclf doctor</title>",
             f"<meta name='viewport' content='width=device-width, initial-scale=1'><style>{CSS}</style></head>"
             f"<body><main><h1>{e(r.name)}: doctor</h1>",
             f"<p class='sub'>{e(r.data)} &middot; {len(r.paths):,} images, {len(r.classes)} classes &middot; "
             f"{len(r.issues):,} label issues, {len(r.duplicates):,} near-duplicate pairs ({len(across):,} across "
             f"splits), {len(r.outliers):,} outliers &middot; {r.seconds:.0f} s</p>",
             f"<p class='muted'>Out-of-fold probabilities from a {r.folds}-fold logistic regression on ImageNet "
             f"EfficientNet-Lite0 embeddings at {r.image_size} px (out-of-fold accuracy {r.accuracy:.1%}); label "
             "issues by confident learning (cleanlab's find_label_issues), most suspicious first: the lowest "
             "probability of the given label.</p>"]

    parts.append(f"<h2 id='labels'>Label issues ({len(r.issues):,})</h2><div class='grid'>")
    for i in r.issues[:MAX_CARDS]:
        parts.append(_card(r, image, int(i), f"given <span class='bad'>{e(r.classes[r.labels[i]])}</span> "
                           f"({r.quality[i]:.0%})<br>looks like <span class='good'>{e(r.classes[r.suggested[i]])}"
                           f"</span> ({r.confidence[i]:.0%})"))
    parts.append("</div>" + _more(len(r.issues)))

    parts.append(f"<h2 id='duplicates'>Near-duplicates ({len(r.duplicates):,} pairs, {len(across):,} across splits)"
                 "</h2><p class='muted'>Same content (embedding cosine) and the same picture (8x8 thumbnail "
                 "correlation, mirrored too); pairs across splits first, outlined in red: a test image that is "
                 "also in train makes the test score too kind.</p><div class='pairs'>")
    for i, j, cos, corr in sorted(r.duplicates, key=lambda p: r.splits[p[0]] == r.splits[p[1]])[:MAX_CARDS]:
        kind = " across" if r.splits[i] != r.splits[j] else ""
        parts.append(f"<div class='card{kind}'><div class='pair'>{_thumb(image, i)}{_thumb(image, j)}</div>"
                     f"{e(r.paths[i])} ({e(r.splits[i])}, {e(r.classes[r.labels[i]])})<br>{e(r.paths[j])} "
                     f"({e(r.splits[j])}, {e(r.classes[r.labels[j]])})<br>embedding {cos:.2f}, pixels {corr:.3f}</div>")
    parts.append("</div>" + _more(len(r.duplicates)))

    parts.append(f"<h2 id='outliers'>Outliers ({len(r.outliers):,})</h2><p class='muted'>The images farthest from "
                 "the others (1 - mean cosine to the 20 nearest), most isolated first: off-topic, broken or merely "
                 "rare pictures; a rare one may be worth more photos like it.</p><div class='grid'>")
    for i in r.outliers[:MAX_CARDS]:
        parts.append(_card(r, image, int(i), f"{e(r.classes[r.labels[i]])}, score {r.outlier_scores[i]:.3f}"))
    parts.append("</div>" + _more(len(r.outliers)))

    csv_path = path.with_name("doctor.csv")
    parts.append("<h2 id='act'>Acting on it</h2><p>Every image above has a row in doctor.csv. Write "
                 "<code>exclude</code> or <code>relabel</code> in its <code>action</code> column (relabel moves it "
                 "to the class in <code>suggested</code>, which you may change), then train again:</p>"
                 f"<pre>{e(f'imgclf train --data {r.data} --exclude {csv_path} --relabel {csv_path}')}</pre>"
                 f"<p class='muted'>imgclf {__version__}</p></main></body></html>")
    atomic_write_text(path, "\n".join(parts))
    return path


def _card(r, image, i: int, text: str) -> str:
    return (f"<div class='card'>{_thumb(image, i)}<b>{html.escape(r.paths[i])}</b> "
            f"<span class='muted'>{html.escape(r.splits[i])}</span><br>{text}</div>")


def _thumb(image, i: int) -> str:
    buf = io.BytesIO()
    img = Image.fromarray(image(i))
    img.resize((THUMB_SIDE, THUMB_SIDE), Image.BILINEAR).save(buf, "JPEG", quality=80)
    return f"<img alt='' src='data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode('ascii')}'>"


def _more(n: int) -> str:
    return f"<p class='muted'>{n - MAX_CARDS:,} more in doctor.csv.</p>" if n > MAX_CARDS else ""
