"""The seed notebooks' recipe in Keras and in imgclf, on the same data, in one run.

    python benchmarks/vs_keras_seed.py            # installs TensorFlow-CPU into its own venv the first time
    python benchmarks/vs_keras_seed.py --epochs 2 --json out.json

Both sides train the seeds' CNN (3 x conv3x3-ReLU-maxpool 32/64/128, dense 128, dropout 0.5) with Adam 1e-3,
batch 64, no augmentation, validating on the test set after every epoch as the seeds do, on the same decoded
pixels of the shared CIFAR-10 JPEG copy:

- Keras: a script run by a separate virtual environment (``~/.cache/imgclf/keras-venv``, TensorFlow-CPU
  from the package index, created on first use) that loads the pixels from an .npz this script writes;
  its ``model.fit`` is timed, and the whole script.
- imgclf: ``imgclf train --data <copy> --model seed-cnn --recipe seed`` in a fresh process, timed from launch
  to exit (start-up, data, training, test, checkpoint and report all count), and its epochs' own seconds.

Prints both accuracies and the time ratios, and last one JSON line. Run it alone on the machine.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"
VENV = Path(os.environ.get("IMGCLF_KERAS_VENV", Path.home() / ".cache" / "imgclf" / "keras-venv"))
TF_REQUIREMENT = "tensorflow-cpu>=2.16,<2.21"

KERAS_SCRIPT = textwrap.dedent("""
    import json, sys, time
    t_start = time.perf_counter()
    import numpy as np
    import tensorflow as tf
    from tensorflow import keras
    from tensorflow.keras import layers
    npz, epochs, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    d = np.load(npz)
    x_train, y_train, x_test, y_test = d["xtr"] / 255.0, d["ytr"], d["xte"] / 255.0, d["yte"]
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((32, 32, 3)),
        layers.Conv2D(32, 3, activation="relu"), layers.MaxPooling2D(),
        layers.Conv2D(64, 3, activation="relu"), layers.MaxPooling2D(),
        layers.Conv2D(128, 3, activation="relu"), layers.MaxPooling2D(),
        layers.Flatten(), layers.Dense(128, activation="relu"), layers.Dropout(0.5),
        layers.Dense(10, activation="softmax")])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    t0 = time.perf_counter()
    hist = model.fit(x_train, y_train, batch_size=64, epochs=epochs, validation_data=(x_test, y_test), verbose=2)
    fit_s = time.perf_counter() - t0
    loss, acc = model.evaluate(x_test, y_test, verbose=0)
    json.dump({"tensorflow": tf.__version__, "fit_s": fit_s, "test_acc": float(acc),
               "best_val_acc": float(max(hist.history["val_accuracy"])), "params": model.count_params(),
               "script_s": time.perf_counter() - t_start}, open(out, "w"))
""")


def ensure_venv() -> Path:
    python = VENV / "bin" / "python"
    if not python.exists() or subprocess.run([str(python), "-c", "import tensorflow"], capture_output=True).returncode:
        print(f"installing {TF_REQUIREMENT} into {VENV} (first run only)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", TF_REQUIREMENT], check=True)
    return python


def run_keras(python: Path, work: Path, epochs: int) -> dict:
    import imgclf

    ds = imgclf.load_dataset(str(CIFAR), progress=False)
    np.savez(work / "cifar.npz", xtr=ds.train.x, ytr=ds.train.y, xte=ds.test.x, yte=ds.test.y)
    (work / "keras_seed.py").write_text(KERAS_SCRIPT)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    t0 = time.perf_counter()
    subprocess.run([str(python), str(work / "keras_seed.py"), str(work / "cifar.npz"), str(epochs),
                    str(work / "keras.json")], check=True, env=env)
    res = json.loads((work / "keras.json").read_text())
    res["wall_s"] = time.perf_counter() - t0
    return res


def run_imgclf(work: Path, epochs: int) -> dict:
    cmd = [sys.executable, "-m", "imgclf", "train", "--data", str(CIFAR), "--model", "seed-cnn", "--recipe", "seed",
           "--epochs", str(epochs), "--project", str(work / "runs"), "--name", "seed", "--no-progress"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    run = work / "runs" / "seed"
    info = json.loads((run / "run.json").read_text())
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return {"command": " ".join(["imgclf"] + cmd[3:-5]), "wall_s": wall,
            "train_s": sum(float(r["seconds"]) for r in rows), "test_acc": info["test_metrics"]["top1"],
            "last_epoch_val_acc": float(rows[-1]["val_acc"]), "precision": info["precision"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--json", help="also write the result here")
    a = ap.parse_args()
    python = ensure_venv()
    import torch

    with tempfile.TemporaryDirectory(prefix="imgclf-vs-keras-") as tmp:
        work = Path(tmp)
        keras = run_keras(python, work, a.epochs)
        ours = run_imgclf(work, a.epochs)
    result = {"machine": {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
                          "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__},
              "epochs": a.epochs, "keras": keras, "imgclf": ours,
              "ratio_imgclf_whole_vs_keras_fit": round(ours["wall_s"] / keras["fit_s"], 3),
              "ratio_imgclf_train_vs_keras_fit": round(ours["train_s"] / keras["fit_s"], 3)}
    print(f"\n{'':<10}{'test acc':>10}{'train s':>9}{'whole s':>9}")
    for name, r, secs, note in (("keras", keras, keras["fit_s"], f"TF {keras['tensorflow']}"),
                                ("imgclf", ours, ours["train_s"], ours["precision"])):
        print(f"{name:<10}{r['test_acc']:>10.2%}{secs:>9.0f}{r['wall_s']:>9.0f}   ({note})")
    print(f"imgclf's whole command took {result['ratio_imgclf_whole_vs_keras_fit']:.2f}x Keras's fit time "
          f"(its epochs alone {result['ratio_imgclf_train_vs_keras_fit']:.2f}x)")
    print(json.dumps(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
