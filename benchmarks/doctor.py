"""`imgclf doctor` against labels we flipped ourselves: does it rank the flipped images first, and how fast?

    python benchmarks/doctor.py                          # the shared weather photos, 5 % flipped, seeds 0 1 2
    python benchmarks/doctor.py --data FOLDER --flip 0.1 --seeds 0
    python benchmarks/doctor.py --duplicates             # + copies of 30 photos: near-duplicates found?

For each seed the photos are copied into a temporary folder and a seeded 5 % of them moved into another class's
folder (a wrong label). `doctor` then runs in a fresh process with a cold cache (its own IMGCLF_HOME), as a
user's first run would: decoding, embeddings, the K-fold regression and the page. Printed per seed: recall
at k (k = the number flipped: how many of the k most suspicious images, by cleanlab's label quality score, are
flipped ones), the precision and recall of the images cleanlab flags, the whole command's seconds (and the
machine's 1-minute load average at its end: other work on a 2-core machine slows it).
``--duplicates`` adds 30 photos again as altered copies (half size + JPEG quality 60, 10 % crop, mirrored,
brighter, quality 40: 6 each) and reports how many of the pairs doctor.csv names.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageEnhance

WEATHER = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "weather-photos.tar.gz"
ALTERATIONS = ("half_q60", "crop10", "mirror", "bright", "q40")


def extract(data: Path, root: Path) -> Path:
    """A folder of class folders from ``data`` (a folder, or the shared .tar.gz)."""
    if data.is_dir():
        shutil.copytree(data, root / "photos")
        return root / "photos"
    with tarfile.open(data) as tf:
        tf.extractall(root / "photos", filter="data")
    inner = [p for p in (root / "photos").iterdir() if p.is_dir()]
    return inner[0] if len(inner) == 1 and all(q.is_dir() for q in inner[0].iterdir()) else root / "photos"


def flip_labels(folder: Path, share: float, seed: int) -> set[str]:
    """Move a seeded ``share`` of the images into another class's folder; -> their new relative paths."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    files = sorted(p for c in classes for p in (folder / c).iterdir() if p.is_file())
    rng = random.Random(seed)
    moved = set()
    for p in rng.sample(files, round(share * len(files))):
        wrong = rng.choice([c for c in classes if c != p.parent.name])
        target = folder / wrong / f"flipped-{p.name}"
        p.rename(target)
        moved.add(target.relative_to(folder).as_posix())
    return moved


def add_copies(folder: Path, n: int, seed: int) -> dict[str, str]:
    """Altered copies of ``n`` seeded photos beside them; -> {copy: original} (relative paths)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("flipped-"))
    rng = random.Random(seed + 1000)
    pairs = {}
    for k, p in enumerate(rng.sample(files, n)):
        img = Image.open(p).convert("RGB")
        w, h = img.size
        kind = ALTERATIONS[k % len(ALTERATIONS)]
        quality = {"half_q60": 60, "q40": 40}.get(kind, 85)
        if kind == "half_q60":
            img = img.resize((max(1, w // 2), max(1, h // 2)))
        elif kind == "crop10":
            img = img.crop((w // 20, h // 20, w - w // 20, h - h // 20))
        elif kind == "mirror":
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        elif kind == "bright":
            img = ImageEnhance.Brightness(img).enhance(1.2)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        copy = p.with_name(f"copy-{kind}-{p.stem}.jpg")
        copy.write_bytes(buf.getvalue())
        pairs[copy.relative_to(folder).as_posix()] = p.relative_to(folder).as_posix()
    return pairs


RANK = """
import json, sys
from imgclf.evaluation.doctor import doctor
size = {"image_size": int(sys.argv[3])} if len(sys.argv) > 3 else {}
r = doctor(sys.argv[1], out=sys.argv[2], progress=False, **size)
order = sorted(range(len(r.paths)), key=lambda i: r.quality[i])
print(json.dumps({"ranked": [r.paths[i] for i in order], "flagged": [r.paths[i] for i in r.issues],
                  "accuracy": r.accuracy, "seconds": r.seconds, "phases": r.phases}))
"""


def run(folder: Path, root: Path, image_size: int | None = None) -> tuple[dict, float]:
    env = {**os.environ, "IMGCLF_HOME": str(root / "home")}  # a cold cache, as on a first run
    t0 = time.perf_counter()
    size = [str(image_size)] if image_size else []
    proc = subprocess.run([sys.executable, "-c", RANK, str(folder), str(root / "out"), *size], env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"doctor failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.splitlines()[-1]), seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=WEATHER)
    ap.add_argument("--flip", type=float, default=0.05)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--duplicates", action="store_true")
    ap.add_argument("--image-size", type=int, help="side doctor embeds at (default: doctor's own)")
    args = ap.parse_args()
    rows = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            folder = extract(args.data, root)
            flipped = flip_labels(folder, args.flip, seed)
            copies = add_copies(folder, 30, seed) if args.duplicates else {}
            result, seconds = run(folder, root, args.image_size)
            k = len(flipped)
            found = set(result["ranked"][:k]) & flipped
            flagged = set(result["flagged"])
            row = {"seed": seed, "images": len(result["ranked"]), "flipped": k,
                   "recall_at_k": round(len(found) / k, 4),
                   "flagged": len(flagged),
                   "flagged_precision": round(len(flagged & flipped) / max(1, len(flagged)), 4),
                   "flagged_recall": round(len(flagged & flipped) / k, 4),
                   "oof_accuracy": round(result["accuracy"], 4), "doctor_s": round(result["seconds"], 1),
                   "phases_s": {k: round(v, 1) for k, v in result["phases"].items()},
                   "command_s": round(seconds, 1), "load_avg_1m": round(os.getloadavg()[0], 2)}
            if copies:
                named = {(r["path"], r["detail"]) for r in csv.DictReader((root / "out" / "doctor.csv").open())
                         if "duplicate" in r["issue"]}
                hit = {c for c, o in copies.items()
                       if any((p == c and o in d) or (p == o and c in d) for p, d in named)}
                row["copies_found"] = {kind: sum(c in hit for c in copies if f"copy-{kind}-" in c)
                                       for kind in ALTERATIONS}
            rows.append(row)
            print(json.dumps(row), flush=True)
    mean = sum(r["recall_at_k"] for r in rows) / len(rows)
    each = ", ".join(f"{r['recall_at_k']:.1%}" for r in rows)
    times = ", ".join(str(r["command_s"]) for r in rows)
    print(f"recall at k: mean {mean:.1%} over seeds {args.seeds} ({each}); whole command {times} s")
    print(json.dumps({"rows": rows, "mean_recall_at_k": round(mean, 4)}))


if __name__ == "__main__":
    main()
