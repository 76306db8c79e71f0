"""kill -9 at random moments of training, then --resume: does every run end with the weights of a run that was
never interrupted? And does a killed run leave no process behind?

    python benchmarks/kill_resume.py --trials 20            # ~5 minutes on 2 cores

A small synthetic photo folder (24 px, 3 classes) is trained with the seed CNN in fp32 for a few epochs,
once without interruption (the reference weights), then per trial: a fresh cache folder (so the kill can also
land while the dataset cache is written), `imgclf train` started and sent SIGKILL after a random delay drawn
from the reference run's own duration (decode, epochs, checkpoint writes, the final test and report; halved
while the run ends before it), then `imgclf train --resume` on the run folder (from its `last`, or from the
start when the kill came before the first checkpoint), or the same command again when the kill came before
the run folder existed. Printed per trial: the delay, what the run folder held, whether the resume finished,
whether its `last` and `best` weights equal the reference bit for bit, and how many of the killed run's
processes outlived it (decode workers must leave with their parent). Exit status 1 unless every trial passes.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imgclf.checkpoint import load_checkpoint

TRAIN = ["--model", "seed-cnn", "--epochs", "4", "--batch-size", "16", "--precision", "fp32", "--no-progress",
         "--seed", "3", "--tta", "none"]


def make_folder(root: Path, per_class: int = 40, size: int = 24) -> Path:
    """train/ and test/ of 3 colour classes with noise: enough steps per epoch for kills to land mid-epoch."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", per_class // 4)):
        for c, colour in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200)]):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                px = np.clip(np.array(colour) + rng.normal(0, 60, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(px).save(folder / f"{i:03d}.png")
    return root


def _run(args: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imgclf", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _env(home: Path, marker: str) -> dict:
    # the marker finds the run's processes (decode workers included) in /proc afterwards
    return {**os.environ, "IMGCLF_HOME": str(home), "IMGCLF_KILL_TRIAL": marker}


def survivors(marker: str) -> list[int]:
    """Processes whose environment holds ``marker``: the killed run's leftovers."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if f"IMGCLF_KILL_TRIAL={marker}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.append(int(pid))
        except OSError:
            continue
    return found


def weights(run: Path, name: str) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / f"{name}.safetensors").state_dict


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _started(cmd: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "imgclf", *cmd], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600) -> float:
    """Seconds until ``path`` exists (or the process ended)."""
    t0 = time.monotonic()
    while not path.exists() and proc.poll() is None and time.monotonic() - t0 < timeout:
        time.sleep(0.02)
    return time.monotonic() - t0


def reference(data: Path, work: Path) -> tuple[dict, dict, float, float]:
    """The uninterrupted run: (last weights, best weights, seconds to its run folder, seconds after it)."""
    run = work / "runs" / "ref"
    proc = _started(["train", "--data", str(data), *TRAIN, "--project", str(work / "runs"), "--name", "ref"],
                    _env(work / "home-ref", "ref"))
    before = _wait_for(run / "config.toml", proc)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"the reference run failed:\n{err}")
    return weights(run, "last"), weights(run, "best"), before, time.monotonic() - t0


def trial(i: int, data: Path, work: Path, ref: tuple[dict, dict], phase: str, delay: float) -> dict:
    """One kill, ``delay`` seconds after the start (phase "start": start-up, decoding, the cache write) or after
    the run folder appeared (phase "run": epochs, checkpoints, the final test and report; the delay halved
    while the run ends first), then resume (or start again) to the end; -> what happened."""
    marker, name = f"t{i}-{os.getpid()}", f"trial{i}"
    home, run = work / f"home-{i}", work / "runs" / name
    env = _env(home, marker)
    cmd = ["train", "--data", str(data), *TRAIN, "--project", str(work / "runs"), "--name", name]
    for _ in range(5):
        proc = _started(cmd, env)
        if phase == "run":
            _wait_for(run / "config.toml", proc)
        time.sleep(delay)
        killed = proc.poll() is None
        proc.kill()
        proc.wait()
        if killed:
            break
        delay /= 2  # it ended first (the machine runs faster than during the reference): again, sooner
        shutil.rmtree(run, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)
    time.sleep(0.5)  # decode workers notice their parent is gone within their watchdog's period
    left = survivors(marker)
    for pid in left:  # do not let them disturb the next trial
        with contextlib.suppress(OSError):
            os.kill(pid, 9)
    held = [f for f in ("config.toml", "last.safetensors", "best.safetensors", "report.html") if (run / f).exists()]
    caching = [p.name for p in home.glob("**/*") if p.is_dir() and p.name.startswith(".")] if home.is_dir() else []
    if (run / "config.toml").is_file():  # --resume also restarts a run killed before its first checkpoint
        how, done = "resume", _run(["train", "--resume", str(run), "--no-progress"], env)
    else:  # killed before the run folder was written: what a user does is run the command again
        shutil.rmtree(run, ignore_errors=True)
        how, done = "again", _run(cmd, env)
    ok = done.returncode == 0
    equal = ok and same(weights(run, "last"), ref[0]) and same(weights(run, "best"), ref[1])
    return {"trial": i, "phase": phase, "delay_s": round(delay, 2), "killed": killed, "held": held,
            "cache_tmp": caching, "how": how, "finished": ok, "equal": equal, "survivors": len(left),
            "error": None if ok else done.stderr.strip()[-300:]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0, help="the kills' random delays")
    ap.add_argument("--work", type=Path, default=None, help="folder for data and runs (default: a temporary one)")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="imgclf-kill-"))
    data = make_folder(work / "data")
    *ref, before, after = reference(data, work)
    print(f"reference run: {before:.1f} s to its run folder (start-up, decode, cache write), {after:.1f} s after "
          f"it (4 epochs, checkpoints, test, report); machine: {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.backends.cpu.get_cpu_capability()}")
    rng = random.Random(args.seed)
    rows = []
    for i in range(args.trials):
        # every fourth kill before the run folder exists (decoding, the cache write), the rest while it trains
        phase = "start" if i % 4 == 0 else "run"
        row = trial(i, data, work, ref, phase, rng.uniform(0.2, before if phase == "start" else after))
        rows.append(row)
        print(f"trial {i:2d}: kill {row['delay_s']:5.2f} s after the {'start' if phase == 'start' else 'run folder'}"
              f" ({'running' if row['killed'] else 'already done'}),"
              f" run folder held {', '.join(row['held']) or 'nothing'}"
              f"{'; a cache entry was being written' if row['cache_tmp'] else ''}; {row['how']}: "
              f"{'finished' if row['finished'] else 'FAILED'}, weights "
              f"{'equal' if row['equal'] else 'DIFFER'}, {row['survivors']} process(es) outlived the kill"
              + (f"\n  {row['error']}" if row['error'] else ""), flush=True)
    good = sum(r["killed"] and r["finished"] and r["equal"] and r["survivors"] == 0 for r in rows)
    resumed = sum(r["how"] == "resume" for r in rows)
    print(f"{good}/{len(rows)} trials ended with the uninterrupted run's weights and no leftover process "
          f"({resumed} by --resume, {len(rows) - resumed} started again: killed before the run folder existed)")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if good == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
