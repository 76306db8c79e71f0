"""imgclf's default CIFAR-10 recipe against the public speed record's recipe, side by side, in one run.

    python benchmarks/cifar10_record.py                       # both, whole commands timed (~35 min on 2 cores)
    python benchmarks/cifar10_record.py --skip-yardstick      # imgclf only
    python benchmarks/cifar10_record.py --args "--time-budget 5m"   # any extra `imgclf train` flags

1. ``imgclf train --data <shared CIFAR-10 JPEG copy>`` exactly as a user types it (plus --args), in a fresh
   process, timed from launch to exit: start-up, data loading, training, the final test with TTA, the
   checkpoint and the report all count.
2. The yardstick, ``../shared/reference/airbench94_cpu.py`` (airbench94_muon ported to a CPU), in its best
   mode on this machine (``--bf16`` where the CPU computes bf16 natively), timed the same way; its own
   ``train_s`` (training only, evaluation and data loading excluded) is reported too.

Prints a table and, last, one JSON line with both sides, the ratio of imgclf's whole-command time to the
yardstick's training time (the stricter comparison), and time to 90 / 93 % where the runs show it
(imgclf only validates after its last epoch unless --args "--val-every 1" is given).
Figures are only as quiet as the machine: run it alone. On a VM, the share of CPU time the hypervisor took
for other guests while each side ran ("steal", from /proc/stat) is printed beside it: the speed of a shared
VM drifts with it, and it can differ between the two sides.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CIFAR = SHARED / "datasets" / "cifar10-jpeg.tar.gz"
YARDSTICK = SHARED / "reference" / "airbench94_cpu.py"


def cpu_ticks() -> tuple[int, int] | None:
    """(stolen, total) CPU ticks since boot from /proc/stat (Linux), else None. "Steal" is time the
    hypervisor gave this VM's CPUs to other guests: on a shared VM it is what makes one run slower than
    another, and it can hit the two sides of this benchmark differently."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def timed(cmd: list[str], log: Path, env: dict | None = None) -> tuple[float, float | None]:
    """Run ``cmd`` with its output teed to ``log``; -> (wall seconds, share of CPU time stolen meanwhile, or
    None where /proc/stat is not there). A failure stops the benchmark."""
    ticks = cpu_ticks()
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for line in proc.stdout:
            if "\r" not in line:  # progress bars stay out of the log
                sys.stdout.write(line)
                f.write(line)
        code = proc.wait()
    seconds, after = time.perf_counter() - t0, cpu_ticks()
    if code != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed with exit code {code}; see {log}")
    if ticks is None or after is None or after[1] == ticks[1]:
        return seconds, None
    return seconds, round((after[0] - ticks[0]) / (after[1] - ticks[1]), 3)


def time_to(curve: list[tuple[float, float]], target: float) -> float | None:
    """First cumulative training time at which the accuracy reached ``target``."""
    return next((t for t, acc in curve if acc >= target), None)


def run_imgclf(work: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "imgclf", "train", "--data", str(CIFAR), "--project", str(work / "runs"),
           "--name", "record", "--no-progress", *extra]
    wall, steal = timed(cmd, work / "imgclf.log")
    run = work / "runs" / "record"
    info = json.loads((run / "run.json").read_text())
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    curve, total = [], 0.0
    for r in rows:
        total += float(r["seconds"])
        if r["val_acc"] not in ("", "nan"):
            curve.append((total, float(r["val_acc"])))
    tm = info["test_metrics"]
    return {"command": "imgclf train --data " + str(CIFAR) + (" " + shlex.join(extra) if extra else ""),
            "model": tomllib.loads((run / "config.toml").read_text())["model"],
            "wall_s": round(wall, 1), "train_s": round(total, 1), "epochs": len(rows), "cpu_steal": steal,
            "test_acc": tm["top1"], "tta_test_acc": (tm.get("tta") or {}).get("top1"),
            "time_to_90": time_to(curve, 0.90), "time_to_93": time_to(curve, 0.93),
            "precision": info["precision"], "run_json": str(run / "run.json")}


