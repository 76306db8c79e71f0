"""Plan a photo run before its first epoch: how many epochs, at what crop size, with how much of the backbone
frozen, and how long it will take on this machine; with ``--time-budget``, the plan that fits.

    plan = plan_photos(cfg, user_cfg, n_train, n_eval, num_classes, image_size, device, seconds_left)
    plan.cfg          # the config to train with (epochs, progressive, freeze_blocks filled in)
    plan.seconds      # expected seconds from now to the end of the command

The epochs follow the folder's size when the user leaves them to the recipe: a small folder gets more
epochs, so that the fine-tuning makes at least MIN_STEPS optimisation steps (~200 photos make 6 steps an
epoch: 5 fine-tuning epochs scored 89.4 % on such a set, 9 scored 93.5 %); a large one fewer, so that it sees
at most MAX_IMAGES images (a folder of 15,000 gets 2 fine-tuning epochs, and ends in minutes, not an hour).

The time is predicted from one measured training step at the crops' size and one inference chunk at the test
size, with the model built here without its weights (speed does not depend on them): the head-only epoch's
feature pass, the fine-tuning epochs (the last at full size, its cost scaled by its pixels), validation, the
test and the files. With a time budget the planner goes through, in order of preference, the recipe's crops
(0.8x the side), smaller ones (0.7x, 0.6x, 0.5x: the last epoch at full size fixes the train-test resolution
gap, as in Touvron et al. 2019), then the same with a deeper frozen backbone, and takes the first that keeps
the recipe's fine-tuning epochs; failing that, the first that keeps MIN_FINE_TUNE; failing that, the one
that fits the most. The trainer's TimeBudget callback keeps the end inside the budget whatever the machine
does meanwhile.
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
from ..errors import ImgclfError
from ..inference import eval_chunk
from ..models import create_model
from .augment import build_augment
from .budget import SAFETY
from .callbacks import keep_batchnorm_statistics
from .eta import TIMED_EVAL_PIXELS
from .optim import build_optimizer

MIN_STEPS = 120            # fine-tuning steps a small folder gets at least (epochs raised up to MAX_EPOCHS)
MAX_EPOCHS = 20
MAX_IMAGES = 40_000        # images a large folder's fine-tuning sees at most (epochs lowered down to 2)
MIN_FINE_TUNE = 3          # with a budget: fewer fine-tuning epochs than this, smaller crops train better
SCALES = (0.8, 0.7, 0.6, 0.5)  # crop side / test side for all but the last fine-tuning epoch
DEEPER_FREEZE = 4          # blocks more frozen when the smallest crops do not fit (Lite0: up to the 80-ch stage)
DEFAULT_BUDGET = 14 * 60  # without --epochs or --time-budget, a run that would take longer is planned to fit this
END_SECONDS = 8            # the checkpoint, run.json and the report after the final test
TIMED_STEPS = 3            # after one warm-up step
SMALLER_EXPONENT = 1.5     # a crop of side s / r costs 1 / r ** this of one of side s


@dataclass
class PhotoPlan:
    cfg: TrainConfig
    seconds: float                 # expected seconds from the plan to the command's end
    started_at: float              # time.monotonic() when planned
    end_seconds: float             # what the final evaluation and files take (the time budget keeps it)
    why: list[str] = field(default_factory=list)

    def describe(self, image_size: int) -> str:
        cfg = self.cfg
        sizes = progressive_sizes(cfg.progressive, image_size, cfg.epochs)[cfg.freeze_epochs:]
        crops = " -> ".join(f"{s}px x{sizes.count(s)}" for s in dict.fromkeys(sizes))
        frozen = f"stem + {cfg.freeze_blocks - 1} blocks frozen" if cfg.freeze_blocks else "nothing frozen"
        return (f"{cfg.model}, {cfg.freeze_epochs} head-only epoch(s) + {cfg.epochs - cfg.freeze_epochs} "
                f"fine-tuning ({crops}), {frozen}, tested at {image_size}px")


def recipe_epochs(n_train: int, batch_size: int, recipe_epochs: int, freeze_epochs: int) -> int:
    """The photo recipe's epochs (head-only ones included) for a folder of ``n_train`` training images."""
    fine_tune = recipe_epochs - freeze_epochs
    steps = math.ceil(n_train / batch_size)
    if steps * fine_tune < MIN_STEPS:
        fine_tune = min(MAX_EPOCHS, math.ceil(MIN_STEPS / steps))
    elif n_train * fine_tune > MAX_IMAGES:
        fine_tune = max(2, MAX_IMAGES // n_train)
    return freeze_epochs + fine_tune


def plan_photos(cfg: TrainConfig, user_cfg: TrainConfig, n_train: int, n_eval: int, num_classes: int,
                image_size: int, device: torch.device, elapsed: Callable[[], float],
                build: Callable[[], torch.nn.Module] | None = None) -> PhotoPlan:
    """The plan for a photo run (see the module docstring). ``n_eval``: images scored after training
    (validation and test); ``elapsed``: seconds since the command started (what ``cfg.time_budget`` counts);
    ``build``: a new model as the run will train it, where ``cfg.model`` alone does not say (a pruned one)."""
    t0 = time.monotonic()
    why: list[str] = []
    if user_cfg.epochs is None:
        epochs = recipe_epochs(n_train, cfg.batch_size, cfg.epochs, cfg.freeze_epochs)
        if epochs != cfg.epochs:
            why.append(f"{epochs - cfg.freeze_epochs} fine-tuning epochs instead of the recipe's "
                       f"{cfg.epochs - cfg.freeze_epochs}: "
                       + (f"at least {MIN_STEPS} steps for a small folder" if epochs > cfg.epochs else
                          f"at most {MAX_IMAGES:,} images for a large one") + " (--epochs to choose)")
        cfg = dataclasses.replace(cfg, epochs=epochs)
    speeds = _Speeds(cfg, num_classes, image_size, device, build)

    def made(plan_cfg: TrainConfig, notes: list[str]) -> PhotoPlan:
        return PhotoPlan(plan_cfg, _predict(plan_cfg, speeds, n_train, n_eval, image_size), t0,
                         n_eval / speeds.eval_ips() + END_SECONDS, [*notes, speeds.describe()])

    if cfg.time_budget is None:
        seconds = _predict(cfg, speeds, n_train, n_eval, image_size)
        if user_cfg.epochs is not None or elapsed() + seconds <= DEFAULT_BUDGET:
            return made(cfg, why)
        why.append(f"the recipe would take about {(elapsed() + seconds) / 60:.0f} min here: planned to end within "
                   f"{DEFAULT_BUDGET / 60:.0f} min (--time-budget or --epochs to choose)")
        cfg = dataclasses.replace(cfg, time_budget=DEFAULT_BUDGET)

    def seconds_left() -> float:
        return cfg.time_budget - elapsed()

    scale = _scale(cfg.progressive)
    freezes = [cfg.freeze_blocks]
    if user_cfg.freeze_blocks is None and cfg.freeze_blocks:
        freezes.append(cfg.freeze_blocks + DEEPER_FREEZE)
    scales = [scale] if user_cfg.progressive is not None or scale is None else [s for s in SCALES if s <= scale]
    trials = [dataclasses.replace(cfg, freeze_blocks=f, progressive=_with_scale(cfg.progressive, s))
              for f in freezes for s in scales]
    fits: list[TrainConfig] = []
    best = None
    for enough in dict.fromkeys((cfg.epochs - cfg.freeze_epochs, min(MIN_FINE_TUNE, cfg.epochs - cfg.freeze_epochs))):
        for trial in trials:  # in order of preference; a deeper frozen backbone is measured only when reached
            fit = _most_epochs(trial, speeds, n_train, n_eval, image_size, seconds_left() * SAFETY)
            fits += [fit] if fit is not None else []
            if fit is not None and fit.epochs - fit.freeze_epochs >= enough:
                best = fit
                break
        if best is not None:
            break
    if not fits and user_cfg.time_budget is None:  # the default budget cannot be kept: the cheapest plan
        cheapest = dataclasses.replace(trials[-1], epochs=cfg.freeze_epochs + 1, time_budget=None)
        seconds = _predict(cheapest, speeds, n_train, n_eval, image_size)
        why[-1] = (f"the recipe would take about {(elapsed() + seconds) / 60:.0f} min here even with 1 epoch, "
                   f"smaller crops and more frozen; --fraction trains on fewer photos")
        return made(cheapest, why)
    if not fits:
        need = _predict(dataclasses.replace(trials[-1], epochs=cfg.freeze_epochs + 1), speeds, n_train, n_eval,
                        image_size)
        raise ImgclfError(f"the time budget leaves {seconds_left():.0f}s after start-up and decoding, but one "
                          f"fine-tuning epoch of {cfg.model} on {n_train:,} photos and its evaluation take about "
                          f"{need / SAFETY:.0f}s on this machine: raise --time-budget, or train on fewer photos "
                          "(--fraction) or smaller ones (--image-size)")
    best = best or max(fits, key=lambda f: f.epochs)  # the most epochs; of equals, the larger crops
    return made(best, [*why, f"time budget: {seconds_left():.0f}s left after start-up and decoding"])


def _scale(progressive: str | None) -> float | None:
    """The crops' scale of a one-stretch progressive spec ("0.8:0.8" -> 0.8), None for none."""
    if not progressive or progressive == "none" or "," in progressive:
        return None
    return float(progressive.split(":")[0])


def _with_scale(progressive: str | None, scale: float | None) -> str | None:
    """A one-stretch progressive spec with its scale replaced, its share kept."""
    if scale is None or _scale(progressive) is None:
        return progressive
    return f"{scale:g}:{progressive.split(':')[1]}"


def _most_epochs(cfg: TrainConfig, speeds: _Speeds, n_train: int, n_eval: int, image_size: int,
                 budget: float) -> TrainConfig | None:
    """``cfg`` with the most epochs (up to its own) whose predicted time fits ``budget``; None if none."""
    for epochs in range(cfg.epochs, cfg.freeze_epochs, -1):
        trial = dataclasses.replace(cfg, epochs=epochs)
        if _predict(trial, speeds, n_train, n_eval, image_size) <= budget:
            return trial
    return None


def _predict(cfg: TrainConfig, speeds: _Speeds, n_train: int, n_eval: int, image_size: int) -> float:
    """Seconds from now to the end of a run of ``cfg``."""
    sizes = progressive_sizes(cfg.progressive, image_size, cfg.epochs)[cfg.freeze_epochs:]
    eval_ips = speeds.eval_ips()
    seconds = n_train / eval_ips if cfg.freeze_epochs else 0.0  # the head-only epochs' feature pass
    seconds += min(n_train, max(16, TIMED_EVAL_PIXELS // image_size ** 2)) / eval_ips  # the ETA's timing
    for size in sizes:
        seconds += n_train / speeds.train_ips(cfg.freeze_blocks, size)
    return seconds + n_eval / eval_ips + END_SECONDS


class _Speeds:
    """Images/s measured once per (frozen blocks, crop size) and kept: the model built without weights, a
    random batch augmented as the recipe does, one warm-up step and TIMED_STEPS timed ones (their median).
    A size not measured is predicted from the nearest measured one: a larger one in proportion to its pixels,
    a smaller one by the side's ratio to the power SMALLER_EXPONENT (small crops gain less than their pixels:
    Lite0's step at 96 px ran 1.35-1.6x faster than at 128 px, 1.78x fewer pixels, on 2 AVX2 cores)."""

    def __init__(self, cfg: TrainConfig, num_classes: int, image_size: int, device: torch.device,
                 build: Callable[[], torch.nn.Module] | None = None):
        self.cfg, self.k, self.image_size, self.device, self.build = cfg, num_classes, image_size, device, build
        self.measured: dict[tuple[int, int], float] = {}
        self.eval: float | None = None
        self.said: dict[str, float] = {}

    def describe(self) -> str:
        return "plan: measured " + ", ".join(f"{v:.0f} img/s {k}" for k, v in self.said.items())

    def train_ips(self, freeze: int | None, size: int) -> float:
        freeze = freeze or 0  # None (a model with nothing frozen, e.g. seed-cnn) is 0: None means inference below
        if not any(f == freeze for f, _ in self.measured):
            first = progressive_sizes(self.cfg.progressive, self.image_size, self.cfg.epochs)[self.cfg.freeze_epochs]
            self._measure(freeze, first)
        near = min((s for f, s in self.measured if f == freeze), key=lambda s: abs(s - size))
        return self.measured[(freeze, near)] * (near / size) ** (SMALLER_EXPONENT if size < near else 2)

    def eval_ips(self) -> float:
        if self.eval is None:
            self._measure(None, self.image_size)
        return self.eval

    def _model(self, freeze: int | None):
        model = self.build() if self.build is not None else create_model(
            self.cfg.model, num_classes=self.k, in_channels=3, image_size=self.image_size)
        if model.num_classes != self.k:  # a checkpoint of other classes, as the run replaces its head
            model.reset_classifier(self.k)
        model = model.to(self.device, memory_format=torch.channels_last)
        model.freeze_early_blocks(freeze or 0)
        return model

    def _measure(self, freeze: int | None, size: int) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = self._model(freeze)
            if freeze is None:  # inference at the test size, a chunk at a time as evaluation runs it
                n = eval_chunk(self.cfg.eval_batch_size, size * size, self.device)
                x = torch.randn(n, 3, size, size, device=self.device).contiguous(memory_format=torch.channels_last)
                model.eval()
                with torch.no_grad():
                    self.eval = n / _median_seconds(lambda: model(x), self.device)
                self.said[f"inference at {size}px"] = self.eval
                return
            bs, side = self.cfg.batch_size, self.image_size
            raw = torch.randn(bs, 3, side, side, device=self.device)
            y = torch.randint(0, self.k, (bs,), device=self.device)
            augment, g = build_augment(self.cfg.augment, side), torch.Generator(self.device).manual_seed(0)
            opt = build_optimizer(self.cfg, model)
            model.train()
            keep_batchnorm_statistics(model)  # as fine-tuning trains

            def step():  # as the loop's: the batch augmented and resized on the device, then the update
                x = augment(raw, g)
                if size != side:
                    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
                F.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), y).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            ips = bs / _median_seconds(step, self.device)
            self.measured[(freeze, size)] = ips
            self.said[f"training at {size}px ({freeze} blocks frozen)"] = ips


def _median_seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of ``fn``: the median of TIMED_STEPS after a warm-up call (kernel choice,
    allocations). The median, not the fastest: a plan must hold for the whole epoch, busy spells included."""
    times = []
    for i in range(1 + TIMED_STEPS):
        t = time.perf_counter()
        fn()
        _sync(device)
        if i:
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
