"""`imgclf train --data PHOTO_FOLDER` with no other flags, on a photo-like folder, whole command timed.

    python benchmarks/photo_folder.py [--classes 6] [--per-class 400] [--side 150] [--json out.json]

Issue 7 asks that a folder of a couple of thousand photos of 6 classes at 150 px trains with default flags in
under 15 minutes on a 2-core CPU. No real photo folder is at hand here, so this one is built from the shared
CIFAR-10 JPEG copy: the first ``--classes`` classes, ``--per-class`` images each, upscaled (bicubic) to
about ``--side`` pixels with sizes varied by +-20 % (as phone photos vary), saved as JPEG in bare
``<class>/`` folders (no split: imgclf holds out a seeded 10 % val / 10 % test). Then, as a user types them:

1. ``imgclf train --data FOLDER`` (the photo recipe picks itself), timed from launch to exit;
2. ``imgclf evaluate RUN`` (no ``--data``: the run's own held-out images);
3. ``imgclf predict RUN`` on a few of the photos.

Upscaled 32 px images are blurrier than photos, so the accuracy is a floor, not the issue's figure; the
time is what this measures. Prints a short table and, last, one JSON line. Run it alone.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tomllib
from _photos import CIFAR, cifar_photo_folder


def timed(cmd: list[str], env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return seconds, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=6)
    ap.add_argument("--per-class", type=int, default=400)
    ap.add_argument("--side", type=int, default=150)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not CIFAR.is_file():
        sys.exit(f"{CIFAR} not found: this benchmark reads the shared CIFAR-10 copy")
    imgclf = [sys.executable, "-m", "imgclf"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        env = {**os.environ, "IMGCLF_HOME": str(root / "home")}  # a cold cache, as on a first run
        folder = root / "photos"
        names = cifar_photo_folder(folder, args.classes, {"train": args.per_class}, args.side, jitter=0.2, bare=True)
        n = sum(1 for _ in folder.rglob("*.jpg"))
        train_s, out = timed([*imgclf, "train", "--data", str(folder), "--project", str(root / "runs"),
                              "--name", "photos", "--no-progress"], env)
        print(out, flush=True)
        run = root / "runs" / "photos"
        eval_s, out = timed([*imgclf, "evaluate", str(run), "--json"], env)
        ev = json.loads(out)
        some = sorted((folder / names[0]).glob("*.jpg"))[:3]
        pred_s, out = timed([*imgclf, "predict", str(run), *map(str, some), "--format", "json"], env)
        preds = json.loads(out)
        info = json.loads((run / "run.json").read_text())
        model = tomllib.loads((run / "config.toml").read_text()).get("model")
    report = {
        "benchmark": "photo_folder",
        "data": f"{CIFAR.name}: classes {names}, {n} images ({args.per_class} each), upscaled to "
                f"{args.side}px +-20% JPEG, bare <class>/ folders",
        "command": "imgclf train --data FOLDER", "train_wall_s": round(train_s, 1),
        "model": model, "image_size": info["data"]["image_size"],
        "test_top1_train": info["test_metrics"]["top1"], "evaluate_top1": ev["top1"],
        "evaluate_split": ev.get("split"), "evaluate_n": ev.get("n"), "evaluate_wall_s": round(eval_s, 1),
        "predict_wall_s": round(pred_s, 1), "predicted": [(Path(p["source"]).parent.name, p["top"][0]["class"])
                                                          for p in preds], "cpus": os.cpu_count(),
    }
    print(f"\n{'step':<34}{'seconds':>9}  result")
    print(f"{'imgclf train --data FOLDER':<34}{train_s:>9.0f}  test top-1 {report['test_top1_train']:.2%}")
    print(f"{'imgclf evaluate RUN':<34}{eval_s:>9.0f}  top-1 {ev['top1']:.2%} on {ev.get('n')} held-out images")
    print(f"{'imgclf predict RUN 3 photos':<34}{pred_s:>9.0f}")
    print(json.dumps(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
