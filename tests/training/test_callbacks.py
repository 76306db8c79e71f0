"""Callbacks on the training loop: Ctrl-C saves and exits cleanly, early stopping restores the best epoch."""
import json
import os
import signal

import pytest

from imgclf.checkpoint import load_checkpoint
from imgclf.training.callbacks import Callback

from support import train_run


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigint_saves_last_and_exits_cleanly(tiny_folder, tmp_path, sig):
    class CtrlC(Callback):
        def on_step_end(self, trainer, epoch, step, loss):
            if step == 0:
                os.kill(os.getpid(), sig)  # the real signal path, handled after the step

    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under `nohup ... &`
    before_term = signal.getsignal(signal.SIGTERM)
    r = train_run(tiny_folder, tmp_path, epochs=2, callbacks=[CtrlC()])
    assert r.status == "interrupted"
    assert json.loads((r.run_dir / "run.json").read_text())["status"] == "interrupted"
    ts = load_checkpoint(r.run_dir / "last.safetensors").train_state
    assert (ts["epoch"], ts["step"]) == (0, 1)
    assert signal.getsignal(signal.SIGINT) is before and signal.getsignal(signal.SIGTERM) is before_term  # restored


def test_early_stopping_restores_best(tiny_folder, tmp_path):
    r = train_run(tiny_folder, tmp_path, epochs=40, monitor="val_acc", patience=2, val_split=0.25, lr=3e-3, val_every=1)
    assert r.status == "early-stopped" and r.epochs_done < 40
    accs = [row["val_acc"] for row in r.history]
    assert r.best_epoch == accs.index(max(accs)) + 1  # first epoch reaching the best score
    best = load_checkpoint(r.run_dir / "best.safetensors")
    assert best.meta["epoch"] == r.best_epoch
    assert r.test_metrics["weights"].startswith(f"best (epoch {r.best_epoch})")
