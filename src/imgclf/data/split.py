"""Seeded, stratified carving of a validation or test set out of a labelled set.

    keep, carved = stratified_split(y, 0.1, np.random.default_rng(0))
"""
from __future__ import annotations

import numpy as np


def stratified_split(y: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, carved), both sorted: about ``fraction`` of each class is carved. Every class with
    two or more items gives at least one and keeps at least one, so both sides see every class; a class
    with a single item keeps it."""
    carved = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        k = int(np.floor(fraction * len(idx) + 0.5))
        k = min(max(k, 1), len(idx) - 1) if len(idx) >= 2 and fraction > 0 else 0
        carved.append(rng.permutation(idx)[:k])
    carved_idx = np.sort(np.concatenate(carved)) if carved else np.zeros(0, dtype=np.int64)
    keep = np.setdiff1d(np.arange(len(y)), carved_idx, assume_unique=True)
    return keep, carved_idx
