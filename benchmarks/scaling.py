"""Training throughput on 1 and N processes (torchrun + DistributedDataParallel), with the scaling efficiency.

    python benchmarks/scaling.py                                   # 1 and 2 processes, CIFAR-10, seed recipe
    python benchmarks/scaling.py --procs 1 2 4 --fraction 0.5 --epochs 3 --json scaling.json
    python benchmarks/scaling.py --device cuda --procs 1 2 4 8     # one process per GPU

Each setting is one ``python -m torch.distributed.run --nproc-per-node N -m imgclf train`` run on the same
data, model, global batch and seed (the default data is the shared CIFAR-10 JPEG copy, decoded once into
the cache first). Throughput is training images / seconds of the fastest epoch after the first (the
``seconds`` column of metrics.csv times only the training steps: no validation, test, or start-up).

Efficiency = throughput(N) / (throughput(1) x ideal speed-up). On GPUs each process has its own GPU, so the
ideal is N; on a CPU the processes share the machine's cores (each gets cores / N threads), so the ideal is
1: anything below 1 is what splitting a batch over processes costs there. Prints a table and, last, one
JSON line (also written to ``--json FILE``). Figures are only as quiet as the machine: run it alone.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpeg.tar.gz"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(nproc: int, args, project: Path, threads: int) -> dict:
    name = f"procs{nproc}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "imgclf", "train", "--data", str(args.data), "--recipe", args.recipe, "--model", args.model,
           "--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--fraction", str(args.fraction),
           "--device", args.device, "--precision", args.precision, "--augment", args.augment,
           "--project", str(project), "--name", name, "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{nproc} process(es) failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    run_dir = project / name
    rows = list(csv.DictReader((run_dir / "metrics.csv").read_text().splitlines()))
    info = json.loads((run_dir / "run.json").read_text())
    n = info["data"]["train"]
    timed = rows[1:] or rows  # the first epoch pays for warm-up (allocator, DDP buckets, caches)
    seconds = min(float(r["seconds"]) for r in timed)
    return {"processes": nproc, "threads_per_process": threads, "train_images": n,
            "epoch_seconds": round(seconds, 3), "images_per_s": round(n / seconds, 1),
            "train_loss_last": float(rows[-1]["train_loss"]), "test_top1": (info.get("test_metrics") or {}).get("top1"),
            "wall_seconds": round(wall, 1), "device": info["device"], "precision": info["precision"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts to time (1 first)")
    ap.add_argument("--data", default=str(CIFAR), help="dataset (as --data takes)")
    ap.add_argument("--recipe", default="seed")
    ap.add_argument("--model", default="seed-cnn")
    ap.add_argument("--augment", default="none")
    ap.add_argument("--batch-size", type=int, default=256, help="global batch (split over the processes)")
    ap.add_argument("--epochs", type=int, default=2, help="epochs per run; the fastest after the first is timed")
    ap.add_argument("--fraction", type=float, default=0.2, help="of the training images")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (one process per GPU)")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--json", type=Path, help="also write the JSON here")
    args = ap.parse_args()

    cuda = args.device.startswith("cuda")
    cores = os.cpu_count() or 1
    if cuda and max(args.procs) > torch.cuda.device_count():
        sys.exit(f"{max(args.procs)} processes need as many GPUs; this machine has {torch.cuda.device_count()}")
    with tempfile.TemporaryDirectory() as tmp:
        # decode once (into the cache), untimed, so no run pays for it
        import imgclf
        imgclf.load_dataset(str(args.data), progress=False)
        rows = []
        for n in args.procs:
            threads = max(1, cores // n)  # the processes share the cores
            rows.append(run(n, args, Path(tmp), threads))
    base = next((r for r in rows if r["processes"] == 1), rows[0])
    for r in rows:
        ideal = r["processes"] / base["processes"] if cuda else 1.0
        r["speedup"] = round(r["images_per_s"] / base["images_per_s"], 3)
        r["efficiency"] = round(r["speedup"] / ideal, 3)
    env = {"device": args.device, "gpus": torch.cuda.device_count() if cuda else 0,
           "gpu": torch.cuda.get_device_name(0) if cuda else None, "cpus": cores,
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
           "python": platform.python_version(), "data": str(args.data), "model": args.model,
           "recipe": args.recipe, "global_batch": args.batch_size, "fraction": args.fraction, "epochs": args.epochs,
           "precision": args.precision}
    print(f"{'processes':>9}  {'threads':>7}  {'images/s':>9}  {'speed-up':>8}  {'efficiency':>10}  "
          f"{'epoch s':>7}  {'test top-1':>10}")
    for r in rows:
        top1 = f"{r['test_top1']:.2%}" if r["test_top1"] is not None else "-"
        print(f"{r['processes']:>9}  {r['threads_per_process']:>7}  {r['images_per_s']:>9,.0f}  {r['speedup']:>8.2f}  "
              f"{r['efficiency']:>10.2f}  {r['epoch_seconds']:>7.2f}  {top1:>10}")
    ideal = "N (a GPU each)" if cuda else "1 (the processes share the CPU cores)"
    print(f"({args.model}, global batch {args.batch_size}, {args.precision}, {args.device}; ideal speed-up {ideal}; "
          f"{cores} CPUs)")
    out = json.dumps({"env": env, "rows": rows})
    if args.json:
        args.json.write_text(out + "\n")
    print(out)


if __name__ == "__main__":
    main()
