"""Frames/s of `imgclf predict --source` on a clip of real photos: the CIFAR model and the photo model, PyTorch
fp32 and ONNX Runtime int8, batches of 1 and 32 frames, and the whole command from launch to exit.

    python benchmarks/video.py                                   # untrained fastnet (32 px) + efficientnet-lite0
    python benchmarks/video.py runs/cifar10-jpeg-fastnet runs/weather-efficientnet-lite0 --rounds 3

The clip is made here: 8 photos of the shared weather set, 2 s each at 30 frames/s, 1280x720 H.264, each
photo fitted into the frame (as `--clip` can replace). A model's speed does not depend on its weights, so
untrained models time the same as trained ones. The int8 model is made as `imgclf export --int8` makes it,
calibrated on 300 of the clip's frames. "in-process" times `label_video` (the command's own loop) from opening
the clip to its last frame; "command" times `imgclf predict MODEL --source CLIP --format json` from launch to
exit (Python and torch start-up included), with its default batch. The variants run in turns, `--rounds`
times; CPU steal (from /proc/stat) is printed beside each. Prints a table and, last, one JSON line.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import imgclf
from imgclf.checkpoint import save_checkpoint
from imgclf.data.images import Preprocess
from imgclf.data.video import VideoSource
from imgclf.deploy.export import export_onnx
from imgclf.deploy.int8 import quantize_int8
from imgclf.deploy.video import label_video

WEATHER = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "weather-photos.tar.gz"
CLASSES = ("cloudy", "rain", "shine", "sunrise")
UNTRAINED = (("fastnet", 32, 10), ("efficientnet-lite0", 160, 4))  # the CIFAR recipe's model; the photo recipe's


def steal() -> tuple[int, int]:
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return fields[7], sum(fields)


def make_clip(path: Path, size=(1280, 720), fps: int = 30, seconds: int = 2, per_class: int = 2) -> list[str]:
    """8 landscape photos of the weather set (2 a class), each fitted into the frame for ``seconds``."""
    import av

    photos: list[tuple[str, Image.Image]] = []
    with tarfile.open(WEATHER) as tf:
        for cls in CLASSES:
            found = 0
            for m in sorted((m for m in tf if m.isfile() and m.name.startswith(cls + "/")), key=lambda m: m.name):
                img = Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB")
                if img.width >= 1.2 * img.height and img.height >= 300:
                    photos.append((m.name, img))
                    found += 1
                if found == per_class:
                    break
    w, h = size
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for _, img in photos:
            scale = min(w / img.width, h / img.height)
            img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BILINEAR)
            frame = Image.new("RGB", size)
            frame.paste(img, ((w - img.width) // 2, (h - img.height) // 2))
            for _ in range(fps * seconds):
                out.mux(stream.encode(av.VideoFrame.from_image(frame)))
        out.mux(stream.encode())
    return [name for name, _ in photos]


def untrained_checkpoints(root: Path) -> list[Path]:
    out = []
    for name, side, classes in UNTRAINED:
        torch.manual_seed(0)
        model = imgclf.create_model(name, num_classes=classes, image_size=side)
        spec = Preprocess(side, 3, (0.5,) * 3, (0.25,) * 3)
        meta = {"arch": {"name": name, "num_classes": classes, "in_channels": 3, "image_size": side},
                "classes": [f"class{i}" for i in range(classes)], "preprocess": spec.to_dict()}
        out.append(save_checkpoint(root / f"{name}.safetensors", model, meta))
    return out


def calibration_frames(clf, clip: Path, n: int = 300) -> np.ndarray:
    with VideoSource(clip) as video:
        every = max(1, round(video.fps * 16 / n)) if video.fps else 1
        frames = [f.prepared for f in video.frames(every, prepare=clf._to_array) if f.sampled]
    return np.stack(frames[:n])


def in_process(clf, clip: Path, batch: int) -> float:
    with open(os.devnull, "w") as sink:
        return label_video(clf, str(clip), batch_size=batch, fmt="json", out=sink).fps


def command(model: Path, clip: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "imgclf", "predict", str(model), "--source", str(clip),
                           "--format", "json"], capture_output=True, text=True, check=True)
    return time.perf_counter() - t0, len(proc.stdout.splitlines())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="*", help="run folders or checkpoints (default: the two models untrained)")
    ap.add_argument("--clip", type=Path, help="a video to label instead of the weather clip made here")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--rounds", type=int, default=2, help="times each variant runs, in turns")
    ap.add_argument("--json", type=Path, help="also write the JSON here")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="imgclf-video-"))
    clip = args.clip or tmp / "weather.mp4"
    if args.clip is None:
        print("clip: " + ", ".join(make_clip(clip)), flush=True)
    with VideoSource(clip) as video:
        frames_in_clip = sum(1 for _ in video.frames())
        info = {"clip": str(clip), "size": video.size, "fps": video.fps, "frames": frames_in_clip}
    print(f"clip: {info['size'][0]}x{info['size'][1]}, {frames_in_clip} frames at {info['fps']:g} frames/s", flush=True)

    models = [Path(r) for r in args.runs] or untrained_checkpoints(tmp)
    variants = []  # (label, classifier, model path for the command)
    for path in models:
        clf = imgclf.load(path, device="cpu")
        label = f"{clf.meta['arch']['name']} {clf.preprocess.image_size}px"
        fp32, int8 = tmp / f"{path.stem}.onnx", tmp / f"{path.stem}.int8.onnx"
        export_onnx(clf, fp32)
        quantize_int8(fp32, int8, calibration_frames(clf, clip))
        variants += [(f"{label} pytorch fp32", clf, path), (f"{label} onnx int8", imgclf.load(int8), int8)]

    results: dict[str, dict[str, list[float]]] = {v[0]: {} for v in variants}
    steals: list[float] = []
    for r in range(args.rounds):
        for label, clf, path in (variants if r % 2 == 0 else variants[::-1]):  # alternate the order
            s0 = steal()
            for b in args.batches:
                results[label].setdefault(f"batch {b}", []).append(in_process(clf, clip, b))
            seconds, rows = command(path, clip)
            if rows != frames_in_clip:
                raise SystemExit(f"{label}: the command labelled {rows} of {frames_in_clip} frames")
            results[label].setdefault("command", []).append(frames_in_clip / seconds)
            s1 = steal()
            steals.append((s1[0] - s0[0]) / max(1, s1[1] - s0[1]))
            print(f"round {r + 1} {label:<40} " + "  ".join(f"{k} {v[-1]:6.1f}" for k, v in results[label].items())
                  + f"  frames/s (steal {steals[-1]:.1%})", flush=True)

    print(f"\nmedian frames/s over {args.rounds} rounds ({frames_in_clip} frames of "
          f"{info['size'][0]}x{info['size'][1]}; torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, "
          f"steal up to {max(steals):.1%}):")
    cols = [f"batch {b}" for b in args.batches] + ["command"]
    print(f"{'model':<42}" + "".join(f"{c:>12}" for c in cols))
    table = []
    for label, per in results.items():
        med = {c: round(statistics.median(per[c]), 1) for c in cols}
        table.append({"variant": label, **med, "runs": per})
        print(f"{label:<42}" + "".join(f"{med[c]:>12.1f}" for c in cols))
    out = {"clip": info, "rounds": args.rounds, "steal_max": round(max(steals), 4),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "rows": table}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
