"""Where one fine-tuning step of the photo recipe spends its time, by layer type, and what the recipe's choices
take back: full fine-tuning at full size against the frozen stem + 4 blocks and the 0.8x crops, in one run.

    python benchmarks/photo_step_profile.py                    # EfficientNet-Lite0, batch 32, 160 px
    python benchmarks/photo_step_profile.py --model efficientnet-lite1 --size 144
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/photo_step_profile.py   # as on AVX2

A step is what the training loop does: a uint8 batch normalised, random-resized-cropped and flipped (and
resized for smaller crops), forward, loss, backward, AdamW. The model is ImageNet-shaped but built without its
weights (speed does not depend on them), BatchNorm in inference mode as fine-tuning keeps it. torch.profiler
sorts the operators' own CPU time into depthwise convolutions (weights of one input channel per group),
pointwise ones (1x1), the other convolutions (the stem), BatchNorm, activations (ReLU6), copies and padding
(memory-format changes, TensorFlow's "SAME" padding, zero-filled gradients), the data path (normalise, crop,
flip, resize), the optimizer, and the rest (autograd's bookkeeping). Then each variant's images/s, from the median of
several steps, the variants taken in turns. Run it alone.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

from imgclf.config import TrainConfig
from imgclf.data.probe import ImageProbe
from imgclf.models import create_model
from imgclf.recipes import resolve
from imgclf.training.augment import build_augment
from imgclf.training.callbacks import keep_batchnorm_statistics
from imgclf.training.optim import build_optimizer

GROUPS = ("depthwise conv", "pointwise conv", "other conv", "batchnorm", "activation", "copies, padding",
          "data path", "optimizer", "other")


def make_step(model_name: str, size: int, crop: int, freeze: int, batch: int):
    cfg = resolve(TrainConfig(data="photos", model=model_name), probe=ImageProbe(375))[0]
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=6, image_size=size).to(memory_format=torch.channels_last)
    model.freeze_early_blocks(freeze)
    opt = build_optimizer(cfg, model, cfg.backbone_lr_mult)
    model.train()
    keep_batchnorm_statistics(model)  # as fine-tuning trains
    augment, g = build_augment("photo", size), torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (batch, 3, size * 8 // 7, size * 8 // 7), dtype=torch.uint8)
    y = torch.randint(0, 6, (batch,))

    def step():
        with record_function("data path"):
            x = augment((raw.float() - 127) / 128, g)  # the Lite models' normalisation
            if crop != size:
                x = F.interpolate(x, size=(crop, crop), mode="bilinear", antialias=True, align_corners=False)
            x = x.contiguous(memory_format=torch.channels_last)
        F.cross_entropy(model(x), y, label_smoothing=0.1).backward()
        with record_function("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step


def group_of(event) -> str:
    name = event.key
    if name in ("data path", "optimizer"):
        return name
    if "convolution" in name or "conv2d" in name:
        shapes = event.input_shapes  # (input, weight, ...) forward; (grad_output, input, weight, ...) backward
        at = 2 if "backward" in name else 1
        weight = shapes[at] if len(shapes) > at and len(shapes[at]) == 4 else None
        if weight and weight[1] == 1:
            return "depthwise conv"
        if weight and weight[2:] == [1, 1]:
            return "pointwise conv"
        return "other conv"
    if name in ("aten::copy_", "aten::fill_", "aten::constant_pad_nd", "aten::zero_", "aten::clone"):
        return "copies, padding"
    if "batch_norm" in name:
        return "batchnorm"
    if "hardtanh" in name or "relu" in name or "clamp" in name:
        return "activation"
    return "other"


def profile_step(step) -> dict[str, float]:
    """Milliseconds of one step by group (operators' own time, so nothing is counted twice)."""
    step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    ms: dict[str, float] = defaultdict(float)
    ranges = {e.key: e.cpu_time_total / 1000 for e in prof.key_averages() if e.key in ("data path", "optimizer")}
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key in ranges:
            continue
        ms[group_of(e)] += e.self_cpu_time_total / 1000
    # the data path's and optimizer's operators are counted in their own ranges, not in "other"
    ms["other"] = max(0.0, ms["other"] - sum(ranges.values()))
    ms.update(ranges)
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="efficientnet-lite0")
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    s, c = args.size, round(args.size * 0.8 / 2) * 2
    variants = {"full fine-tuning": (s, 0), "stem + 4 blocks frozen": (s, 5), f"0.8x crops ({c}px)": (c, 0),
                "both (the recipe)": (c, 5)}
    steps = {name: make_step(args.model, s, crop, freeze, args.batch) for name, (crop, freeze) in variants.items()}
    print(f"{args.model}, batch {args.batch}, {s}px, {torch.get_num_threads()} threads, "
          f"{torch.backends.cpu.get_cpu_capability()}\n")
    prof = profile_step(steps["full fine-tuning"])
    total = sum(prof.values())
    print(f"one step of full fine-tuning at {s}px, {total:.0f} ms (profiled):")
    for g in GROUPS:
        print(f"  {g:<16}{prof.get(g, 0.0):>8.0f} ms {prof.get(g, 0.0) / total:>6.1%}")
    recipe = profile_step(steps["both (the recipe)"])
    print(f"\nthe recipe's step ({c}px crops, stem + 4 blocks frozen), {sum(recipe.values()):.0f} ms:")
    for g in GROUPS:
        print(f"  {g:<16}{recipe.get(g, 0.0):>8.0f} ms")
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():
        step()  # warm-up: kernel choice for each shape
    for _ in range(args.rounds):
        for name, step in steps.items():  # in turns, so a slow spell hits every variant
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["full fine-tuning"])
    print(f"\n{'variant':<26}{'img/s':>8}{'speed-up':>10}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<26}{args.batch / med:>8.1f}{base / med:>9.2f}x")


if __name__ == "__main__":
    main()
