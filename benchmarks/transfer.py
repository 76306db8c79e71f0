"""Pretrained fine-tuning vs training the same model from scratch, on a small photo-like folder.

    python benchmarks/transfer.py [--classes 5] [--train 100] [--test 100] [--side 160] [--epochs 6] [--json out.json]

The folder is built from the shared CIFAR-10 JPEG copy (../shared/datasets/cifar10-jpeg.tar.gz): the first
``--classes`` classes, ``--train`` training and ``--test`` test images each, upscaled (bicubic) to
``--side`` pixels and saved as JPEG, so it looks like a small folder of photos. Both runs use
``imgclf.train`` with the photo recipe's settings and the same epochs; the only difference is
``pretrained="imagenet"`` (with a head-only first epoch) versus ``pretrained="none"``.
Prints one JSON object and a short table: test accuracy and wall time of each.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from _photos import CIFAR, cifar_photo_folder

import imgclf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=5)
    ap.add_argument("--train", type=int, default=100)
    ap.add_argument("--test", type=int, default=100)
    ap.add_argument("--side", type=int, default=160)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not CIFAR.is_file():
        sys.exit(f"{CIFAR} not found: this benchmark reads the shared CIFAR-10 copy")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        names = cifar_photo_folder(root / "photos", args.classes, {"train": args.train, "test": args.test}, args.side)
        results = {}
        for label, extra in (("pretrained", {"pretrained": "imagenet"}),
                             ("scratch", {"pretrained": "none", "freeze_epochs": 0})):
            t0 = time.perf_counter()
            r = imgclf.train(data=str(root / "photos"), recipe="photo", epochs=args.epochs, project=str(root / "runs"),
                             name=label, val_split=0.1, progress=False, **extra)
            results[label] = {"test_top1": r.test_metrics["top1"], "wall_s": round(time.perf_counter() - t0, 1),
                              "epochs": r.epochs_done}
    report = {
        "benchmark": "transfer", "data": f"{CIFAR.name}: classes {names}, {args.train} train / {args.test} test "
                                         f"each, upscaled to {args.side}px JPEG",
        "model": "efficientnet-lite0 (photo recipe)", "epochs": args.epochs,
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "capability": torch.backends.cpu.get_cpu_capability()},
        "results": results,
    }
    print(json.dumps(report, indent=2))
    print(f"\n{'run':<12}{'test top-1':>12}{'wall s':>10}")
    for label, r in results.items():
        print(f"{label:<12}{r['test_top1']:>12.2%}{r['wall_s']:>10.1f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
