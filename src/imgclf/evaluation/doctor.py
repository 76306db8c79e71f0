"""``imgclf doctor DATA``: images whose label looks wrong, near-duplicates (within and across splits), outliers;
a page to look at them and a CSV to act on them.

    report = imgclf.evaluation.doctor.doctor("photos/")      # writes doctor/photos/doctor.html and doctor.csv
    report.paths[report.issues[0]], report.suggested[report.issues[0]]

Every image the data holds is looked at once, whatever its split (a ``<class>/*`` folder's images are one split,
"all"), decoded by the project's loader at ``image_size`` (a cache entry of its own), embedded by the ImageNet
backbone (embeddings.py), then judged from the embeddings alone (issues.py): nothing is trained but a K-fold
logistic regression. A person marks rows of doctor.csv ``exclude`` or ``relabel`` and trains again with
``imgclf train --data DATA --exclude doctor.csv --relabel doctor.csv`` (see imgclf.data.edits).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.dataset import load_decoded
from ..data.decoded import split_names
from .embeddings import BACKBONE, DEFAULT_SIZE, embed_cached
from .issues import check_folds, label_issues, near_duplicates, neighbours, out_of_fold_probs, outliers

SPLIT_ORDER = ("train", "val", "test", "all")  # a duplicate pair's copy is the member in the later split


@dataclass
class DoctorReport:
    data: str                       # the source, as load_dataset resolved it
    name: str
    classes: list[str]
    paths: list[str]                # each image's name in the data: relative path or archive member name
    splits: list[str]               # each image's stored split: train, val, test, or all
    labels: np.ndarray              # (N,) given class indices
    probs: np.ndarray               # (N, K) out-of-fold probabilities
    quality: np.ndarray             # (N,) label quality (the given label's out-of-fold probability)
    issues: np.ndarray              # indices flagged as label issues, most suspicious first
    duplicates: list[tuple[int, int, float, float]]  # (i, j, embedding cosine, thumbnail correlation)
    outliers: np.ndarray            # the most isolated images' indices, most isolated first
    outlier_scores: np.ndarray      # (N,)
    folds: int
    image_size: int
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)  # seconds: decode, embeddings, labels, neighbours, files
    files: list[str] = field(default_factory=list)

    @property
    def suggested(self) -> np.ndarray:
        return self.probs.argmax(1)

    @property
    def confidence(self) -> np.ndarray:
        return self.probs.max(1)

    @property
    def accuracy(self) -> float:
        """Out-of-fold accuracy against the given labels: how well the embeddings separate the classes."""
        return float((self.suggested == self.labels).mean())

    def copy_of(self, i: int, j: int) -> tuple[int, int]:
        """(the copy, the original) of a duplicate pair: the member in the later split, else the later one."""
        rank_i, rank_j = SPLIT_ORDER.index(self.splits[i]), SPLIT_ORDER.index(self.splits[j])
        return (i, j) if (rank_i, i) > (rank_j, j) else (j, i)


def doctor(data: str, *, out: str | Path | None = None, folds: int = 5, image_size: int = DEFAULT_SIZE,
           seed: int = 0, skip_bad_images: bool = False, progress: bool = True, write: bool = True) -> DoctorReport:
    """Find label issues, near-duplicates and outliers in ``data`` (anything ``--data`` takes). Writes
    doctor.html and doctor.csv into ``out`` (default ``doctor/<data name>``) unless ``write=False``."""
    started = time.monotonic()
    phases: dict[str, float] = {}

    def lap(phase: str) -> None:
        phases[phase] = time.monotonic() - started - sum(phases.values())

    name, source, decoded = load_decoded(data, image_size=image_size, channels=3, skip_bad_images=skip_bad_images,
                                         progress=progress)
    parts = [s for s in SPLIT_ORDER if s in decoded.splits]
    labels = np.concatenate([decoded.splits[s][1] for s in parts]).astype(np.int64)
    check_folds(labels, decoded.classes, folds)
    images = _Images([decoded.splits[s][0] for s in parts])
    lap("decode")
    feats = embed_cached([decoded.splits[s][0] for s in parts], progress=progress)
    lap("embeddings")
    probs = out_of_fold_probs(feats, labels, len(decoded.classes), folds=folds, seed=seed)
    ranked, quality = label_issues(labels, probs)
    lap("labels")
    nbr_idx, nbr_sims = neighbours(feats)
    far, far_scores = outliers(feats)
    duplicates = near_duplicates(nbr_idx, nbr_sims, images.get)
    lap("neighbours")
    report = DoctorReport(
        data=str(source), name=name, classes=list(decoded.classes),
        paths=[n for s in parts for n in split_names(decoded, s)],
        splits=[s for s in parts for _ in range(len(decoded.splits[s][1]))], labels=labels, probs=probs,
        quality=quality, issues=ranked, duplicates=duplicates, outliers=far, outlier_scores=far_scores, folds=folds,
        image_size=decoded.image_size, phases=phases)
    if write:
        from .doctor_page import write_csv, write_html

        folder = Path(out) if out is not None else Path("doctor") / name
        folder.mkdir(parents=True, exist_ok=True)
        report.seconds = time.monotonic() - started  # the page states it
        report.files = [str(write_html(report, images.get, folder / "doctor.html")),
                        str(write_csv(report, folder / "doctor.csv"))]
        lap("files")
    report.seconds = time.monotonic() - started
    return report


def format_doctor(r: DoctorReport, top: int = 5) -> str:
    """The summary `imgclf doctor` prints: counts, the most suspicious images, where the files are, the time."""
    counts = ", ".join(f"{r.splits.count(part):,} {part}" for part in SPLIT_ORDER if part in r.splits)
    across = sum(r.splits[i] != r.splits[j] for i, j, _, _ in r.duplicates)
    lines = [f"{r.data}: {len(r.paths):,} images ({counts}), {len(r.classes)} classes; {BACKBONE} ImageNet "
             f"embeddings at {r.image_size} px, {r.folds}-fold logistic regression: out-of-fold accuracy "
             f"{r.accuracy:.1%}",
             f"label issues     {len(r.issues):,} (cleanlab find_label_issues; most suspicious first)"]
    width = max([len(r.paths[i]) for i in r.issues[:top]] + [0])
    for i in r.issues[:top]:
        lines.append(f"  {r.paths[i]:<{width}}  given {r.classes[r.labels[i]]}, looks like "
                     f"{r.classes[r.suggested[i]]} ({r.confidence[i]:.0%})")
    lines.append(f"near-duplicates  {len(r.duplicates):,} pair(s), {across:,} across splits")
    for i, j, _, _ in sorted(r.duplicates, key=lambda p: r.splits[p[0]] == r.splits[p[1]])[:min(top, 3)]:
        lines.append(f"  {r.paths[i]} ({r.splits[i]})  ~  {r.paths[j]} ({r.splits[j]})")
    lines.append(f"outliers         the {len(r.outliers):,} most isolated images, e.g. "
                 + ", ".join(r.paths[i] for i in r.outliers[:3]))
    if r.files:
        csv_path = r.files[-1]
        lines += [f"written {', '.join(r.files)}",
                  f"mark rows of {csv_path} exclude or relabel (to its suggested class), then: imgclf train --data "
                  f"{r.data} --exclude {csv_path} --relabel {csv_path}"]
    lines.append(f"took {r.seconds:.1f} s (" + ", ".join(f"{k} {v:.1f} s" for k, v in r.phases.items()) + ")")
    return "\n".join(lines)


class _Images:
    """The stored splits' images as one sequence, in SPLIT_ORDER, one image at a time."""

    def __init__(self, parts):
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])

    def get(self, i: int) -> np.ndarray:
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return np.asarray(self.parts[k][i - self.starts[k]])
