"""Training speed of every registered model, and how close it comes to this CPU's matrix-multiply peak.

    python benchmarks/train_speed.py                     # every model, fp32 and (where native) bf16
    python benchmarks/train_speed.py --models fastnet seed-cnn --steps 5 --json out.json

For each model and precision: training images/s (forward, backward and an optimizer step on random data of
the model's usual input size and its recipe's batch size, channels-last), the arithmetic done per image
(counted by torch.utils.flop_counter, forward + backward, with grouped convolutions' backward counted
as grouped: see conv_backward_flop), the achieved GFLOP/s, and that as a share of the
machine's peak measured in the same run: a 2048 x 2048 matrix multiply in the same precision. Prints a
table and, last, one JSON line. Figures are only as quiet as the machine: run it alone.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from imgclf.config import TrainConfig
from imgclf.models import create_model, list_models
from imgclf.training.optim import build_optimizer
from imgclf.utils import native_bf16

# (input side, batch size, optimizer) each model trains with in its recipe
SETTINGS = {"efficientnet-lite0": (160, 32, "adamw"), "seed-cnn": (32, 64, "adam"), "seed-cnn-bn": (32, 64, "adam"),
            "resnet18": (32, 128, "adam")}
DEFAULT = (32, 1000, "muon")  # the FastNet family


def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 2.0) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    reps, t0 = 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


def conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                       _output_padding, groups, output_mask, out_shape, **kwargs) -> int:
    """FLOPs of a convolution's backward pass, grouped and depthwise convolutions included: each gradient costs
    what the forward pass costs, 2 x (output pixels) x (weights). torch.utils.flop_counter's own formula ignores
    ``groups`` and counts a depthwise convolution's backward as dense (EfficientNet-Lite0 came out at 16.4
    GFLOP an image, "368 % of peak")."""
    if transposed:  # not in our models: PyTorch's own formula
        return flop_counter.conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding,
                                               _dilation, transposed, _output_padding, groups, output_mask,
                                               out_shape, **kwargs)
    n, pixels = grad_out_shape[0], math.prod(grad_out_shape[2:])
    forward = 2 * n * pixels * math.prod(w_shape)  # w_shape is (Cout, Cin / groups, kh, kw)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def bench_model(name: str, dtype: torch.dtype | None, steps: int) -> dict:
    side, bs, opt_name = SETTINGS.get(name, DEFAULT)
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, image_size=side).to(memory_format=torch.channels_last)
    opt = build_optimizer(TrainConfig(model=name, optimizer=opt_name, batch_size=bs), model)  # training's own
    x = torch.randn(bs, 3, side, side).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (bs,))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flop}
                         ) as counter:
        step()  # also the warm-up: kernel selection and allocations
    flops = counter.get_total_flops()
    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - t0) / steps
    return {"model": name, "precision": "bf16" if dtype else "fp32", "side": side, "batch": bs,
            "img_s": round(bs / seconds, 1), "gflop_per_img": round(flops / bs / 1e9, 3),
            "gflop_s": round(flops / seconds / 1e9, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=None, help="default: every registered model")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per model and precision")
    ap.add_argument("--json", help="also write the result here")
    a = ap.parse_args()
    cpu = torch.device("cpu")
    precisions = [None] + ([torch.bfloat16] if native_bf16(cpu) else [])
    peaks = {"fp32": round(matmul_peak(torch.float32), 1)}
    if native_bf16(cpu):
        peaks["bf16"] = round(matmul_peak(torch.bfloat16), 1)
    rows = []
    for name in a.models or list_models():
        for dtype in precisions:
            r = bench_model(name, dtype, a.steps)
            r["share_of_matmul_peak"] = round(r["gflop_s"] / peaks[r["precision"]], 3)
            rows.append(r)
            print(f"{r['model']:<20}{r['precision']:>6}{r['side']:>5}px bs{r['batch']:<5}{r['img_s']:>9.0f} img/s"
                  f"{r['gflop_per_img']:>8.2f} GF/img{r['gflop_s']:>8.0f} GF/s "
                  f"{r['share_of_matmul_peak']:>6.0%} of peak",
                  flush=True)
    info = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": native_bf16(cpu),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "matmul_peak_gflop_s": peaks, "models": rows}
    print("matmul 2048x2048 peak: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items()))
    print(json.dumps(info))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(info, f, indent=1)


if __name__ == "__main__":
    main()
