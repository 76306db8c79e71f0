"""Learning-rate schedules: the builder training uses, and the step -> lr-factor functions behind them
(objects rather than lambdas, so a scheduler's state_dict saves them and a resumed run continues the same way).

    sched = build_scheduler(cfg, opt, steps_per_epoch)   # None for a constant lr
"""
from __future__ import annotations

import math

import torch

from ..config import TrainConfig


def build_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer, steps_per_epoch: int,
                     stem_epochs: float | None = None):
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle" and cfg.freeze_epochs:
        # fastai's fine_tune: the head-only epochs at the full (constant) lr, then one cycle for the whole net
        return torch.optim.lr_scheduler.LambdaLR(opt, PhasedOneCycle(cfg.freeze_epochs * steps_per_epoch, total))
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups],
                                                   total_steps=total,
                                                   cycle_momentum=cfg.optimizer == "sgd")
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    if cfg.schedule == "linear":  # straight down to 0 at the last step, no warm-up (the speed records')
        stem = StemDecay(round(stem_epochs * steps_per_epoch)) if stem_epochs else LinearDecay(total)
        return torch.optim.lr_scheduler.LambdaLR(opt, [stem if g.get("stem") else LinearDecay(total)
                                                       for g in opt.param_groups])
    if cfg.schedule == "plateau":
        mode = "max" if cfg.monitor == "val_acc" else "min"
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode=mode, factor=cfg.plateau_factor,
                                                          patience=cfg.plateau_patience)
    return None


class LinearDecay:
    """lr factor 1 -> 0 over ``total`` steps. An object, not a lambda, so the scheduler's state_dict saves
    ``total`` (a time budget may shorten it mid-run) and a resumed run decays the same way."""

    def __init__(self, total: int):
        self.total = total

    def __call__(self, step: int) -> float:
        return max(0.0, 1 - step / self.total)


class StemDecay(LinearDecay):
    """LinearDecay over the first ``total`` steps, then 0: for parameters that train early only. A class of its
    own so that a time budget's shortened schedule (which rewrites LinearDecay.total) leaves it alone."""


class PhasedOneCycle:
    """lr factor: 1 for the first ``flat`` steps (head-only training of a frozen backbone: nothing to warm up,
    and a new head learns fastest at the full rate), then one cycle over the rest: a cosine warm-up from 1/25
    over 30 % of it, and a cosine decay to 1/25000 (OneCycleLR's shape)."""

    def __init__(self, flat: int, total: int, warmup: float = 0.3):
        self.flat, self.total, self.warmup = flat, total, warmup

    def __call__(self, step: int) -> float:
        if step < self.flat:
            return 1.0
        span = max(1, self.total - self.flat)
        t = min(1.0, (step - self.flat) / span)
        lo, end = 1 / 25, 1 / 25_000
        if t < self.warmup:
            return lo + (1 - lo) * (1 - math.cos(math.pi * t / self.warmup)) / 2
        return end + (1 - end) * (1 + math.cos(math.pi * (t - self.warmup) / (1 - self.warmup))) / 2
