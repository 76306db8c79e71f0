"""Datasets bigger than memory: decoding, training and torchrun memory from 10k to 200k images, and the
streamed batch source against the in-memory one on CIFAR-10.

    python benchmarks/data_scale.py [--sizes 10000,200000] [--side 64] [--steps 30] [--work DIR]
                                    [--rounds 2] [--skip scale,cifar,accuracy,torchrun]

1. Synthetic JPEG folders (train/<10 classes>/*.jpg + test/, --side px, smooth colour fields plus noise, so
   decoding costs what a photo's would) are written once with Pillow under --work and reused.
2. For each folder, in a fresh IMGCLF_HOME: ``imgclf.load_dataset`` (the decode into the shard cache), then
   --steps training steps of FastNet-XS at batch 256 (the fast recipe), once with --data-in-memory auto and
   once streamed. Each runs in its own process; this script samples the whole process tree (the decoding
   workers included) every 50 ms: peak summed RSS, split into anonymous memory (private to the process) and
   file pages (the memory-mapped cache, shared between processes and given back under pressure), and the
   peak summed PSS (shared pages divided among the processes that map them).
3. CIFAR-10 (../shared/datasets/cifar10-jpeg.tar.gz): --steps steps of the default recipe's model in memory
   and streamed, alternated --rounds times (images/s of the steps after the first five, as a ratio within the run),
   then the same short seeded run (10 % of the training images, 2 epochs) both ways: the printed test
   accuracy must agree.
4. torchrun on the largest folder: 1 process (auto: in memory) against 2 processes (auto: streamed from the
   one cache), --steps steps: summed RSS and PSS of the process trees.

Prints a table per part and a final JSON line. CPU steal during the run (from /proc/stat) is printed too.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CIFAR = ROOT.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"
CLASSES = 10


# --- the process tree's memory ------------------------------------------------------------------------

def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(entry))
    return kids


def tree_memory(pid: int) -> dict[str, int]:
    """Summed RssAnon, RssFile and Pss (bytes) of ``pid`` and every descendant."""
    kids, todo, out = _children(), [pid], {"anon": 0, "file": 0, "pss": 0}
    while todo:
        p = todo.pop()
        todo.extend(kids.get(p, []))
        try:
            status = dict(line.split(":", 1) for line in Path(f"/proc/{p}/status").read_text().splitlines())
            out["anon"] += int(status.get("RssAnon", "0 kB").split()[0]) * 1024
            out["file"] += int(status.get("RssFile", "0 kB").split()[0]) * 1024
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    out["pss"] += int(line.split()[1]) * 1024
        except (OSError, ValueError):
            continue
    return out


def run_sampled(cmd: list[str], env: dict, log: Path) -> tuple[float, dict[str, int], str]:
    """Run ``cmd``, sampling its tree's memory; -> (seconds, peaks {rss, anon, file, pss}, its stdout)."""
    peaks = {"rss": 0, "anon": 0, "file": 0, "pss": 0}
    t0 = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        done = threading.Event()

        def sample():
            while not done.wait(0.05):
                m = tree_memory(proc.pid)
                m["rss"] = m["anon"] + m["file"]
                for k in peaks:
                    peaks[k] = max(peaks[k], m[k])

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        out, _ = proc.communicate()
        done.set()
        thread.join()
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{log.read_text()[-3000:]}")
    return time.perf_counter() - t0, peaks, out


def cpu_steal() -> tuple[int, int]:
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in fields]
    return values[7] if len(values) > 7 else 0, sum(values)


# --- synthetic folders ----------------------------------------------------------------------------------

