"""FastNet's 3x3 weight gradient: oneDNN's kernel against imgclf's matrix-product one, per layer and per step.

    python benchmarks/conv_grad.py            # bf16 (the kernel is only used under bf16)
    python benchmarks/conv_grad.py --json out.json

For each 3x3 conv shape of FastNet at batch 1000 (channels-last, bf16): the weight gradient's time from
PyTorch (``aten.convolution_backward``) and from ``imgclf.models._kernels.conv3x3_weight_grad``; then a
whole FastNet training step (bf16 autocast, Muon) with the kernel off and on, alternated, median of each.
Both sides run in the same process, so their ratio holds however busy the machine is; run it alone anyway.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

import imgclf  # noqa: F401 - flushes subnormals, as every imgclf run does
from imgclf.config import TrainConfig
from imgclf.models import _kernels, create_model
from imgclf.training.optim import build_optimizer

SHAPES = [(24, 64, 31), (64, 64, 15), (64, 256, 15), (256, 256, 7), (256, 256, 3)]  # (in, out, side)


def median_time(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def layer_rows(batch: int, reps: int) -> list[dict]:
    rows = []
    for cin, cout, side in SHAPES:
        x = torch.randn(batch, cin, side, side, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        g = torch.randn(batch, cout, side, side, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        w = torch.randn(cout, cin, 3, 3, dtype=torch.bfloat16)
        flop = 2 * batch * side * side * cin * cout * 9
        t_torch = median_time(lambda x=x, g=g, w=w: torch.ops.aten.convolution_backward(
            g, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False]), reps)
        t_ours = median_time(lambda x=x, g=g: _kernels.conv3x3_weight_grad(x, g), reps)
        rows.append({"shape": f"{cin}->{cout} @{side}x{side}", "torch_ms": t_torch * 1e3, "imgclf_ms": t_ours * 1e3,
                     "torch_gflops": flop / t_torch / 1e9, "imgclf_gflops": flop / t_ours / 1e9,
                     "used_in_training": side * side <= _kernels.SMALL_IMAGE_PIXELS})
    return rows


def step_times(batch: int, reps: int) -> dict:
    torch.manual_seed(0)
    model = create_model("fastnet", num_classes=10).to(memory_format=torch.channels_last).train()
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    model.init_whitening(x[:500])
    opt = build_optimizer(TrainConfig(model="fastnet", batch_size=batch), model)  # training's own Muon groups

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), y, label_smoothing=0.2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    on, off, pixels = [], [], _kernels.SMALL_IMAGE_PIXELS
    for _ in range(reps):  # alternate, so that a change in the machine's speed hits both sides alike
        for times, limit in ((off, 0), (on, pixels)):
            _kernels.SMALL_IMAGE_PIXELS = limit
            times.append(median_time(step, 1))
    _kernels.SMALL_IMAGE_PIXELS = pixels
    off_s, on_s = sorted(off)[reps // 2], sorted(on)[reps // 2]
    return {"batch": batch, "step_s_torch": off_s, "step_s_imgclf": on_s, "img_s_torch": batch / off_s,
            "img_s_imgclf": batch / on_s, "speedup": off_s / on_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, batch {args.batch}, bf16, channels-last")
    rows = layer_rows(args.batch, args.reps)
    print(f"{'layer':<18}{'PyTorch ms':>11}{'GFLOP/s':>9}{'imgclf ms':>11}{'GFLOP/s':>9}  used in training")
    for r in rows:
        print(f"{r['shape']:<18}{r['torch_ms']:>11.0f}{r['torch_gflops']:>9.0f}{r['imgclf_ms']:>11.0f}"
              f"{r['imgclf_gflops']:>9.0f}  {'yes' if r['used_in_training'] else 'no'}")
    step = step_times(args.batch, args.reps)
    print(f"FastNet training step: PyTorch's kernels {step['step_s_torch']:.2f}s ({step['img_s_torch']:.0f} img/s), "
          f"with imgclf's weight gradient {step['step_s_imgclf']:.2f}s ({step['img_s_imgclf']:.0f} img/s): "
          f"{step['speedup']:.2f}x")
    out = {"layers": rows, "step": step, "cpu": torch.backends.cpu.get_cpu_capability()}
    print(json.dumps(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
