"""Hooks into the training loop, and the built-in behaviours written on them: checkpoints and the run folder,
early stopping, the time budget, Ctrl-C and BatchNorm kept frozen while fine-tuning.

    class Every100(Callback):
        def on_step_end(self, trainer, epoch, step, loss):
            if step % 100 == 0: print(epoch, step, loss)
    imgclf.train(data=..., callbacks=[Every100()])

The loop calls each hook on every callback in turn: the built-in ones first, then the user's. A hook may
call ``trainer.request_stop()``; the run then ends cleanly after the current step with ``last`` saved.
"""
from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm.auto import tqdm

from .schedule import LinearDecay


class Callback:
    """Hooks into the loop; override what you need. ``trainer`` is the running
    :class:`~imgclf.training.train.Trainer` (``trainer.model``, ``trainer.state``, ``trainer.setup``, ...)."""

    def on_train_start(self, trainer: Any) -> None: ...

    def on_epoch_start(self, trainer: Any, epoch: int) -> None: ...

    def on_step_end(self, trainer: Any, epoch: int, step: int, loss: float) -> None: ...

    def on_epoch_end(self, trainer: Any, row: dict[str, float]) -> None: ...

    def on_train_end(self, trainer: Any, status: str) -> None:
        """After the last epoch, an early stop or an interruption (``status``); also when the loop raised
        (``"failed"``)."""

    def on_run_end(self, trainer: Any, status: str, test_metrics: dict[str, Any] | None) -> None:
        """Once, when the run is over: after the final test and the report, with ``status`` as in
        ``on_train_end`` and the test metrics (None on the processes that do not test, and when interrupted);
        or after training started, when the run failed (``"failed"``) or a second Ctrl-C aborted it
        (``"aborted"``)."""


class Checkpointing(Callback):
    """``last`` after every epoch (and at an interruption mid-epoch), ``best`` when the monitored score improved,
    metrics.csv: one process writes, and ``last`` goes first, so a crash between the writes leaves a
    consistent state to resume from."""

    def on_epoch_end(self, trainer, row):
        state = trainer.state
        trainer.save_last()
        if trainer.world.is_main:
            if state.best_epoch == state.epoch:  # this epoch improved
                trainer.save_best(row)
            trainer.write_metrics()

    def on_train_end(self, trainer, status):
        if status == "interrupted" and trainer.state.step > 0:  # stopped mid-epoch: save where it stands
            trainer.save_last()


class EarlyStopping(Callback):
    """Stop when the monitored score has not improved for ``patience`` epochs."""

    def __init__(self, patience: int | None, monitor: str):
        self.patience, self.monitor = patience, monitor

    def on_epoch_end(self, trainer, row):
        state = trainer.state
        if self.patience and state.bad_epochs >= self.patience:
            trainer.early_stop = (f"early stopping: {self.monitor} has not improved for {self.patience} epochs "
                                  f"(best epoch {state.best_epoch})")


class TimeBudget(Callback):
    """With ``--time-budget``: end an epoch early when the final evaluation would no longer fit, and after each
    epoch plan fewer epochs if the rest will not fit at this epoch's pace, making the linear schedule reach 0
    at the new end (a slower machine than measured, or a busy one)."""

    def __init__(self, budget_seconds: float, end_seconds: float, started: float):
        self.budget, self.end_seconds, self.started = budget_seconds, end_seconds, started
        self.epoch_started = 0.0

    def seconds_left(self) -> float:
        """Of the time budget, what is left once the final evaluation and files are paid for."""
        return self.budget - (time.monotonic() - self.started) - self.end_seconds

    def on_epoch_start(self, trainer, epoch):
        self.epoch_started = time.perf_counter()

    def on_step_end(self, trainer, epoch, step, loss):
        if step + 1 < trainer.batches.steps_per_epoch and trainer.world.any(self.seconds_left() < 0):
            trainer.log("time budget: ending this epoch early to leave time for the final evaluation")
            trainer.state.epochs = epoch + 1
            trainer.end_epoch_now = True

    def on_epoch_end(self, trainer, row):
        trainer.state.epochs = trainer.world.from_main(lambda: self._replan(trainer))

    def _replan(self, trainer) -> int:
        state, schedule = trainer.state, trainer.cfg.schedule
        done, epoch_seconds = state.epoch, time.perf_counter() - self.epoch_started
        # an epoch's time follows its pixels: after a reduced-size epoch (progressive) a full one costs more
        sizes = trainer.batches.input_sizes(state.epochs)
        fit, left, unit = done, self.seconds_left(), epoch_seconds / sizes[done - 1] ** 2
        while fit < state.epochs and left >= unit * sizes[fit] ** 2:
            left, fit = left - unit * sizes[fit] ** 2, fit + 1
        if fit >= state.epochs:
            return state.epochs
        trainer.log(f"time budget: epochs take {epoch_seconds:.0f}s here, so the run ends after epoch "
                    f"{max(fit, done)} instead of {state.epochs}"
                    + ("; the lr schedule is shortened to match" if schedule == "linear" else ""))
        if isinstance(state.scheduler, torch.optim.lr_scheduler.LambdaLR):
            for fn in state.scheduler.lr_lambdas:
                if type(fn) is LinearDecay:  # not StemDecay: the stem's epochs stay as they were
                    fn.total = max(fit, done + 1) * trainer.batches.steps_per_epoch
        return max(fit, done)


class FrozenBatchNorm(Callback):
    """While fine-tuning, BatchNorm layers normalise with the pretrained statistics, not those of a few small
    batches of new images (on the photo benchmark the first fine-tuning epoch reached 86.7 % validation
    instead of 69.2 %); their scale and shift still learn."""

    def on_epoch_start(self, trainer, epoch):
        keep_batchnorm_statistics(trainer.model)


def keep_batchnorm_statistics(model: torch.nn.Module) -> None:
    """BatchNorm layers to inference mode (their running statistics used and kept), the rest as they are."""
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.eval()


class StopOnSigint(Callback):
    """The first Ctrl-C (or SIGTERM, as schedulers and ``docker stop`` send) asks the loop to stop after the
    current step, so weights are never saved half-updated and ``last`` holds the step reached; a second one
    interrupts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.previous: dict[int, Any] = {}
        self.trainer = None

    def _handler(self, signum, frame):
        if self.trainer.stop_requested:
            raise KeyboardInterrupt
        self.trainer.request_stop()
        if self.trainer.world.is_main:  # torchrun passes Ctrl-C to every process; all stop at the same step
            again = "Ctrl-C" if signum == signal.SIGINT else "the signal"
            tqdm.write(f"\nstopping after this step and saving `last` ({again} again to abort at once)",
                       file=sys.stderr)

    def on_train_start(self, trainer):
        self.trainer = trainer
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._handler) for sig in self.SIGNALS}

    def on_train_end(self, trainer, status):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}