def _write_part(args) -> None:
    import numpy as np
    from PIL import Image

    folder, side, start, stop = args
    for i in range(start, stop):
        rng = np.random.default_rng(i)
        cls, split = i % CLASSES, ("test" if (i // CLASSES) % 10 == 0 else "train")
        yy, xx = np.mgrid[0:side, 0:side] / side
        base = rng.uniform(0, 255, 3) * (0.5 + 0.5 * np.stack([xx, yy, 1 - xx], -1))
        base[..., cls % 3] += 40 * cls / CLASSES
        img = np.clip(base + rng.normal(0, 20, (side, side, 3)), 0, 255).astype(np.uint8)
        path = Path(folder) / split / f"c{cls}" / f"{i:07d}.jpg"
        Image.fromarray(img).save(path, quality=90)


def make_folder(work: Path, n: int, side: int) -> Path:
    from multiprocessing import Pool

    folder = work / f"synthetic-{n}-{side}px"
    if (folder / ".complete").is_file():
        return folder
    for split in ("train", "test"):
        for c in range(CLASSES):
            (folder / split / f"c{c}").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    step = 5000
    with Pool(os.cpu_count() or 1) as pool:
        pool.map(_write_part, [(str(folder), side, s, min(n, s + step)) for s in range(0, n, step)])
    (folder / ".complete").write_text(str(n))
    print(f"wrote {n:,} JPEGs of {side}x{side} in {time.perf_counter() - t0:.0f}s: {folder}", flush=True)
    return folder


# --- what a child process does -------------------------------------------------------------------------

def child(args: argparse.Namespace) -> None:
    import imgclf
    from imgclf.training.callbacks import Callback

    if args.child == "decode":
        t0 = time.perf_counter()
        ds = imgclf.load_dataset(args.data, progress=False)
        print(json.dumps({"seconds": time.perf_counter() - t0, "images": len(ds.train.y) + len(ds.test.y),
                          "decoded_bytes": ds.train.x.nbytes + ds.test.x.nbytes}))
        return

    class Steps(Callback):
        """Times the steps after the first five; stops after --steps."""

        def __init__(self):
            self.times = []

        def on_step_end(self, trainer, epoch, step, loss):
            self.times.append(time.perf_counter())
            if len(self.times) >= args.steps:
                trainer.request_stop()

    steps = Steps()
    kw = dict(recipe="fast", model=args.model, batch_size=args.batch_size, epochs=1, seed=0, device="cpu")
    if args.child == "accuracy":
        kw = dict(fraction=0.1, epochs=2, seed=0, device="cpu", model=args.model)
    name = f"{args.name}-{time.time_ns()}"
    result = imgclf.train(data=args.data, project=args.project, name=name, progress=False,
                          data_in_memory=args.in_memory, callbacks=[] if args.child == "accuracy" else [steps],
                          **kw)
    out = {"status": result.status}
    if args.child == "accuracy":
        out["top1"] = result.test_metrics["top1"]
    else:
        timed = steps.times[5:]
        out["images_per_s"] = (len(timed) - 1) * args.batch_size / (timed[-1] - timed[0])
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(out))


def child_cmd(args, what: str, data, name: str, in_memory: str, launcher=()) -> list[str]:
    return [*(launcher or [sys.executable]), str(Path(__file__)), "--child", what, "--data", str(data),
            "--project", str(args.work / "runs"), "--name", name, "--in-memory", in_memory, "--steps",
            str(args.steps), "--model", args.model, "--batch-size", str(args.batch_size)]


def env_for(home: Path) -> dict:
    return {**os.environ, "IMGCLF_HOME": str(home), "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS":
            os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))}


def mb(n: int) -> str:
    return f"{n / 2**20:,.0f}"


# --- the parts -------------------------------------------------------------------------------------------

def scale(args, results: dict) -> None:
    print(f"\n{'images':>8} {'decoded':>9} | {'decode s':>8} {'peak RSS':>9} {'anon':>7} {'PSS':>7} | "
          f"{'train':>8} {'img/s':>6} {'peak RSS':>9} {'anon':>7} {'file':>7} {'PSS':>7}  (MB)")
    for n in args.sizes:
        folder = make_folder(args.work, n, args.side)
        home = args.work / f"home-{n}"
        subprocess.run(["rm", "-rf", str(home)], check=True)
        env = env_for(home)
        seconds, dec_peak, out = run_sampled(child_cmd(args, "decode", folder, "decode", "auto"), env,
                                             args.work / f"decode-{n}.log")
        info = json.loads(out.strip().splitlines()[-1])
        row = {"images": n, "decoded_bytes": info["decoded_bytes"], "decode_s": round(info["seconds"], 1),
               "decode_peak": dec_peak}
        for mode in ("auto", "no"):
            _, peak, out = run_sampled(child_cmd(args, "train", folder, f"{n}-{mode}", mode), env,
                                       args.work / f"train-{n}-{mode}.log")
            row[f"train_{mode}"] = {"images_per_s": round(json.loads(out.strip().splitlines()[-1])["images_per_s"], 1),
                                    "peak": peak}
            t = row[f"train_{mode}"]
            print(f"{n:>8,} {mb(info['decoded_bytes']):>9} | {info['seconds']:>8.1f} {mb(dec_peak['rss']):>9} "
                  f"{mb(dec_peak['anon']):>7} {mb(dec_peak['pss']):>7} | {mode if mode == 'auto' else 'streamed':>8} "
                  f"{t['images_per_s']:>6.0f} {mb(peak['rss']):>9} {mb(peak['anon']):>7} {mb(peak['file']):>7} "
                  f"{mb(peak['pss']):>7}", flush=True)
        results.setdefault("scale", []).append(row)


