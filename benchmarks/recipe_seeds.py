"""The fast recipe's CIFAR-10 accuracy over many seeds, recipe variants side by side, and the yardstick's.

    python benchmarks/recipe_seeds.py --device cuda --seeds 16 --variant base --variant lr24:lr=0.24
    python benchmarks/recipe_seeds.py --device cuda --seeds 16 --yardstick     # + airbench94_muon, moved to the GPU

One run of a recipe is one draw: over seeds, the fast recipe's test accuracy with TTA spreads by ~0.17 points
(standard deviation), as much as most recipe changes move it. So recipe choices are made on means over seeds,
with the same seeds for every variant (a paired comparison). That needs a GPU: a CIFAR-10 run takes ~17 min on
2 CPU cores, 10-20 s on an H100 with several runs sharing it.

A variant is ``NAME`` (the recipe as it is) or ``NAME:key=value,key=value`` with settings of ``imgclf.train``
(the fields of TrainConfig: lr, epochs, batch_size, label_smoothing, ...). Runs go to ``--workers`` processes
sharing the device: this small net leaves a GPU mostly idle, so 4-8 workers multiply the throughput (the
accuracy of a run does not depend on it). ``--yardstick`` also runs ``../shared/reference/airbench94_cpu.py``
for as many seeds, on the same device, changed only to put its tensors and bf16 autocast there.

Prints, per variant: mean, spread and range of top-1 and of top-1 with TTA, the mean paired difference from
the first variant and how many seeds got better / worse, how many seeds reached ``--bar`` (default: the
yardstick's deterministic CPU figure, 90.66 % with TTA); then one JSON line.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CIFAR = SHARED / "datasets" / "cifar10-jpeg.tar.gz"
YARDSTICK = SHARED / "reference" / "airbench94_cpu.py"


def parse_variant(text: str) -> tuple[str, dict]:
    """``lr20:lr=0.2,epochs=9`` -> ("lr20", {"lr": 0.2, "epochs": 9})."""
    name, _, spec = text.partition(":")
    settings = {}
    for item in filter(None, spec.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"variant {text!r}: write settings as key=value, got {item!r}")
        try:
            settings[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            settings[key.strip()] = value  # a string, e.g. tta=flip
    return name, settings


def _init_worker(threads: int) -> None:
    import torch
    torch.set_num_threads(threads)
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (the runs' own logs; the parent prints one line a run)


def run_one(name: str, settings: dict, seed: int, device: str, project: str) -> dict:
    import imgclf
    t0 = time.perf_counter()
    r = imgclf.train(data=str(CIFAR), seed=seed, device=device, progress=False, project=project, **settings)
    m = r.test_metrics
    return {"variant": name, "seed": seed, "top1": m["top1"], "tta": (m.get("tta") or {}).get("top1"),
            "seconds": round(time.perf_counter() - t0, 1)}


# The yardstick on another device: its own source, with its tensors created there and its autocast there.
_MOVE = [('torch.autocast("cpu"', 'torch.autocast({device!r}'),
         ("torch.from_numpy(x)", "torch.from_numpy(x).to({device!r})"),
         ("torch.from_numpy(ytr)", "torch.from_numpy(ytr).to({device!r})"),
         ("torch.from_numpy(yte)", "torch.from_numpy(yte).to({device!r})")]


def yardstick_child(device: str, runs: int, out: str) -> None:
    import torch
    src = YARDSTICK.read_text()
    for old, new in _MOVE:
        if old not in src:
            raise SystemExit(f"the yardstick changed: {old!r} not found, cannot move it to {device}")
        src = src.replace(old, new.format(device=device))
    torch.set_default_device(device)
    sys.argv = [str(YARDSTICK), "--runs", str(runs), "--bf16", "--json", out]
    exec(compile(src, str(YARDSTICK), "exec"), {"__name__": "__main__", "__file__": str(YARDSTICK)})


def summarise(rows: list[dict], order: list[str], bar: float, unpaired: tuple[str, ...] = ()) -> list[dict]:
    """Per variant: spread, seeds at or above ``bar``, and (except for ``unpaired`` ones, whose seeds are
    not imgclf's) the paired difference from the first variant on the seeds both ran."""
    by = {v: {r["seed"]: r for r in rows if r["variant"] == v} for v in order}
    first = by[order[0]]
    out = []
    for v in order:
        runs = by[v]
        if not runs:
            continue
        s = {"variant": v, "n": len(runs)}
        for key in ("top1", "tta"):
            vals = [100 * r[key] for r in runs.values() if r[key] is not None]
            if vals:
                s[key] = {"mean": round(statistics.mean(vals), 3), "sd": round(statistics.pstdev(vals), 3),
                          "min": round(min(vals), 2), "max": round(max(vals), 2)}
        key = "tta" if "tta" in s else "top1"
        s["at_or_above_bar"] = sum(100 * r[key] >= bar - 1e-9 for r in runs.values() if r[key] is not None)
        if v != order[0] and v not in unpaired:
            d = [100 * (runs[k][key] - first[k][key]) for k in runs if k in first]
            if d:
                s["paired"] = {"mean": round(statistics.mean(d), 3), "n": len(d),
                               "better": sum(x > 0 for x in d), "worse": sum(x < 0 for x in d)}
        out.append(s)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", action="append", help="NAME or NAME:key=value,... (repeat); default: base")
    ap.add_argument("--seeds", type=int, default=8, help="seeds 0..N-1 (or --first-seed)")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=None, help="default: 6 on a GPU, 1 on a CPU")
    ap.add_argument("--yardstick", action="store_true", help="also the yardstick over the same number of seeds")
    ap.add_argument("--bar", type=float, default=90.66, help="count seeds at or above this %% (TTA)")
    ap.add_argument("--json", help="also write the result here")
    ap.add_argument("--yardstick-child", nargs=3, metavar=("DEVICE", "RUNS", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.yardstick_child:
        yardstick_child(a.yardstick_child[0], int(a.yardstick_child[1]), a.yardstick_child[2])
        return

    import torch

    import imgclf
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    variants = [parse_variant(v) for v in (a.variant or ["base"])]
    workers = a.workers or (6 if device.startswith("cuda") else 1)
    threads = max(1, (os.cpu_count() or 1) // workers)
    imgclf.load_dataset(str(CIFAR), progress=False)  # decode once, before the workers read the cache
    seeds = range(a.first_seed, a.first_seed + a.seeds)
    jobs = [(name, settings, seed) for seed in seeds for name, settings in variants]  # seed-major: even coverage
    rows, t0 = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="imgclf-seeds-") as tmp:
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(threads,)) as pool:
            futures = [pool.submit(run_one, n, s, seed, device, f"{tmp}/{i}") for i, (n, s, seed) in
                       enumerate(jobs)]
            for f in cf.as_completed(futures):
                rows.append(f.result())
                r = rows[-1]
                tta = f"{r['tta']:.2%}" if r["tta"] is not None else "-"
                print(f"{r['variant']:<16} seed {r['seed']:>3}: {r['top1']:.2%}  TTA {tta}  {r['seconds']:.0f}s",
                      flush=True)
        order = [n for n, _ in variants]
        if a.yardstick:
            out = f"{tmp}/yardstick.json"
            subprocess.run([sys.executable, __file__, "--yardstick-child", device, str(a.seeds), out], check=True)
            res = json.loads(Path(out).read_text())["runs"]
            # the yardstick seeds its runs 0..N-1 itself; they are not imgclf's seeds (no pairing)
            rows += [{"variant": "yardstick", "seed": i, "top1": r["test_acc"], "tta": r["tta_test_acc"],
                      "seconds": round(r["train_s"], 1)} for i, r in enumerate(res)]
            order.append("yardstick")
    summary = summarise(rows, order, a.bar, unpaired=("yardstick",))
    print(f"\n{len(rows)} runs in {time.perf_counter() - t0:.0f}s on {device}, {workers} workers")
    print(f"{'variant':<16}{'n':>4}{'top-1':>9}{'TTA':>9}{'sd':>6}{'TTA range':>15}{'paired':>9}{'+/-':>8}"
          f"{'>=' + format(a.bar, '.2f'):>9}")
    for s in summary:
        t, p = s.get("tta") or s["top1"], s.get("paired")
        paired, wins = (f"{p['mean']:+.2f}", f"{p['better']}/{p['worse']}") if p else ("", "")
        print(f"{s['variant']:<16}{s['n']:>4}{s['top1']['mean']:>9.2f}{t['mean']:>9.2f}{t['sd']:>6.2f}"
              f"{t['min']:>9.2f}-{t['max']:<5.2f}{paired:>9}{wins:>8}{s['at_or_above_bar']:>9}")
    result = {"device": device, "torch": torch.__version__, "workers": workers, "seeds": list(seeds),
              "variants": dict(variants), "summary": summary, "runs": sorted(rows, key=lambda r: (r["variant"],
                                                                                                 r["seed"]))}
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
