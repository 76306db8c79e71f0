"""What ``imgclf doctor`` finds in a dataset's embeddings: label issues, near-duplicates, outliers.

    probs = out_of_fold_probs(feats, labels, folds=5, seed=0)      # (N, K), each row from a model not fit on it
    ranked, quality = label_issues(labels, probs)                  # flagged indices, worst first; (N,) scores
    nbrs, sims = neighbours(feats)                                 # (N, 10) nearest images by cosine
    pairs = near_duplicates(nbrs, sims, image)                     # [(i, j, embedding cos, pixel corr)]
    isolated, scores = outliers(feats)                             # the most isolated images, most first

Label issues are confident learning (Northcutt, Jiang & Chuang 2021, "Confident Learning: Estimating Uncertainty
in Dataset Labels", JAIR 70; arXiv 1911.00068) as the cleanlab package implements it: out-of-fold predicted
probabilities, here from a K-fold logistic regression on the frozen backbone's L2-normalised features (no
network is trained K times), go to ``cleanlab.filter.find_label_issues``, and every image gets cleanlab's
label quality score, the out-of-fold probability of its given label ("self-confidence"), which ranks them.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
from PIL import Image

from ..errors import ImgclfError

# Inverse regularisation of the logistic regression: on the weather photos with 5 % of labels flipped, C = 3
# ranks 91-93 % of the flipped ones into the top k, C = 1 89-93 %, C = 0.3 81-85 %, C = 10 no better than 3.
LOGREG_C = 3.0
NEIGHBOURS = 10         # nearest images looked at per image for near-duplicates
# A near-duplicate pair shows the same content (centred embedding cosine at least DUP_EMBEDDING) and the same
# picture (correlation of 8x8 grey thumbnails, as is or mirrored, at least DUP_PIXELS). Either alone is not
# enough: distinct overcast skies reach embedding cosines of 0.94, distinct sunsets thumbnail correlations of
# 0.98. Measured on the weather photos with copies of 30 of them added (benchmarks/README.md): brighter, JPEG
# quality 40, mirrored and half-size copies are found (100, 100, 100, 83 %), 10 %-crops 60 %.
DUP_EMBEDDING = 0.6
DUP_PIXELS = 0.97
THUMB = 8
# An image's outlier score is 1 - its mean cosine to its OUTLIER_NEIGHBOURS nearest images (plain features: centring
# hides them). Off-topic images mixed into the weather photos (10 CIFAR-10, 5 MNIST, noise, flat grey) score no
# higher than the oddest weather photos, so no threshold separates them: the most isolated OUTLIER_SHARE of the
# images are listed to look at (17 added to 1,081: 11 of them among the 17 most isolated, all among the 34 most).
OUTLIER_NEIGHBOURS = 20
OUTLIER_SHARE, OUTLIER_MIN, OUTLIER_MAX = 0.01, 10, 200


def check_folds(labels: np.ndarray, classes: list[str], folds: int) -> None:
    """ImgclfError unless K-fold cross-validation can run: two classes or more, ``folds`` images in each."""
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise ImgclfError(f"--folds must be a whole number of at least 2, not {folds!r}")
    if len(classes) < 2:
        raise ImgclfError(f"doctor needs at least two classes to tell them apart; the data has {len(classes)}")
    counts = np.bincount(labels, minlength=len(classes))
    small = int(np.argmin(counts))
    if counts[small] < folds:
        hint = f"add images or pass --folds {counts[small]}" if counts[small] >= 2 else "add images to it"
        raise ImgclfError(f"doctor's {folds}-fold cross-validation needs at least {folds} images in every class; "
                          f"class {classes[small]!r} has {counts[small]}: {hint}")


def out_of_fold_probs(feats: np.ndarray, labels: np.ndarray, n_classes: int, *, folds: int = 5, seed: int = 0,
                      c: float = LOGREG_C) -> np.ndarray:
    """(N, n_classes) probabilities, each image's from a logistic regression fit on the other folds (stratified,
    seeded) of the L2-normalised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from threadpoolctl import threadpool_limits

    x = _unit(feats)
    probs = np.zeros((len(labels), n_classes))
    # One BLAS thread: the products are small, and threads waiting on each other made a fold on the weather
    # photos 9x slower (2.5 s against 0.28 s on 2 shared cores).
    with threadpool_limits(1, user_api="blas"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a fold that needs more iterations still ranks its images well
        for fit, held in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, labels):
            model = LogisticRegression(C=c, max_iter=2000).fit(x[fit], labels[fit])
            probs[np.ix_(held, model.classes_)] = model.predict_proba(x[held])
    return probs


