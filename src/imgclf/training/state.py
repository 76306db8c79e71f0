"""What changes while a run trains, in one typed object, and its round trip through ``last.safetensors``.

    state = TrainState.start(cfg, model, device, steps_per_epoch, fine_tuning, processes=1)
    state.restore(ckpt, model, device, cfg.seed, log, run_dir)   # a resumed run continues exactly
    save_checkpoint(path, model, meta, state.to_checkpoint(device))

Every random draw of the loop comes from the two generators here (or the global one, saved too), so a run
resumed from ``last`` ends with the same weights as one that was never interrupted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..checkpoint import Checkpoint
from ..config import TrainConfig
from ..errors import ImgclfError
from .optim import build_optimizer, match_state_layout
from .schedule import StemDecay, build_scheduler


@dataclass
class TrainState:
    optimizer: torch.optim.Optimizer
    scheduler: Any                          # a torch lr scheduler, or None for a constant lr
    g_shuffle: torch.Generator              # the epochs' order (CPU)
    g_augment: torch.Generator              # the augmentation's draws (on the training device)
    epochs: int                             # planned epochs: the config's, or fewer if the time budget says so
    stem_epochs: int | None = None          # epochs the model's stem parameters train for (see FastNet)
    epoch: int = 0                          # epochs done
    step: int = 0                           # steps done in the current epoch
    sums: list = field(default_factory=lambda: [0.0, 0, 0])  # the epoch so far: loss sum, correct, seen
    best_score: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0                     # epochs since the monitored score last improved
    history: list[dict[str, float]] = field(default_factory=list)  # one row per epoch (metrics.csv)
    shuffle_state: torch.Tensor | None = None  # g_shuffle at the current epoch's start: redraws its order

    @classmethod
    def start(cls, cfg: TrainConfig, model: torch.nn.Module, device: torch.device, steps_per_epoch: int,
              fine_tuning: bool, processes: int) -> TrainState:
        optimizer = build_optimizer(cfg, model, cfg.backbone_lr_mult if fine_tuning else 1.0)
        scheduler = build_scheduler(cfg, optimizer, steps_per_epoch, model.stem_bias_epochs)
        # FastNet's whitening bias: its lr reaches 0 after stem_bias_epochs (linear schedule), and from then on it
        # stops needing a gradient, which spares the backward pass the first conv's input gradient. In several
        # processes it stays as it is (DistributedDataParallel expects the same parameters to train throughout).
        decays = getattr(scheduler, "lr_lambdas", [])
        stem = (model.stem_bias_epochs if any(isinstance(fn, StemDecay) for fn in decays) and processes == 1
                else None)
        g_shuffle = torch.Generator(device="cpu").manual_seed(cfg.seed)
        g_augment = torch.Generator(device=device).manual_seed(cfg.seed + 1)
        return cls(optimizer, scheduler, g_shuffle, g_augment, epochs=cfg.epochs, stem_epochs=stem,
                   shuffle_state=g_shuffle.get_state())

    @property
    def stem_params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.optimizer.param_groups if g.get("stem") for p in g["params"]]

    def record(self, score: float, lower_is_better: bool, scored: bool) -> bool:
        """Keep the epoch's monitored score if it is the best so far; -> whether it improved. An epoch that was
        not scored (--val-every) is neither better nor worse."""
        improved = self.best_score is None or (score < self.best_score if lower_is_better else score > self.best_score)
        if not scored:
            return False
        if improved:
            self.best_score, self.best_epoch, self.bad_epochs = score, self.epoch + 1, 0
        else:
            self.bad_epochs += 1
        return improved

    def end_epoch(self, row: dict[str, float]) -> None:
        self.history.append(row)
        self.epoch, self.step, self.sums = self.epoch + 1, 0, [0.0, 0, 0]
        self.shuffle_state = self.g_shuffle.get_state()

    def to_checkpoint(self, device: torch.device) -> dict[str, Any]:
        """The ``train_state`` of ``last.safetensors``."""
        rng = {"torch": torch.get_rng_state(), "shuffle": self.shuffle_state, "augment": self.g_augment.get_state(),
               "device": device.type,  # the augment generator's kind: its state fits only that kind
               "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None}
        return {
            "epoch": self.epoch, "step": self.step, "sums": self.sums,
            "best_score": self.best_score, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
            "history": self.history, "rng": rng, "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
        }

    def restore(self, ckpt: Checkpoint, model: torch.nn.Module, device: torch.device, seed: int,
                log: Callable[[str], None], run_dir) -> None:
        """Continue from ``last``: weights, optimizer, schedule, generators and the figures so far."""
        ts = ckpt.train_state
        if len(ts["optimizer"]["param_groups"]) != len(self.optimizer.param_groups):
            raise ImgclfError(f"cannot resume {run_dir}: an older imgclf started it with another optimizer "
                              "layout; finish it with that version, or start a new run")
        model.load_state_dict({k: v.to(device) for k, v in ckpt.state_dict.items()})
        self.optimizer.load_state_dict(ts["optimizer"])
        match_state_layout(self.optimizer)
        if self.scheduler is not None and ts.get("scheduler") is not None:
            self.scheduler.load_state_dict(ts["scheduler"])
        torch.set_rng_state(ts["rng"]["torch"])
        if ts["rng"].get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ts["rng"]["cuda"])
        # older checkpoints did not say; a CPU generator's state is 5,056 bytes, a CUDA one's 16
        saved_on = ts["rng"].get("device") or ("cpu" if ts["rng"]["augment"].numel() > 16 else "cuda")
        if saved_on == device.type:
            self.g_augment.set_state(ts["rng"]["augment"])  # generator states are CPU byte tensors
        else:  # a CPU and a CUDA generator keep different states: draw from a seed fixed by the position
            self.g_augment.manual_seed(seed + 1 + 1_000_003 * (ts["epoch"] + 1) + ts["step"])
            log(f"resume: the run moved from {saved_on} to {device.type}; the weights, optimizer and "
                "schedule carry over, but the augmentation draws restart from the seed, so the rest of the "
                "run differs from one that stayed on one device")
        for k in ("epoch", "step", "sums", "best_score", "best_epoch", "bad_epochs", "history"):
            setattr(self, k, ts[k])
        self.shuffle_state = ts["rng"]["shuffle"]
        done = f"epoch {self.epoch}" + (f" + {self.step} steps" if self.step else "")
        log(f"resume {run_dir}: continuing after {done} (best epoch so far: {self.best_epoch})")
