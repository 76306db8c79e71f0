"""Plan a training run to finish, evaluated, inside a time budget (``imgclf train --time-budget 5m``).

    plan = plan_budget(seconds_left, n_train, n_eval, speeds, max_epochs=8, tta="flip+translate", tta_views=6)

The trainer measures each candidate model's training and inference speed on this machine for a step
(:class:`Speed`), then :func:`plan_budget` chooses. The rule, from the fast recipe's runs: a FastNet needs a
handful of epochs before width pays (a wide net's first epochs at a high learning rate are spent finding
its footing), so the plan takes the **widest candidate that fits at least MIN_EPOCHS epochs** (up to the
recipe's), else the one that fits the most epochs; test-time augmentation is kept when it costs no epoch.
While training, the trainer re-plans after every epoch from the epochs' real duration, shortening the
linear schedule if the machine turned out slower than measured.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..config import TrainConfig
from ..data.tensors import Normalizer, channel_stats, to_tensor
from ..errors import ImgclfError
from ..inference import autocast_context
from ..models import create_model
from .optim import build_optimizer
from .precision import autocast_dtype, scaled_backward, sync

MIN_EPOCHS = 5         # fewer than this, a narrower, faster FastNet trains better in the same time
SAFETY = 0.92          # plan to use this share of the time left: epochs vary, and the end must not overrun
FIXED_END_SECONDS = 4  # checkpoint + report + exit after the final evaluation
SPEED_ROUNDS = 2       # timed steps per candidate (after a warm-up), taken in turns; the fastest counts


@dataclass
class Speed:
    model: str
    train_ips: float       # training images per second (one optimisation step per batch)
    eval_ips: float        # inference images per second (eval mode, no gradients)


@dataclass
class Plan:
    model: str
    epochs: int
    tta: str | None
    train_seconds: float
    eval_seconds: float
    why: list[str] = field(default_factory=list)


def plan_budget(seconds_left: float, n_train: int, n_eval: int, speeds: list[Speed], *, max_epochs: int,
                tta: str | None, tta_views: int) -> Plan:
    """Choose (model, epochs, TTA) to fit ``seconds_left``. ``speeds``: the candidates, widest first.
    ``n_eval`` images are scored at the end (``tta_views`` more times each with TTA).

    A narrower candidate does less arithmetic than a wider one, so it is taken to be at least as fast: a
    measurement saying otherwise was slowed by something else on the machine (on a VM under load, fastnet-s
    once measured 570 img/s against fastnet-m's 661, and the plan picked fastnet-m for 3 epochs, of which 2
    fitted: 84.3 %, 64 s of the 5 minutes unused, where fastnet-s trains at ~1,100 img/s there)."""
    usable = seconds_left * SAFETY - FIXED_END_SECONDS
    measured, speeds, floor = speeds, [], Speed("", 0.0, 0.0)
    for sp in measured:
        floor = Speed(sp.model, max(floor.train_ips, sp.train_ips), max(floor.eval_ips, sp.eval_ips))
        speeds.append(floor)

    def fit(sp: Speed, views: int) -> tuple[int, float]:
        eval_s = n_eval * (1 + views) / sp.eval_ips
        return min(max_epochs, math.floor((usable - eval_s) / (n_train / sp.train_ips))), eval_s

    options = []
    for sp in speeds:
        epochs, eval_s = fit(sp, 0)
        with_tta, tta_s = fit(sp, tta_views) if tta else (-1, 0.0)
        if tta and with_tta == epochs:
            options.append(Plan(sp.model, epochs, tta, epochs * n_train / sp.train_ips, tta_s))
        else:
            options.append(Plan(sp.model, epochs, None, epochs * n_train / sp.train_ips, eval_s))
    feasible = [o for o in options if o.epochs >= 1]
    if not feasible:
        fastest = max(speeds, key=lambda s: s.train_ips)
        need = n_train / fastest.train_ips + n_eval / fastest.eval_ips + FIXED_END_SECONDS
        raise ImgclfError(f"the time budget leaves {seconds_left:.0f}s after start-up and data loading, but one "
                          f"epoch of {fastest.model} and its evaluation take about {need / SAFETY:.0f}s on this "
                          "machine: raise --time-budget, or train on less data (--fraction)")
    enough = [o for o in feasible if o.epochs >= min(MIN_EPOCHS, max_epochs)]
    plan = enough[0] if enough else max(feasible, key=lambda o: o.epochs)
    plan.why.append(f"time budget: {seconds_left:.0f}s left after start-up and data; measured "
                    + ", ".join(f"{s.model} {s.train_ips:.0f} img/s training, {s.eval_ips:.0f} inference"
                                for s in measured)
                    + ("" if speeds == measured else " (a narrower net is planned as at least as fast as a wider "
                       "one: the machine was busy during a measurement)"))
    reason = ("" if len(speeds) == 1 else
              f"the widest FastNet that fits {min(MIN_EPOCHS, max_epochs)}+ epochs" if enough else
              "no width fits enough epochs, so the one that fits the most")
    plan.why.append(f"plan: {plan.model} for {plan.epochs} epoch(s) ({plan.train_seconds:.0f}s) + final evaluation"
                    f"{' with ' + plan.tta + ' TTA' if plan.tta else ''} ({plan.eval_seconds:.0f}s)"
                    + (f": {reason}" if reason else ""))
    return plan


def measure_speeds(cfg: TrainConfig, names: list[str], ds, device: torch.device,
                   rounds: int = SPEED_ROUNDS) -> list[Speed]:
    """Training and inference images/s of each model in ``names`` on a real batch: one warm-up step each
    (kernel selection, allocations), then ``rounds`` timed steps taken in turn, model after model, and each
    model's fastest kept. On a shared machine a step can be slowed by other work (a VM's "steal"); taking
    turns spreads such a spell over the models instead of hitting one, and the fastest step is the one it
    spared. The global RNG is left as it was."""
    bs, ebs = min(cfg.batch_size, len(ds.train.y)), min(cfg.eval_batch_size, len(ds.train.y))
    norm = Normalizer(*channel_stats(ds.train.x[:1000]), device)
    x = norm(to_tensor(ds.train.x[:max(bs, ebs)], device)).contiguous(memory_format=torch.channels_last)
    y = torch.from_numpy(ds.train.y[:bs]).to(device)
    best = {name: [0.0, 0.0] for name in names}  # images/s: training, inference
    with torch.random.fork_rng(devices=[]):
        runs = []
        for name in names:
            model = create_model(name, num_classes=len(ds.classes), in_channels=ds.channels,
                                 image_size=ds.image_size).to(device, memory_format=torch.channels_last)
            runs.append((name, model, autocast_dtype(cfg.precision, device, model),
                         build_optimizer(dataclasses.replace(cfg, model=name), model)))
        for i in range(1 + rounds):  # round 0 warms up
            for name, model, dtype, opt in runs:
                model.train()
                t0 = time.perf_counter()
                with autocast_context(device, dtype):
                    loss = F.cross_entropy(model(x[:bs]).float(), y)
                scaled_backward(loss, bs, model)
                opt.step()
                opt.zero_grad(set_to_none=True)
                sync(device)
                train_ips = bs / (time.perf_counter() - t0)
                model.eval()
                with torch.no_grad(), autocast_context(device, dtype):
                    t0 = time.perf_counter()
                    model(x[:ebs])
                    sync(device)
                    eval_ips = ebs / (time.perf_counter() - t0)
                if i > 0:
                    best[name] = [max(best[name][0], train_ips), max(best[name][1], eval_ips)]
    return [Speed(name, *best[name]) for name in names]