def label_issues(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """-> (indices cleanlab flags as label issues, most suspicious first; every image's label quality score
    in [0, 1], low = suspicious)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    ranked = find_label_issues(labels, probs, return_indices_ranked_by="self_confidence", n_jobs=1)
    return np.asarray(ranked, np.int64), get_label_quality_scores(labels, probs, method="self_confidence")


def neighbours(feats: np.ndarray, k: int = NEIGHBOURS, *, center: bool = True, block: int = 2048
               ) -> tuple[np.ndarray, np.ndarray]:
    """Each image's ``k`` nearest other images by cosine of the (centred) features, nearest first ->
    (indices (N, k), cosines (N, k)). Centring takes out what every image shares (the backbone's features are
    all positive), which spreads the cosines; blocks of rows keep memory at ``block`` x N."""
    x = _unit(feats - feats.mean(0) if center else feats)
    k = min(k, len(x) - 1)
    idx, sims = np.zeros((len(x), k), np.int64), np.zeros((len(x), k), np.float32)
    for start in range(0, len(x), block):
        s = x[start:start + block] @ x.T
        s[np.arange(len(s)), np.arange(start, start + len(s))] = -np.inf  # not its own neighbour
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(s, part, 1), axis=1)
        idx[start:start + block] = np.take_along_axis(part, order, 1)
        sims[start:start + block] = np.take_along_axis(s, idx[start:start + block], 1)
    return idx, sims


def near_duplicates(idx: np.ndarray, sims: np.ndarray, image: Callable[[int], np.ndarray]
                    ) -> list[tuple[int, int, float, float]]:
    """Pairs (i < j, embedding cosine, thumbnail correlation) among each image's neighbours that pass both
    DUP_EMBEDDING and DUP_PIXELS, most alike first. ``image(i)``: the (S, S, 3) uint8 image embedded."""
    rows, cols = np.nonzero(sims >= DUP_EMBEDDING)
    candidates = {(min(i, j), max(i, j)): float(sims[i, c]) for i, c, j in zip(rows, cols, idx[rows, cols])}
    if not candidates:
        return []
    wanted = sorted({i for pair in candidates for i in pair})
    thumbs = dict(zip(wanted, _thumbs(image, wanted)))
    pairs = []
    for (i, j), cos in candidates.items():
        a, b = thumbs[i], thumbs[j]
        corr = max(float(a @ b), float(a @ b.reshape(THUMB, THUMB)[:, ::-1].ravel()))  # a mirrored copy too
        if corr >= DUP_PIXELS:
            pairs.append((i, j, cos, corr))
    return sorted(pairs, key=lambda p: (-p[3], -p[2], p[0], p[1]))


def outliers(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """-> (the most isolated OUTLIER_SHARE of the images (at least OUTLIER_MIN, at most OUTLIER_MAX), most
    isolated first; every image's score, 1 - mean cosine to its OUTLIER_NEIGHBOURS nearest)."""
    _, sims = neighbours(feats, OUTLIER_NEIGHBOURS, center=False)
    scores = 1.0 - sims.mean(1)
    n = min(len(scores), OUTLIER_MAX, max(OUTLIER_MIN, round(OUTLIER_SHARE * len(scores))))
    return np.argsort(-scores, kind="stable")[:n], scores


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _thumbs(image: Callable[[int], np.ndarray], wanted: list[int]) -> np.ndarray:
    """THUMB x THUMB grey thumbnails of the images at ``wanted``, zero-mean and unit-length (so a dot product
    is their correlation, blind to brightness and contrast)."""
    out = np.zeros((len(wanted), THUMB * THUMB), np.float64)
    for n, i in enumerate(wanted):
        grey = Image.fromarray(image(i)).convert("L")
        out[n] = np.asarray(grey.resize((THUMB, THUMB), Image.BOX), np.float64).ravel()
    out -= out.mean(1, keepdims=True)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
