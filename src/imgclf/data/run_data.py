"""The images a trained model is judged on again: its run's own dataset, found from the checkpoint's record
(same source, same seeded splits), or other data decoded as the checkpoint expects, with labels matched to
the model's classes by name.

    ds = load_run_data(clf, None, progress=False)          # the run's own splits
    y = remap_labels(ds.test.y, ds.classes, clf.classes)
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ImgclfError
from .dataset import load_dataset


def load_run_data(clf: Any, data: str | None, *, progress: bool):
    """The run's own dataset (same source, same seeded splits) or ``data`` decoded as the checkpoint expects."""
    spec, rec = clf.preprocess, clf.meta.get("data", {})
    if data is not None:
        return load_dataset(data, image_size=spec.image_size, channels=spec.channels, progress=progress)
    if not rec.get("source"):
        raise ImgclfError("this checkpoint does not record its data; pass --data")
    # a built-in dataset is found again by its name, anything else by its path; asked for as training asked
    # (e.g. native size, image_size None), the decoded arrays come from training's cache entry; the images it
    # excluded or relabelled (--exclude, --relabel) are recorded as lists, so an edited CSV changes nothing here
    def load(image_size, channels):
        return load_dataset(rec.get("builtin") or rec["source"], image_size=image_size, channels=channels,
                            val_split=rec.get("val_split", 0.0), test_split=rec.get("test_split", 0.0),
                            seed=rec.get("seed", 0), skip_bad_images=rec.get("skip_bad_images", False),
                            exclude=rec.get("exclude", ()), relabel=rec.get("relabel"), progress=progress)

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
