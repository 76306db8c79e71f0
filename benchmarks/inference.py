"""Inference speed and accuracy: PyTorch eager fp32 vs ONNX Runtime fp32 vs ONNX Runtime int8.

    python benchmarks/inference.py                                  # every registered model, untrained weights
    python benchmarks/inference.py runs/cifar10-jpeg-seed-cnn runs/x  # trained runs: accuracy too
    python benchmarks/inference.py --models seed-cnn resnet18 --json

For each model: images/s at batch 1 and batch 256 on this CPU, and top-1 on the run's test split (trained
runs only: an untrained model's speed is the same, its accuracy meaningless). The int8 model is made as
``imgclf export --int8`` makes it (static QDQ, per-channel, 300 calibration images from the training
data). Prints a table and, last, one JSON line. Figures are only as quiet as the machine: run it alone.
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
from imgclf.classifier import Classifier
from imgclf.data.images import Preprocess
from imgclf.data.run_data import load_run_data
from imgclf.data.tensors import channel_stats, to_tensor
from imgclf.deploy.export import export_onnx
from imgclf.deploy.int8 import needs_reduce_range, quantize_int8
from imgclf.deploy.parity import sample_indices, throughput
from imgclf.onnx_runtime import load_onnx

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpeg.tar.gz"


def per_image_rate(clf, x: torch.Tensor, seconds: float) -> float:
    """Images/s answering one image at a time (batch 1), as a server with no concurrency would."""
    clf.logits(x[:1], batch_size=1)
    n, t0 = 0, time.perf_counter()
    while n < 20 or time.perf_counter() - t0 < seconds:
        clf.logits(x[n % len(x):n % len(x) + 1], batch_size=1)
        n += 1
    return n / (time.perf_counter() - t0)


def matmul_peaks(n: int = 2048, seconds: float = 2.0) -> dict[str, float]:
    """GOP/s of an n x n x n matrix product on this CPU: PyTorch fp32, and ONNX Runtime u8 x s8 (the int8
    kernels' instruction mix). Their ratio bounds what int8 can gain over fp32 here: where int8 arithmetic
    is only ~4-5x fp32's, "4x PyTorch eager fp32" needs int8 kernels at least as close to their peak as
    fp32's are to theirs."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    def rate(fn) -> float:
        fn()
        k, t0 = 0, time.perf_counter()
        while k < 3 or time.perf_counter() - t0 < seconds:
            fn()
            k += 1
        return 2 * n ** 3 * k / (time.perf_counter() - t0) / 1e9

    a, b = torch.randn(n, n), torch.randn(n, n)
    w = np.random.default_rng(0).integers(-127, 128, (n, n), dtype=np.int8)
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "w"], ["y"])], "mm",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [n, n])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x8 = np.random.default_rng(1).integers(0, 256, (n, n), dtype=np.uint8)
    return {"torch_fp32": round(rate(lambda: a @ b), 1),
            "ort_u8s8": round(rate(lambda: sess.run(None, {"a": x8})), 1)}


