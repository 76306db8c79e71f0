"""Hooks into the training loop: :class:`Callback` for user code (progress, logging, early stops), and the
SIGINT handler that turns Ctrl-C into a clean stop after the current step."""
from __future__ import annotations

import signal
import sys
import threading
from typing import Any, Protocol

from tqdm.auto import tqdm


class Stoppable(Protocol):
    """What the hooks may ask of the running trainer (the loop itself knows nothing of callbacks' types)."""

    stop_requested: bool
    world: Any

    def request_stop(self) -> None: ...


class Callback:
    """Hooks into the loop; override what you need. ``trainer.request_stop()`` ends the run cleanly
    (``last`` is saved and the run can be resumed)."""

    def on_step_end(self, trainer: Stoppable, epoch: int, step: int, loss: float) -> None: ...

    def on_epoch_end(self, trainer: Stoppable, row: dict[str, float]) -> None: ...


class stop_on_sigint:
    """First Ctrl-C asks the loop to stop after the current step (so weights are never saved
    half-updated); a second one interrupts at once."""

    def __init__(self, trainer: Stoppable):
        self.trainer, self.previous = trainer, None

    def _handler(self, signum, frame):
        if self.trainer.stop_requested:
            raise KeyboardInterrupt
        self.trainer.request_stop()
        if self.trainer.world.is_main:  # torchrun passes Ctrl-C to every process; all stop at the same step
            tqdm.write("\nstopping after this step and saving `last` (Ctrl-C again to abort at once)", file=sys.stderr)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False