def run_yardstick(work: Path, bf16: bool) -> dict:
    out = work / "yardstick.json"
    cmd = [sys.executable, str(YARDSTICK), "--json", str(out)] + (["--bf16"] if bf16 else [])
    wall, steal = timed(cmd, work / "yardstick.log")
    res = json.loads(out.read_text())
    epochs = res["runs"][0]["epochs"]
    curve = [(e["train_s"], e["test_acc"]) for e in epochs]
    return {"command": "python " + " ".join(cmd[1:]), "wall_s": round(wall, 1), "cpu_steal": steal,
            "train_s": round(res["mean_train_s"], 1), "epochs": len(epochs), "test_acc": res["mean_test_acc"],
            "tta_test_acc": res["mean_tta_test_acc"], "time_to_90": time_to(curve, 0.90),
            "time_to_93": time_to(curve, 0.93), "precision": res["dtype"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--args", default="", help="extra `imgclf train` flags, quoted")
    ap.add_argument("--skip-yardstick", action="store_true")
    ap.add_argument("--yardstick-fp32", action="store_true", help="run the yardstick in fp32 even on a bf16 CPU")
    ap.add_argument("--json", help="also write the result here")
    ap.add_argument("--keep", help="copy imgclf's run folder here (e.g. to export it afterwards)")
    a = ap.parse_args()

    import torch

    from imgclf.utils import native_bf16

    bf16 = native_bf16(torch.device("cpu")) and not a.yardstick_fp32
    machine = {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "native_bf16": native_bf16(torch.device("cpu")), "cores": len(os.sched_getaffinity(0)),
               "torch": torch.__version__}
    with tempfile.TemporaryDirectory(prefix="imgclf-record-") as tmp:
        work = Path(tmp)
        ours = run_imgclf(work, shlex.split(a.args))
        if a.keep:
            shutil.copytree(work / "runs" / "record", a.keep)
            ours["kept"] = a.keep
        peer = None if a.skip_yardstick else run_yardstick(work, bf16)

    rows = [("imgclf (" + ours["precision"] + ")", ours)]
    rows += [("yardstick (" + peer["precision"] + ")", peer)] if peer else []
    print(f"\n{'recipe':<22}{'test':>8}{'TTA':>8}{'whole s':>9}{'train s':>9}{'to 90%':>8}{'steal':>7}")
    for name, r in rows:
        tta = f"{r['tta_test_acc']:.2%}" if r["tta_test_acc"] is not None else "-"
        t90 = f"{r['time_to_90']:.0f}" if r["time_to_90"] is not None else "-"
        steal = f"{r['cpu_steal']:.0%}" if r["cpu_steal"] is not None else "-"
        print(f"{name:<22}{r['test_acc']:>8.2%}{tta:>8}{r['wall_s']:>9.0f}{r['train_s']:>9.0f}{t90:>8}{steal:>7}")
    result = {"machine": machine, "imgclf": ours, "yardstick": peer}
    if peer:
        result["ratio_whole_vs_yardstick_train"] = round(ours["wall_s"] / peer["train_s"], 3)
        result["ratio_whole_vs_yardstick_whole"] = round(ours["wall_s"] / peer["wall_s"], 3)
        best = lambda r: max(r["test_acc"], r["tta_test_acc"] or 0)  # noqa: E731
        result["accuracy_gap_points"] = round(100 * (best(ours) - best(peer)), 2)
        print(f"imgclf's whole command took {result['ratio_whole_vs_yardstick_train']:.2f}x the yardstick's "
              f"training time ({result['ratio_whole_vs_yardstick_whole']:.2f}x its whole command); best "
              f"accuracy {result['accuracy_gap_points']:+.2f} points")
    print(json.dumps(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