def targets(args) -> list[tuple[str, Classifier, object]]:
    """(label, classifier, dataset) for each run given, else each model (untrained) on CIFAR-10."""
    out = []
    for run in args.runs:
        clf = imgclf.load(run, device="cpu")
        out.append((f"{clf.meta['arch']['name']} ({run})", clf, load_run_data(clf, None, progress=False)))
    if not args.runs:
        ds = imgclf.load_dataset(str(args.data), progress=False)
        mean, std = channel_stats(ds.train.x)
        spec = Preprocess(ds.image_size, ds.channels, mean, std)
        for name in args.models or imgclf.list_models():
            torch.manual_seed(0)
            model = imgclf.create_model(name, num_classes=len(ds.classes), in_channels=ds.channels).eval()
            meta = {"arch": {"name": name}, "classes": ds.classes, "preprocess": spec.to_dict()}
            out.append((f"{name} (untrained)", Classifier(model, ds.classes, spec, meta=meta), ds))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="*", help="trained run folders (default: every registered model, untrained)")
    ap.add_argument("--models", nargs="*", help="registered models to time when no run is given")
    ap.add_argument("--data", default=str(CIFAR), help="data for untrained models (calibration and timing)")
    ap.add_argument("--test-images", type=int, default=2000, help="test images for accuracy (0 = all)")
    ap.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    ap.add_argument("--threads", type=int, default=0, help="threads for PyTorch and ONNX Runtime (0: their "
                    "defaults). On a busy machine PyTorch's default (one thread a core) can be many times slower "
                    "at batch 1 than one thread: its threads wait for each other")
    ap.add_argument("--json", action="store_true", help="print only the JSON")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    env = {"torch_threads": torch.get_num_threads(), "ort_threads": args.threads or "default",
           "cpus": os.cpu_count(), "reduce_range": needs_reduce_range(),
           "load_avg_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        for label, clf, ds in targets(args):
            test = ds.test
            idx = sample_indices(len(test.y), args.test_images, seed=0)
            x, y = to_tensor(test.x[idx]), torch.as_tensor(test.y[idx])
            trained = bool(args.runs)
            fp32_path, int8_path = Path(tmp) / "m.onnx", Path(tmp) / "m.int8.onnx"
            export_onnx(clf, fp32_path)
            quantize_int8(fp32_path, int8_path, ds.train.x[sample_indices(len(ds.train.x), 300, seed=1)])
            backends = {"pytorch fp32": clf, "onnx fp32": load_onnx(fp32_path, threads=args.threads),
                        "onnx int8": load_onnx(int8_path, threads=args.threads)}
            # batch 256: the three in the same rounds, so that the machine's drift reaches them alike
            fast = throughput(list(backends.values()), x, 256, args.seconds)
            for (backend, c), ips in zip(backends.items(), fast):
                acc = (c.logits(x).argmax(1) == y).float().mean().item() if trained else None
                rows.append({"model": label, "backend": backend,
                             "batch1_ips": round(per_image_rate(c, x, args.seconds), 1),
                             "batch256_ips": round(ips, 1),
                             "top1": acc, "n_test": len(idx) if trained else None,
                             "size_bytes": os.path.getsize(c.path) if c.path else None})
                if not args.json:
                    r = rows[-1]
                    print(f"{label:<34} {backend:<13} batch 1 {r['batch1_ips']:>8,.0f} img/s   batch 256 "
                          f"{r['batch256_ips']:>8,.0f} img/s   top-1 {'-' if acc is None else f'{acc:.2%}'}",
                          flush=True)
    for r in rows:  # each backend against the same model's PyTorch eager fp32, batch 256
        eager = next(e for e in rows if e["model"] == r["model"] and e["backend"] == "pytorch fp32")
        r["x_eager_batch256"] = round(r["batch256_ips"] / eager["batch256_ips"], 2)
    env["matmul_peak_gop_s"] = peaks = matmul_peaks()
    env["load_avg_after"] = os.getloadavg()[0]
    if not args.json:
        for r in rows:
            if r["backend"] == "onnx int8":
                print(f"{r['model']:<34} int8 at batch 256: {r['x_eager_batch256']:.2f}x PyTorch eager fp32")
        print(f"matmul 2048^3 on this CPU: torch fp32 {peaks['torch_fp32']:,.0f} GFLOP/s, ORT u8s8 "
              f"{peaks['ort_u8s8']:,.0f} GOP/s ({peaks['ort_u8s8'] / peaks['torch_fp32']:.1f}x)")
        print(f"(torch threads {env['torch_threads']}, {env['cpus']} CPUs, reduce_range {env['reduce_range']}, "
              f"load average {env['load_avg_before']:.1f} -> {env['load_avg_after']:.1f})")
    print(json.dumps({"env": env, "rows": rows}))


if __name__ == "__main__":
    sys.exit(main())
