"""Structured pruning of a trained run: size, arithmetic, accuracy and speed at several amounts.

    python benchmarks/prune.py RUN                              # amounts 0, 0.25, 0.5, 0.75; 1 fine-tuning epoch
    python benchmarks/prune.py RUN --amounts 0 0.5 --epochs 2 --json

For each amount, ``imgclf.prune(RUN, amount, epochs=N)`` exactly as ``imgclf prune`` runs it; amount 0 gets the same
fine-tune without the cut (``imgclf.train`` from the run's config, ``--init-from`` its weights, the settings of
``imgclf.training.prune.FINE_TUNE``), so every row has trained as long. Each row: trainable parameters, MACs of one
image, test top-1 before the fine-tune (straight after the cut) and after it (plain and with the recipe's test-time
augmentation), ONNX Runtime int8 top-1, and images/s in PyTorch eager, ONNX Runtime fp32 and ONNX Runtime int8
(made as ``imgclf export --int8`` makes it) at batch 1 and 256. All twelve models are timed in the same rounds, one
after the other (see ``imgclf.deploy.parity.throughput``), so a drift in the machine's speed reaches them alike; the
CPU time the hypervisor took meanwhile (steal, from /proc/stat) is printed beside. Pruning and fine-tuning take most
of the run: 18 of its 24 minutes on a 2-core AVX2 EPYC for 1 epoch of CIFAR-10 at the four amounts (--epochs 2:
about 40). Prints a table and, last, one JSON line. Run it alone.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

import imgclf
from imgclf.checkpoint import resolve_checkpoint_path
from imgclf.data.run_data import load_run_data
from imgclf.data.tensors import to_tensor
from imgclf.deploy.export import export_onnx
from imgclf.deploy.int8 import needs_reduce_range, quantize_int8
from imgclf.deploy.parity import sample_indices, throughput
from imgclf.models import count_macs, count_params
from imgclf.onnx_runtime import load_onnx
from imgclf.training.prune import FINE_TUNE


def steal() -> tuple[int, int]:
    """(steal ticks, all ticks) of the whole machine so far."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return fields[7], sum(fields)


def top1(clf, x: torch.Tensor, y: torch.Tensor) -> float:
    return (clf.logits(x).argmax(1) == y).float().mean().item()


def fine_tuned(run: Path, amount: float, epochs: int, project: Path) -> tuple[Path, Path, float]:
    """-> (the fine-tuned run, the weights it started from, seconds of the whole prune or fine-tune)."""
    t0 = time.perf_counter()
    if amount:
        result = imgclf.prune(run, amount, epochs=epochs, project=str(project), name=f"pruned{amount:g}",
                              progress=False)
        return result.run_dir, result.run_dir / "pruned.safetensors", time.perf_counter() - t0
    source = resolve_checkpoint_path(run)
    result = imgclf.train(config=str(source.parent / "config.toml"), init_from=str(source), epochs=epochs,
                          **FINE_TUNE, project=str(project), name="pruned0", progress=False)
    return result.run_dir, source, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a trained run folder (its config.toml sets the fine-tune)")
    ap.add_argument("--amounts", type=float, nargs="+", default=[0, 0.25, 0.5, 0.75])
    ap.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs of every row")
    ap.add_argument("--seconds", type=float, default=1.5, help="time per measurement, per round")
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds (the best of them is kept)")
    ap.add_argument("--project", help="where the pruned runs go (default: a temporary folder)")
    ap.add_argument("--json", action="store_true", help="print only the JSON")
    args = ap.parse_args()
    say = (lambda *a, **k: None) if args.json else print

    rows, clfs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(args.project or tmp)
        source = imgclf.load(args.run, device="cpu")
        ds = load_run_data(source, None, progress=False)
        x, y = to_tensor(ds.test.x), torch.as_tensor(ds.test.y)
        calib = ds.train.x[sample_indices(len(ds.train.x), 300, seed=1)]
        size = source.preprocess.image_size
        for amount in args.amounts:
            run_dir, start, seconds = fine_tuned(Path(args.run), amount, args.epochs, project)
            clf, before = imgclf.load(run_dir, device="cpu"), imgclf.load(start, device="cpu")
            info = json.loads((run_dir / "run.json").read_text())["test_metrics"]
            fp32, int8 = Path(tmp) / f"{amount:g}.onnx", Path(tmp) / f"{amount:g}.int8.onnx"
            export_onnx(clf, fp32)
            quantize_int8(fp32, int8, calib)
            backends = [clf, load_onnx(fp32), load_onnx(int8)]
            rows.append({"amount": amount, "params": count_params(clf.model), "macs": count_macs(clf.model, size),
                         "top1_before_fine_tune": top1(before, x, y), "top1": info["top1"],
                         "top1_tta": (info.get("tta") or {}).get("top1"), "top1_int8": top1(backends[2], x, y),
                         "prune_and_fine_tune_s": round(seconds, 1), "run": str(run_dir)})
            clfs += backends
            r = rows[-1]
            say(f"amount {amount:<4g} params {r['params']:>9,}  MACs {r['macs'] / 1e6:6.1f}M  top-1 before fine-tune "
                f"{r['top1_before_fine_tune']:.2%}, after {r['top1']:.2%} (TTA {r['top1_tta'] or 0:.2%}, int8 "
                f"{r['top1_int8']:.2%}); {seconds:.0f} s", flush=True)
        # every model at each batch size, in the same rounds
        s0 = steal()
        speeds = {bs: throughput(clfs, x, bs, args.seconds, args.rounds) for bs in (1, 256)}
        s1 = steal()
    cpu_steal = round((s1[0] - s0[0]) / max(1, s1[1] - s0[1]), 4)
    names = ("eager", "onnx_fp32", "onnx_int8")
    for i, r in enumerate(rows):
        for j, name in enumerate(names):
            r[f"{name}_b1"], r[f"{name}_b256"] = round(speeds[1][3 * i + j], 1), round(speeds[256][3 * i + j], 1)
    base = rows[0]
    say(f"\n{'amount':>6} {'params':>10} {'MACs':>8} {'before':>7} {'top-1':>7} {'TTA':>7} {'int8':>7}   "
        + "  ".join(f"{n + ' b1':>13} {n + ' b256':>14}" for n in names))
    for r in rows:
        say(f"{r['amount']:>6g} {r['params']:>10,} {r['macs'] / 1e6:>7.1f}M {r['top1_before_fine_tune']:>7.2%} "
            f"{r['top1']:>7.2%} {r['top1_tta'] or 0:>7.2%} {r['top1_int8']:>7.2%}   "
            + "  ".join(f"{r[n + '_b1']:>13,.0f} {r[n + '_b256']:>14,.0f}" for n in names))
    say(f"speed-up over amount {base['amount']:g} at batch 256: " + "; ".join(
        f"{r['amount']:g}: " + ", ".join(f"{n} {r[n + '_b256'] / base[n + '_b256']:.2f}x" for n in names)
        for r in rows[1:]))
    env = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "cpu_steal_while_timing": cpu_steal,
           "reduce_range": needs_reduce_range(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "epochs": args.epochs, "test_images": len(y)}
    say(f"(CPU steal while timing {cpu_steal:.1%}; {env['cpus']} CPUs, {env['cpu_capability']}, "
        f"{args.epochs} fine-tuning epoch(s), {len(y):,} test images)")
    print(json.dumps({"env": env, "rows": rows}))


if __name__ == "__main__":
    sys.exit(main())
