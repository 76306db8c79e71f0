"""How long the whole run takes on this machine, said early and kept honest: a callback that times the first
training steps and then every epoch, and prints the expected duration of the whole command.

    eta    the whole run: about 21 min on this CPU (AVX2, fp32), ending around 14:32 (measured 3 steps)
    eta    about 16 min left, ending around 14:33

An epoch's training time scales with its images' pixel count (progressive resizing trains early epochs on
smaller images), a validation pass with the validation split's size; both are measured, never assumed from
another machine, so the figure holds on AVX2 laptops and AMX servers alike.
"""
from __future__ import annotations

import time
from datetime import datetime, timedelta

import torch

from ..inference import predict_logits
from .callbacks import Callback

TIMED_EVAL_PIXELS = 1 << 21  # pixels of training images timed in eval mode for the ETA (2k at 32 px, 81 at 160)
TIMED_STEPS = 3      # steps timed for the first estimate, after one warm-up step (kernel choice, allocations);
                     # the fastest counts: the first steps still run slower than the epochs do, and a step slowed
                     # by other work on the machine says nothing of the rest
EVAL_SHARE = 1 / 3   # before an evaluation batch is timed: a forward pass costs ~1/3 of a training step
END_SECONDS = 4      # checkpoint stamping, run.json and the report after the final test


class Eta(Callback):
    def __init__(self):
        self.said_first = False
        self.epoch_t0 = 0.0
        self.last: float | None = None  # when the previous step ended (the warm-up step first)
        self.steps: list[float] = []     # seconds of each timed step
        self.val_seconds_per_image: float | None = None

    def on_epoch_start(self, trainer, epoch):
        self.epoch_t0 = time.perf_counter()
        self.last, self.steps = None, []

    def on_step_end(self, trainer, epoch, step, loss):
        if self.said_first or epoch < (trainer.cfg.freeze_epochs or 0):  # head-only steps say nothing of the rest
            return
        now = time.perf_counter()
        if self.last is not None:
            self.steps.append(now - self.last)
        self.last = now
        timed = len(self.steps)
        if not timed:
            return
        if timed >= TIMED_STEPS or step + 1 == trainer.batches.steps_per_epoch:
            step_seconds = min(self.steps)
            if self.val_seconds_per_image is None:
                self.val_seconds_per_image = _eval_seconds_per_image(trainer)
            size = trainer.batches.input_size(epoch, trainer.state.epochs)
            epoch_seconds = step_seconds * trainer.batches.steps_per_epoch
            left = (1 - (step + 1) / trainer.batches.steps_per_epoch) * epoch_seconds
            left += self._after(trainer, epoch, epoch_seconds, size, include_this_validation=True)
            total = time.monotonic() - trainer.started + left
            trainer.log(f"eta    the whole run: about {duration(total)} {where(trainer.setup)}, "
                        f"ending around {_clock(left)} (measured {timed} steps)")
            self.said_first = True

    def on_epoch_end(self, trainer, row):
        state = trainer.state
        n_val = 0 if trainer.setup.val is None else len(trainer.setup.val.y)
        elapsed = time.perf_counter() - self.epoch_t0
        if n_val and elapsed - row["seconds"] > 0 and row["val_loss"] == row["val_loss"]:  # it validated
            self.val_seconds_per_image = (elapsed - row["seconds"]) / n_val
        if state.epoch >= state.epochs or trainer.early_stop or epoch_is_head_only(trainer, state.epoch - 1):
            return
        size = trainer.batches.input_size(state.epoch - 1, state.epochs)
        left = self._after(trainer, state.epoch - 1, row["seconds"], size, include_this_validation=False)
        trainer.log(f"eta    about {duration(left)} left, ending around {_clock(left)}")

    def _after(self, trainer, epoch: int, epoch_seconds: float, size: int, include_this_validation: bool) -> float:
        """Seconds from the end of ``epoch`` (trained in ``epoch_seconds`` at ``size`` px) to the run's end."""
        state, setup, cfg = trainer.state, trainer.setup, trainer.cfg
        n_val = 0 if setup.val is None else len(setup.val.y)
        per_image = epoch_seconds / max(1, len(trainer.batches))  # training, at this epoch's size
        full = per_image * (trainer.batches.image_size / size) ** 2  # ... and at the full size
        val_per_image = self.val_seconds_per_image or full * EVAL_SHARE
        every = 1 if cfg.val_every is None else cfg.val_every
        validated = [e for e in range(epoch if include_this_validation else epoch + 1, state.epochs)
                     if e + 1 >= state.epochs or (every > 0 and (e + 1) % every == 0)]
        sizes = trainer.batches.input_sizes(state.epochs)
        seconds = sum(epoch_seconds * (sizes[e] / size) ** 2 for e in range(epoch + 1, state.epochs))
        seconds += len(validated) * n_val * val_per_image
        if setup.ds.test is not None:
            tta = 0 if cfg.tta in (None, "none") else {"flip": 1, "translate": 2, "flip+translate": 5}.get(cfg.tta, 0)
            passes = tta + (0 if setup.val_is_test else 1)  # validating on test: its last pass is the final test's
            seconds += passes * len(setup.ds.test.y) * val_per_image
        return seconds + END_SECONDS


def _eval_seconds_per_image(trainer) -> float:
    """Time one evaluation batch of training images, as validation and the final test run them."""
    setup, cfg = trainer.setup, trainer.cfg
    # A few megapixels are enough to time: a whole evaluation batch of photos took 5 s of a 2-minute run.
    side = trainer.batches.image_size
    n = min(len(trainer.batches), cfg.eval_batch_size, max(16, TIMED_EVAL_PIXELS // (side * side)))
    x = trainer.batches.raw(torch.arange(n))
    for part in (x[:2], x):  # the first pass in eval mode pays for kernel selection: not timed
        t0 = time.perf_counter()
        predict_logits(setup.model, part, setup.normalizer, batch_size=cfg.eval_batch_size,
                       autocast_dtype=setup.autocast_dtype, channels_last=cfg.channels_last)
    return (time.perf_counter() - t0) / len(x)


def epoch_is_head_only(trainer, epoch: int) -> bool:
    return epoch < (trainer.cfg.freeze_epochs or 0)


def where(setup) -> str:
    """"on this CPU (AVX2, fp32)": what a time figure was measured on."""
    prec = "bf16" if setup.autocast_dtype else "fp32"
    return (f"on this CPU ({torch.backends.cpu.get_cpu_capability()}, {prec})" if setup.device.type == "cpu"
            else f"on {setup.device}")


def duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 20 * 60:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _clock(seconds_from_now: float) -> str:
    return (datetime.now() + timedelta(seconds=max(0.0, seconds_from_now))).strftime("%H:%M")
