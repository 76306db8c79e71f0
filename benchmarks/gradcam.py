"""Does Grad-CAM point at what the model uses? Hiding the hottest pixels should hurt more than hiding random ones.

    python benchmarks/gradcam.py runs/my_photos-efficientnet-lite0            # 200 test images
    python benchmarks/gradcam.py runs/NAME --images 0 --share 0.2 --masks 3    # all of them

For each test image of the run (its own split, as ``imgclf evaluate`` sees it): the probability of the class the
model predicts, on the image; with the ``--share`` (20 %) of pixels with the most heat hidden; and with as many
random pixels hidden, scattered and in blobs shaped like a heat map's (seeded, the mean over ``--masks`` masks
each). A hidden pixel takes the normalisation mean
(round(mean * 255) per channel, i.e. 0 after normalisation: no signal). Prints the share of images where hiding
the heat lowers the probability more than hiding random pixels (issue 24's bar: >= 80 % on real photos) and the
mean drops; a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import imgclf
from imgclf.data.run_data import load_run_data, remap_labels
from imgclf.deploy.export import sample_indices

CHUNK = 64  # images explained and scored at a time: memory stays flat on photo-sized test sets


def hottest(heat: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """Flat indices of the ``share`` of pixels with the most heat; ties (an all-zero map) broken at random,
    so that a flat map hides as a random mask would, not the top rows."""
    flat = heat.ravel()
    return np.lexsort((rng.random(flat.size), -flat))[:round(share * flat.size)]


def blobs(side: int, grid: int, share: float, rng: np.random.Generator) -> np.ndarray:
    """Flat indices of the ``share`` of pixels under the hottest part of a random heat map: uniform noise on a
    ``grid`` x ``grid`` map upsampled bilinearly, as Grad-CAM's own maps are. Hidden pixels in blobs, like the heat's,
    but placed at random: scattered single pixels would hurt any model through their texture alone."""
    from PIL import Image

    noise = Image.fromarray(rng.random((grid, grid)).astype(np.float32)).resize((side, side), Image.BILINEAR)
    return hottest(np.asarray(noise), share, rng)


def hide(image: np.ndarray, pixels: np.ndarray, fill: np.ndarray) -> np.ndarray:
    """A copy of (H, W, C) ``image`` with the flat ``pixels`` set to ``fill`` (C,)."""
    out = image.copy()
    out.reshape(-1, image.shape[2])[pixels] = fill
    return out


def measure(clf, images: np.ndarray, share: float, masks: int, seed: int, batch_size: int) -> dict[str, np.ndarray]:
    """Per image: the predicted class, its probability unmasked, heat hidden, random hidden (mean of ``masks``)."""
    rng = np.random.default_rng(seed)
    fill = np.round(np.asarray(clf.preprocess.mean) * 255).astype(np.uint8)
    out: dict[str, list] = {"cls": [], "base": [], "heat": [], "random": [], "blobs": []}
    for start in range(0, len(images), CHUNK):
        part = list(images[start:start + CHUNK])
        explained = clf.explain(part, batch_size=batch_size)
        cls = np.array([clf.classes.index(e.label) for e in explained])
        rows = np.arange(len(part))
        n = part[0].shape[0] * part[0].shape[1]
        hot = [hide(img, hottest(e.heat, share, rng), fill) for img, e in zip(part, explained)]
        rand = [hide(img, rng.choice(n, round(share * n), replace=False), fill) for img in part for _ in range(masks)]
        side = part[0].shape[0]
        grid = max(2, round(side / 32))  # a stride-32 network's last feature map, as Grad-CAM upsamples it
        blob = [hide(img, blobs(side, grid, share, rng), fill) for img in part for _ in range(masks)]
        out["cls"].append(cls)
        out["base"].append(clf.predict_proba(part)[rows, cls])
        out["heat"].append(clf.predict_proba(hot)[rows, cls])
        out["random"].append(clf.predict_proba(rand).reshape(len(part), masks, -1)[rows, :, cls].mean(1))
        out["blobs"].append(clf.predict_proba(blob).reshape(len(part), masks, -1)[rows, :, cls].mean(1))
    return {k: np.concatenate(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a trained run folder or checkpoint")
    ap.add_argument("--images", type=int, default=200, help="test images to use, a seeded sample (0 = all)")
    ap.add_argument("--share", type=float, default=0.2, help="share of the pixels hidden")
    ap.add_argument("--masks", type=int, default=3, help="random masks per image (their drops are averaged)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the image sample and the random masks")
    ap.add_argument("--batch-size", type=int, default=32, help="images per Grad-CAM pass")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    ap.add_argument("--json", type=Path, help="also write the JSON here")
    args = ap.parse_args()

    clf = imgclf.load(args.run, device=args.device)
    ds = load_run_data(clf, None, progress=False)
    idx = sample_indices(len(ds.test.y), args.images, seed=args.seed)
    images = np.asarray(ds.test.x[idx])
    truth = remap_labels(np.asarray(ds.test.y)[idx], ds.classes, clf.classes)
    t0 = time.perf_counter()
    m = measure(clf, images, args.share, args.masks, args.seed, args.batch_size)
    seconds = time.perf_counter() - t0
    drop_heat, drop_random, drop_blobs = m["base"] - m["heat"], m["base"] - m["random"], m["base"] - m["blobs"]
    wins, right = drop_heat > drop_random, m["cls"] == truth
    wins_blobs = drop_heat > drop_blobs
    summary = {
        "run": str(args.run), "model": clf.meta.get("arch", {}).get("name"), "image_size": clf.preprocess.image_size,
        "images": int(len(idx)), "share_hidden": args.share, "random_masks": args.masks, "seed": args.seed,
        "top1": round(float(right.mean()), 4),
        "mean_prob": round(float(m["base"].mean()), 4),
        "mean_drop_heat": round(float(drop_heat.mean()), 4), "mean_drop_random": round(float(drop_random.mean()), 4),
        "mean_drop_blobs": round(float(drop_blobs.mean()), 4),
        "heat_beats_random": round(float(wins.mean()), 4), "heat_beats_blobs": round(float(wins_blobs.mean()), 4),
        "heat_beats_random_correct_only": round(float(wins[right].mean()), 4) if right.any() else None,
        "seconds": round(seconds, 1),
    }
    pct = f"{args.share:.0%}"
    print(f"{summary['model']} ({args.run}), {len(idx)} test images at {summary['image_size']} px, "
          f"top-1 {summary['top1']:.2%}; {seconds:.1f} s")
    print(f"{'':<34}{'mean prob':>10}{'mean drop':>11}")
    print(f"{'as given':<34}{m['base'].mean():>10.3f}{'':>11}")
    print(f"{'hottest ' + pct + ' hidden':<34}{m['heat'].mean():>10.3f}{drop_heat.mean():>11.3f}")
    print(f"{f'random {pct} hidden (mean of {args.masks})':<34}{m['random'].mean():>10.3f}{drop_random.mean():>11.3f}")
    print(f"{f'random {pct} in blobs (mean of {args.masks})':<34}{m['blobs'].mean():>10.3f}{drop_blobs.mean():>11.3f}")
    print(f"hiding the heat hurts more than hiding random pixels on {int(wins.sum())} of {len(wins)} images "
          f"({wins.mean():.1%}; issue 24's bar: >= 80 %), more than random blobs on {int(wins_blobs.sum())} "
          f"({wins_blobs.mean():.1%})")
    if right.any():
        print(f"  on the {int(right.sum())} correctly predicted: {wins[right].mean():.1%}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    sys.exit(main())
