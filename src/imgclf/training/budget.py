"""Plan a training run to finish, evaluated, inside a time budget (``imgclf train --time-budget 5m``).

    plan = measure_and_plan(cfg, ["fastnet", "fastnet-m", ...], ds, device, n_eval, tta, seconds_left)

The trainer measures candidate models' training and inference speed on this machine for a step
(:class:`Speed`), then :func:`plan_budget` chooses. The rule, from the fast recipe's runs: a FastNet needs a
handful of epochs before width pays (a wide net's first epochs at a high learning rate are spent finding
its footing), so the plan takes the **widest candidate that fits at least MIN_EPOCHS epochs** (up to the
recipe's), else the one that fits the most epochs; test-time augmentation is kept, with as many views as
cost no epoch. Where no width fits MIN_EPOCHS full-size epochs, the plan goes short (SHORT): the first two
thirds of its epochs at 0.75x the side, which cost about half as much, and half the batch, for twice the steps:
more epochs and steps in the same time train better than fewer full-size ones (benchmarks/README.md).
Candidates are measured from the narrowest up, and the wider ones that could not be chosen
are not measured at all: on a slow CPU one step of the widest FastNet costs seconds of the budget.
While training, the trainer re-plans after every epoch from the epochs' real duration, shortening the
linear schedule if the machine turned out slower than measured.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..config import TrainConfig, progressive_sizes
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
SHORT = {"progressive": "0.75:0.667", "batch_size": 500}  # a plan of fewer than MIN_EPOCHS epochs
SMALL_EPOCH_COST = 0.6  # an epoch at 0.75x the side against a full one: 0.56 by pixels, plus steps' fixed costs


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
    progressive: str | None = None  # set (with batch_size) when the plan goes short
    batch_size: int | None = None


def plan_budget(seconds_left: float, n_train: int, n_eval: int, speeds: list[Speed], *, max_epochs: int,
                tta: list[tuple[str, int]], short: bool = False) -> Plan:
    """Choose (model, epochs, TTA) to fit ``seconds_left``. ``speeds``: the candidates, widest first.
    ``n_eval`` images are scored at the end, once more per view with TTA; ``tta``: the TTA modes allowed,
    each with its number of views, most views first (empty: none). ``short``: a plan of too few epochs may go
    short (SHORT) where that fits more of them (the user chose neither batch size nor progressive resizing).

    A narrower candidate does less arithmetic than a wider one, so it is taken to be at least as fast: a
    measurement saying otherwise was slowed by something else on the machine (a VM's steal), and believing it
    would plan a wider net for fewer epochs than fit."""
    measured, speeds = speeds, _floored(speeds)
    options = _options(seconds_left, n_train, n_eval, speeds, max_epochs, tta)
    feasible = [o for o in options if o.epochs >= 1]
    if not feasible:
        fastest = max(speeds, key=lambda s: s.train_ips)
        need = n_train / fastest.train_ips + n_eval / fastest.eval_ips + FIXED_END_SECONDS
        raise ImgclfError(f"the time budget leaves {seconds_left:.0f}s after start-up and data loading, but one "
                          f"epoch of {fastest.model} and its evaluation take about {need / SAFETY:.0f}s on this "
                          "machine: raise --time-budget, or train on less data (--fraction)")
    enough = [o for o in feasible if o.epochs >= min(MIN_EPOCHS, max_epochs)]
    plan = enough[0] if enough else max(feasible, key=lambda o: o.epochs)
    if short and not enough:
        speed = next(sp for sp in speeds if sp.model == plan.model)
        shorter = _options(seconds_left, n_train, n_eval, [speed], max_epochs, tta, short=True)[0]
        plan = shorter if shorter.epochs > plan.epochs else plan
    plan.why.append(f"time budget: {seconds_left:.0f}s left after start-up and data; measured "
                    + ", ".join(f"{s.model} {s.train_ips:.0f} img/s training, {s.eval_ips:.0f} inference"
                                for s in measured)
                    + ("" if speeds == measured else " (a narrower net is planned as at least as fast as a wider "
                       "one: the machine was busy during a measurement)"))
    reason = ("" if len(speeds) == 1 else
              f"the widest FastNet that fits {min(MIN_EPOCHS, max_epochs)}+ epochs" if enough else
              "no width fits enough epochs, so the one that fits the most")
    shape = (f" (the first {_small_epochs(plan.epochs)} at 0.75x the side, batch {plan.batch_size})"
             if plan.progressive else "")
    plan.why.append(f"plan: {plan.model} for {plan.epochs} epoch(s){shape} ({plan.train_seconds:.0f}s) + final "
                    "evaluation"
                    f"{' with ' + plan.tta + ' TTA' if plan.tta else ''} ({plan.eval_seconds:.0f}s)"
                    + (f": {reason}" if reason else ""))
    return plan


def _floored(speeds: list[Speed]) -> list[Speed]:
    """Each candidate (widest first) at least as fast as every wider one."""
    out, floor = [], Speed("", 0.0, 0.0)
    for sp in speeds:
        floor = Speed(sp.model, max(floor.train_ips, sp.train_ips), max(floor.eval_ips, sp.eval_ips))
        out.append(floor)
    return out


def _small_epochs(epochs: int) -> int:
    """How many of a short plan's ``epochs`` train at the reduced side."""
    return sum(side < 100 for side in progressive_sizes(SHORT["progressive"], 100, epochs))


def _short_cost(epochs: int) -> float:
    """A short plan's ``epochs`` in full-size epochs."""
    return epochs - (1 - SMALL_EPOCH_COST) * _small_epochs(epochs)


def _options(seconds_left: float, n_train: int, n_eval: int, speeds: list[Speed], max_epochs: int,
             tta: list[tuple[str, int]], short: bool = False) -> list[Plan]:
    """Each candidate's most epochs (``short``: as a short plan), with the richest TTA that costs none of them."""
    usable = seconds_left * SAFETY - FIXED_END_SECONDS
    cost = _short_cost if short else float

    def fit(sp: Speed, views: int) -> tuple[int, float]:
        eval_s = n_eval * (1 + views) / sp.eval_ips
        room = (usable - eval_s) / (n_train / sp.train_ips)  # in full-size epochs
        epochs = math.floor(room) if room < 1 else 1  # cost() grows by at most 1 an epoch
        while epochs < max_epochs and cost(epochs + 1) <= room:
            epochs += 1
        return min(max_epochs, epochs), eval_s

    options = []
    for sp in speeds:
        epochs, eval_s = fit(sp, 0)
        mode = None
        for name, views in tta:
            with_tta, tta_s = fit(sp, views)
            if with_tta == epochs:
                mode, eval_s = name, tta_s
                break
        extra = SHORT if short else {}
        options.append(Plan(sp.model, epochs, mode, cost(epochs) * n_train / sp.train_ips, eval_s, **extra))
    return options


def measure_and_plan(cfg: TrainConfig, names: list[str], ds, device: torch.device, n_eval: int,
                     tta: list[tuple[str, int]], seconds_left: Callable[[], float], short: bool = False) -> Plan:
    """Measure the candidates ``names`` (widest first) from the narrowest up and plan with
    :func:`plan_budget`. The two narrowest are measured together, then one wider at a time, until a width
    fits fewer than MIN_EPOCHS epochs and fewer than the narrowest: every wider one, planned as no faster,
    fits no more, so none of them could be chosen."""
    pending, speeds = names[::-1], []  # narrowest first
    while pending:
        take = 2 if not speeds else 1
        speeds += measure_speeds(cfg, pending[:take], ds, device)
        pending = pending[take:]
        if pending:
            options = _options(seconds_left(), len(ds.train.y), n_eval, _floored(speeds[::-1]), cfg.epochs, tta)
            widest, narrowest = options[0].epochs, options[-1].epochs
            if widest < min(MIN_EPOCHS, cfg.epochs) and widest < narrowest:
                break
    plan = plan_budget(seconds_left(), len(ds.train.y), n_eval, speeds[::-1], max_epochs=cfg.epochs, tta=tta,
                       short=short)
    if pending:
        plan.why.insert(1, f"not measured: {', '.join(pending[::-1])} (wider; no more epochs would fit)")
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
