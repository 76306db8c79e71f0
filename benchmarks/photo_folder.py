"""`imgclf train --data PHOTOS` as a user types it, the photo recipe now against the recipe before issue 25, in
the same run: test accuracy, whole-command time and where it goes (decoding, features, fine-tuning img/s).

    python benchmarks/photo_folder.py                          # the shared weather photos, seeds 0 and 1
    python benchmarks/photo_folder.py --seeds 0 1 2 3 --variants now before "budget 90s"
    python benchmarks/photo_folder.py --data FOLDER            # any photo folder or archive
    python benchmarks/photo_folder.py --proxy                  # upscaled CIFAR-10, 6 classes x 400 at ~150 px

Each run is a fresh process with a cold cache (its own IMGCLF_HOME), the variants alternated seed by seed, so a
slow spell on a shared machine hits both. ``before`` spells out the settings the photo recipe had before
issue 25 (6 epochs, nothing frozen, full-size crops); ``budget T`` adds ``--time-budget T``. The share of CPU
time the hypervisor took (steal, from /proc/stat) is printed for each run. Phases, read from the run's own
lines as they arrive: "start" is launch to the plan (imports, decoding, the plan's timed steps), "features"
the head-only epoch's feature pass, then the fine-tuning epochs' images/s and the end (evaluation, report).
Run it alone: anything else on the machine skews the times.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _photos import CIFAR, cifar_photo_folder

WEATHER = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "weather-photos.tar.gz"
BEFORE = ["--epochs", "6", "--freeze-blocks", "0", "--progressive", "none"]


def steal() -> tuple[int, int]:
    """(steal ticks, all ticks) of the whole machine so far."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return fields[7], sum(fields)


def run(data: str, seed: int, extra: list[str], root: Path, name: str) -> dict:
    env = {**os.environ, "IMGCLF_HOME": str(root / f"home-{name}")}  # a cold cache, as on a first run
    cmd = [sys.executable, "-m", "imgclf", "train", "--data", data, "--seed", str(seed), "--no-progress",
           "--project", str(root / "runs"), "--name", name, *extra]
    s0, t0 = steal(), time.perf_counter()
    marks, lines = {}, []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        for line in proc.stdout:
            lines.append(line)
            for key in ("plan", "valid", "cache", "test"):
                if line.startswith(key) and key not in marks:
                    marks[key] = time.perf_counter() - t0
    seconds, s1 = time.perf_counter() - t0, steal()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{''.join(lines[-30:])}")
    run_dir = root / "runs" / name
    info = json.loads((run_dir / "run.json").read_text())
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    n = info["data"]["train"]
    tuned = [n / float(r["seconds"]) for r in rows if float(r["seconds"]) > 1]  # not the head-only epoch
    features = re.search(r"features of .* \(([\d.]+)s", "".join(lines))
    return {"seed": seed, "seconds": round(seconds, 1), "test_top1": info["test_metrics"]["top1"],
            "val_top1": float(rows[-1]["val_acc"]), "epochs": len(rows),
            "start_s": round(marks.get("plan", marks.get("valid", 0)), 1),
            "features_s": float(features.group(1)) if features else 0.0,
            "fine_tune_img_s": [round(v) for v in tuned], "end_s": round(seconds - marks.get("test", seconds), 1),
            "plan": info.get("plan"), "steal": round((s1[0] - s0[0]) / max(1, s1[1] - s0[1]), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(WEATHER))
    ap.add_argument("--proxy", action="store_true", help="upscaled CIFAR-10 (6 classes x 400, ~150 px) instead")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--variants", nargs="+", default=["now", "before"])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    extra = {"now": [], "before": BEFORE}
    for v in args.variants:
        if v.startswith("budget "):
            extra[v] = ["--time-budget", v.split()[1]]
        elif v not in extra:
            sys.exit(f"unknown variant {v!r}: now, before or 'budget 90s'")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = args.data
        if args.proxy:
            if not CIFAR.is_file():
                sys.exit(f"{CIFAR} not found: the proxy reads the shared CIFAR-10 copy")
            data = str(root / "photos")
            cifar_photo_folder(Path(data), 6, {"train": 400}, 150, jitter=0.2, bare=True)
        elif not Path(data).exists():
            sys.exit(f"{data} not found: pass --data PHOTOS or --proxy")
        results = {v: [] for v in args.variants}
        for seed in args.seeds:
            order = args.variants if seed % 2 == 0 else args.variants[::-1]  # alternate who goes first
            for v in order:
                r = run(data, seed, extra[v], root, f"{v.replace(' ', '-')}-{seed}")
                results[v].append(r)
                print(json.dumps({"variant": v, **r}), flush=True)
    print(f"\n{data}, {len(args.seeds)} seed(s), {os.cpu_count()} CPUs\n")
    print(f"{'variant':<14}{'test top-1':>11}{'val':>8}{'seconds':>9}{'start':>7}{'features':>9}"
          f"{'fine-tune img/s':>17}{'end':>6}{'steal':>7}")
    for v, rs in results.items():
        mean = {k: statistics.mean(r[k] for r in rs) for k in ("test_top1", "val_top1", "seconds", "start_s",
                                                                "features_s", "end_s", "steal")}
        tuned = [x for r in rs for x in r["fine_tune_img_s"]]
        ips = statistics.median(tuned) if tuned else 0
        print(f"{v:<14}{mean['test_top1']:>11.2%}{mean['val_top1']:>8.2%}{mean['seconds']:>9.0f}"
              f"{mean['start_s']:>7.0f}{mean['features_s']:>9.1f}{ips:>17.0f}{mean['end_s']:>6.0f}"
              f"{mean['steal']:>7.1%}")
    base = results.get("before")
    for v, rs in results.items():
        if base and v != "before":
            ratio = statistics.mean(b["seconds"] for b in base) / statistics.mean(r["seconds"] for r in rs)
            print(f"{v}: {ratio:.2f}x faster than before, whole command")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