def cifar(args, results: dict) -> None:
    home = args.work / "home-cifar"
    env = env_for(home)
    rounds = []
    for r in range(args.rounds):
        for mode in ("yes", "no") if r % 2 == 0 else ("no", "yes"):
            _, peak, out = run_sampled(child_cmd(args, "train", CIFAR, f"cifar-{mode}", mode), env,
                                       args.work / f"cifar-{mode}-{r}.log")
            ips = json.loads(out.strip().splitlines()[-1])["images_per_s"]
            rounds.append({"mode": "in memory" if mode == "yes" else "streamed", "round": r + 1,
                           "images_per_s": round(ips, 1), "peak_anon": peak["anon"], "peak_file": peak["file"]})
            print(f"CIFAR-10 round {r + 1}  {rounds[-1]['mode']:>9}: {ips:6.1f} img/s  peak anon {mb(peak['anon'])} "
                  f"MB, file pages {mb(peak['file'])} MB", flush=True)
    mem = [x["images_per_s"] for x in rounds if x["mode"] == "in memory"]
    streamed = [x["images_per_s"] for x in rounds if x["mode"] == "streamed"]
    ratio = sum(streamed) / sum(mem)
    print(f"CIFAR-10 streamed / in memory: {ratio:.3f} (mean of {len(mem)} alternated rounds each)")
    results["cifar"] = {"rounds": rounds, "streamed_over_in_memory": round(ratio, 3)}
    if "accuracy" in args.skip:
        return
    acc = {}
    for mode in ("yes", "no"):
        _, _, out = run_sampled(child_cmd(args, "accuracy", CIFAR, f"cifar-acc-{mode}", mode), env,
                                args.work / f"cifar-acc-{mode}.log")
        acc[mode] = json.loads(out.strip().splitlines()[-1])["top1"]
    print(f"CIFAR-10 10 %, 2 epochs, seed 0: test top-1 in memory {acc['yes']:.2%}, streamed {acc['no']:.2%}")
    results["cifar"].update(top1_in_memory=acc["yes"], top1_streamed=acc["no"])


def torchrun(args, results: dict) -> None:
    n = max(args.sizes)
    folder = make_folder(args.work, n, args.side)
    env = env_for(args.work / f"home-{n}")  # the cache the scale part wrote
    out = {}
    for procs in (1, 2):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
        _, peak, _ = run_sampled(child_cmd(args, "train", folder, f"ddp{procs}", "auto", launcher), env,
                                 args.work / f"torchrun-{procs}.log")
        out[procs] = peak
        print(f"torchrun {procs} process(es), {n:,} images: summed RSS {mb(peak['rss'])} MB (anon {mb(peak['anon'])}, "
              f"file {mb(peak['file'])}), PSS {mb(peak['pss'])} MB", flush=True)
    ratio = {k: out[2][k] / out[1][k] for k in ("rss", "pss")}
    print(f"torchrun 2 / 1 processes: RSS {ratio['rss']:.2f}x, PSS {ratio['pss']:.2f}x")
    results["torchrun"] = {"images": n, "one": out[1], "two": out[2], "ratio_rss": round(ratio["rss"], 3),
                           "ratio_pss": round(ratio["pss"], 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="10000,200000")
    p.add_argument("--side", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--model", default="fastnet-xs")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--work", type=Path, default=Path("/tmp/imgclf-data-scale"))
    p.add_argument("--rounds", type=int, default=2, help="CIFAR-10 speed rounds (alternated) per side")
    p.add_argument("--skip", default="", help="parts to leave out: scale, cifar, accuracy, torchrun")
    # child processes only
    p.add_argument("--child", choices=["decode", "train", "accuracy"])
    p.add_argument("--data")
    p.add_argument("--project")
    p.add_argument("--name")
    p.add_argument("--in-memory", default="auto")
    args = p.parse_args()
    if args.child:
        return child(args)
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    skip = args.skip = set(filter(None, args.skip.split(",")))
    steal0, total0 = cpu_steal()
    results: dict = {"machine": f"{os.cpu_count()} CPUs", "side": args.side, "steps": args.steps,
                     "model": args.model, "batch_size": args.batch_size}
    if "scale" not in skip:
        scale(args, results)
    if "cifar" not in skip:
        cifar(args, results)
    if "torchrun" not in skip:
        torchrun(args, results)
    steal1, total1 = cpu_steal()
    results["cpu_steal"] = round((steal1 - steal0) / max(1, total1 - total0), 4)
    print(f"CPU steal during the run: {results['cpu_steal']:.1%}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
