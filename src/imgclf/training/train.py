"""Train a classifier and leave a run folder with its evidence.

    result = imgclf.train(data="../shared/datasets/cifar10-jpeg.tar.gz", model="seed-cnn", epochs=10)
    result = imgclf.train(resume="runs/cifar10-seed-cnn")          # continue exactly where it stopped

The loop in :func:`_fit` reads top to bottom: for each epoch, shuffle with a seeded generator, normalise
and augment whole batches on the device, step, validate, save ``last`` (and ``best`` when the monitored
score improves), stop early when asked. Everything random draws from explicit generators whose states are
saved in ``last``, so a resumed run ends with the same weights as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm.auto import tqdm

from .._version import __version__
from ..checkpoint import load_checkpoint, save_checkpoint
from ..config import TrainConfig, progressive_sizes
from ..data import BUILTINS, Dataset, Preprocess, Split, load_dataset
from ..data.split import stratified_split
from ..data.tensors import Normalizer, channel_stats, to_tensor
from ..errors import ImgclfError
from ..evaluation.evaluate import tta_metrics
from ..evaluation.metrics import evaluation_from_logits, metrics_from_logits
from ..inference import autocast_context, predict_logits, tta_views
from ..models import create_model, model_info
from ..models.fastnet import VARIANTS as FASTNET_VARIANTS
from ..recipes import resolve
from ..utils import atomic_write_text, resolve_device
from . import distributed
from .augment import ALTERNATING_FLIP, alternating_flip, build_augment
from .budget import FIXED_END_SECONDS, SPEED_ROUNDS, Speed, plan_budget
from .callbacks import Callback, stop_on_sigint
from .optim import build_optimizer, match_state_layout
from .precision import autocast_dtype, scaled_backward, sync
from .run_folder import new_run_dir, write_metrics_csv
from .schedule import LinearDecay, StemDecay, build_scheduler

INIT_SAMPLE = 5000  # training images a model's data-dependent init looks at
# Settings a resumed run may change; everything else must match the run's config to resume exactly.
RESUMABLE_OVERRIDES = {"epochs", "device", "eval_batch_size", "patience"}


@dataclass
class TrainResult:
    run_dir: Path
    status: str                      # finished | early-stopped | interrupted
    epochs_done: int
    best_epoch: int | None
    history: list[dict[str, float]]
    test_metrics: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        acc = self.test_metrics["top1"] if self.test_metrics else None
        return (f"TrainResult(run_dir='{self.run_dir}', status={self.status!r}, epochs={self.epochs_done}, "
                f"best_epoch={self.best_epoch}, test_top1={acc if acc is None else round(acc, 4)})")


def train(config: str | Path | None = None, *, resume: str | Path | None = None, callbacks: list[Callback] = (),
          progress: bool = True, started: float | None = None, **overrides: Any) -> TrainResult:
    """Train from a config file and/or keyword settings (the fields of :class:`TrainConfig`), or resume.

    With ``resume=RUN_FOLDER`` the run's own ``config.toml`` is used; only ``epochs`` (to train longer),
    ``device``, ``eval_batch_size`` and ``patience`` may be changed. ``time_budget`` counts from ``started``
    (a ``time.monotonic()`` value; default: this call; the ``imgclf`` command passes its process start)."""
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "config.toml").is_file() or not (run_dir / "last.safetensors").is_file():
            raise ImgclfError(f"cannot resume {run_dir}: it needs config.toml and last.safetensors "
                              "(a run folder written by `imgclf train`)")
        given = {k for k, v in overrides.items() if v is not None}
        if config is not None or given - RESUMABLE_OVERRIDES:
            bad = sorted(given - RESUMABLE_OVERRIDES) + (["config"] if config is not None else [])
            raise ImgclfError(f"--resume continues the run as configured; cannot change {', '.join(bad)} "
                              f"(only {', '.join(sorted(RESUMABLE_OVERRIDES))} may change)")
        cfg = TrainConfig.from_sources(run_dir / "config.toml", overrides)
        with distributed.process_group(cfg.device):  # several processes when torchrun started them
            return Trainer(cfg, callbacks=callbacks, progress=progress, resume_dir=run_dir, started=started).run()
    cfg = TrainConfig.from_sources(config, overrides)
    with distributed.process_group(cfg.device):  # several processes when torchrun started them
        return Trainer(cfg, callbacks=callbacks, progress=progress, started=started).run()


class Trainer:
    """Holds the state of one run. Build with a config, call :meth:`run` once."""

    def __init__(self, cfg: TrainConfig, callbacks: list[Callback] = (), progress: bool = True,
                 resume_dir: Path | None = None, started: float | None = None):
        self.cfg = cfg
        self.callbacks = list(callbacks)
        self.world = distributed.current()  # rank 0 of 1 unless torchrun started several processes
        self.progress = progress and self.world.is_main
        self.resume_dir = resume_dir
        self.stop_requested = False
        self.budget_end_seconds: float | None = None  # with --time-budget: what the end (evaluation, files) needs
        self.started = time.monotonic() if started is None else started  # the time budget's clock
        self.notes: list[str] = []

    def request_stop(self) -> None:
        self.stop_requested = True

    def log(self, msg: str) -> None:
        if self.world.is_main:  # one voice for the whole job
            tqdm.write(msg, file=sys.stdout)

    # ------------------------------------------------------------------ setup
    def run(self) -> TrainResult:
        resume_ckpt = load_checkpoint(self.resume_dir / "last.safetensors") if self.resume_dir else None
        if resume_ckpt is not None and resume_ckpt.train_state is None:
            raise ImgclfError(f"{resume_ckpt.path} holds no training state; cannot resume from it")
        # --init-from matters only at the start: a resumed run takes everything from `last`
        init = load_checkpoint(self.cfg.init_from) if self.cfg.init_from and resume_ckpt is None else None
        if init is not None:
            self._check_init_from(init)
        # every setting the user left to the recipe is filled here, once; the resolved config is what
        # config.toml records, so a resume (or --config) repeats exactly this run
        user_cfg = self.cfg
        self.cfg, why = resolve(self.cfg)
        self.notes += why
        cfg = self.cfg
        self.device = self.world.local_device(resolve_device(cfg.device))  # cuda: this process's own GPU

        # Fail fast on a misspelt model or preset, before minutes of decoding.
        model_info(cfg.model)
        build_augment(cfg.augment, cfg.image_size or 32)
        image_size, channels = cfg.image_size, None
        fixed = resume_ckpt or init
        if fixed is not None:  # the checkpoint fixes what its first layers expect
            image_size = image_size or fixed.meta["preprocess"]["image_size"]
            channels = fixed.meta["preprocess"]["channels"]
        with self.world.local_main_first():  # several processes: one decodes into the cache, the rest load it
            ds = load_dataset(cfg.data, image_size=image_size, channels=channels, val_split=cfg.val_split,
                              test_split=cfg.test_split, seed=cfg.seed, skip_bad_images=cfg.skip_bad_images,
                              progress=self.progress)
        # recorded with the checkpoint: evaluate/export ask for the data the same way and hit the same cache entry
        self.decode_args = {"image_size": image_size, "channels": channels}
        if cfg.fraction < 1.0:
            _, keep = stratified_split(ds.train.y, cfg.fraction, np.random.default_rng(cfg.seed))
            ds.train = Split(ds.train.x[keep], ds.train.y[keep])
            self.notes.append(f"training on {cfg.fraction:.0%} of the training images ({len(keep):,}), "
                              "stratified by class")
        self.ds = ds
        self._note_imbalance(ds.train.y, ds.classes)
        if ds.skipped:
            self.notes.append(f"skipped {len(ds.skipped)} unreadable image(s); listed in run.json")
        val, val_name = self._choose_validation(ds)
        if cfg.time_budget is not None and resume_ckpt is None:  # rank 0 plans, every process follows
            self.cfg, self.budget_end_seconds, why = self.world.from_main(
                lambda: self._plan_time_budget(user_cfg, ds, val))
            cfg = self.cfg
            self.notes += why

        if resume_ckpt is not None and list(resume_ckpt.meta["classes"]) != ds.classes:
            raise ImgclfError(f"cannot resume: the data's classes changed since the run started ({ds.source})")

        torch.manual_seed(cfg.seed)  # model init and dropout draw from the global generator
        model = self._build_model(ds, init, resume_ckpt)
        self.preprocess = self._choose_preprocess(ds, model, init, resume_ckpt)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        if model.fixed_input_size and len(set(progressive_sizes(cfg.progressive, ds.image_size,
                                                                                    cfg.epochs))) > 1:
            raise ImgclfError(f"{cfg.model} takes one input size only (its dense layer is sized for it): "
                              "drop --progressive or pass --progressive none")
        self.autocast_dtype = autocast_dtype(cfg.precision, self.device, model)
        self.model = model.to(self.device, memory_format=self.memory_format)
        self.normalizer = Normalizer(self.preprocess.mean, self.preprocess.std, self.device)
        self.augment = build_augment(cfg.augment, ds.image_size)
        self.x_train = to_tensor(ds.train.x, self.device)
        self.y_train = torch.from_numpy(ds.train.y).to(self.device)
        self.val = None if val is None else (to_tensor(val.x, self.device), torch.from_numpy(val.y))
        self.val_is_test = val is not None and val is ds.test
        self.scored_test: tuple[int, torch.Tensor] | None = None  # (epoch, its test logits) when val is test
        if resume_ckpt is None and init is None and not (cfg.pretrained and cfg.pretrained != "none"):
            self._init_from_data()
        self.steps_per_epoch = _steps_per_epoch(len(self.y_train), cfg.batch_size)
        counts = torch.bincount(self.y_train, minlength=len(ds.classes)).float()
        # inverse-frequency weights, normalised so a balanced dataset gets all ones
        inv = torch.where(counts > 0, len(self.y_train) / (len(ds.classes) * counts.clamp(min=1)), 0.0)
        self.loss_weight = inv.to(self.device) if cfg.class_weights == "auto" else None
        self.sample_weight = inv[self.y_train].cpu() if cfg.balanced_sampling else None
        self.fine_tuning = bool(cfg.init_from or (cfg.pretrained and cfg.pretrained != "none"))
        if self.fine_tuning and any(isinstance(m, _BatchNorm) for m in self.model.modules()):
            self.notes.append("fine-tuning: BatchNorm keeps the pretrained statistics (inference mode; its scale "
                              "and shift still learn), as Keras's fine-tuning guide does")
        self.features = None  # cached backbone features for head-only epochs
        self.optimizer = build_optimizer(cfg, self.model, cfg.backbone_lr_mult if self.fine_tuning else 1.0)
        self.scheduler = build_scheduler(cfg, self.optimizer, self.steps_per_epoch,
                                          self.model.stem_bias_epochs)
        # FastNet's whitening bias: its lr reaches 0 after stem_bias_epochs (linear schedule), and from then on it
        # stops needing a gradient, which spares the backward pass the first conv's input gradient. In several
        # processes it stays as it is (DistributedDataParallel expects the same parameters to train throughout).
        self.stem_params = [p for g in self.optimizer.param_groups if g.get("stem") for p in g["params"]]
        decays = getattr(self.scheduler, "lr_lambdas", [])
        self.stem_epochs = (self.model.stem_bias_epochs if any(isinstance(fn, StemDecay) for fn in decays)
                            and self.world.size == 1 else None)

        self.notes += self.world.notes(self.model, cfg.batch_size, cfg.sync_bn, self.device)
        # rank 0 picks (and creates) the run folder; the other processes are told its name
        self.run_dir = self.resume_dir or self.world.from_main(
            lambda: new_run_dir(Path(cfg.project), cfg.name or f"{ds.name}-{cfg.model}"))
        params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        prec = "bf16 autocast" if self.autocast_dtype else "fp32"
        self.log(f"data   {ds.source}: {len(ds.train.y):,} train, {_n(ds.val):,} val, {_n(ds.test):,} test; "
                 f"{len(ds.classes)} classes; {ds.image_size}x{ds.image_size} "
                 f"{'RGB' if ds.channels == 3 else 'greyscale'}")
        start = ("ImageNet-pretrained" if cfg.pretrained and cfg.pretrained != "none" else
                 f"initialised from {cfg.init_from}" if init is not None else "from scratch")
        freeze = f", first {cfg.freeze_epochs} head-only" if cfg.freeze_epochs else ""
        self.log(f"model  {cfg.model} ({start}): {params:,} parameters; {cfg.optimizer} lr {cfg.resolved_lr():g}"
                 f" ({cfg.schedule}), batch {cfg.batch_size}, {cfg.epochs} epochs{freeze}, augment {cfg.augment}"
                 f"{_progressive_note(cfg, ds.image_size)}; "
                 f"{self.device} {prec}")
        self.log(f"valid  {val_name}")
        for note in self.notes:
            self.log(f"note   {note}")
        if self.resume_dir is None and self.world.is_main:
            atomic_write_text(self.run_dir / "config.toml", cfg.to_toml())  # the resolved config
        self._write_run_json("running")

        state = self._initial_state(resume_ckpt)
        status = self._fit(state)
        return self._finish(state, status)

    def _check_init_from(self, init) -> None:
        arch = init.meta["arch"]["name"]
        if self.cfg.model is not None and self.cfg.model != arch:
            raise ImgclfError(f"--init-from {self.cfg.init_from} holds a {arch}, not a {self.cfg.model}; "
                              "drop --model or pick a checkpoint of that model")
        self.cfg = dataclasses.replace(self.cfg, model=arch, recipe="seed" if self.cfg.recipe == "auto"
                                       else self.cfg.recipe)

    def _build_model(self, ds: Dataset, init, resume_ckpt) -> torch.nn.Module:
        """A new model, or the pretrained/initialised one for fine-tuning (its head replaced when the
        classes differ). A resumed run rebuilds the checkpoint's own architecture; its weights come from
        `last`, so nothing is downloaded or loaded twice."""
        cfg, k = self.cfg, len(ds.classes)
        if resume_ckpt is not None:
            return create_model(**resume_ckpt.meta["arch"])
        if init is not None:
            model = create_model(**init.meta["arch"])
            model.load_state_dict(init.state_dict)
            if list(init.meta["classes"]) != ds.classes:
                model.reset_classifier(k)
                self.notes.append(f"initialised from {cfg.init_from}: backbone kept, new {k}-class head "
                                  f"(its classes {', '.join(init.meta['classes'][:5])}... differ from the data's)")
            return model
        pretrained = cfg.pretrained if cfg.pretrained not in (None, "none") else None
        model = create_model(cfg.model, num_classes=k, in_channels=ds.channels, image_size=ds.image_size,
                             pretrained=pretrained)
        self.notes += model.pretrained_notes
        return model

    def _plan_time_budget(self, user_cfg: TrainConfig, ds: Dataset, val) -> tuple[TrainConfig, float, list[str]]:
        """Measure each candidate model's speed here for a step or two, then let budget.plan_budget choose the
        model (when the recipe chose it: FastNet's widths), the epochs and whether TTA fits."""
        cfg = self.cfg
        if user_cfg.model is None and cfg.model in FASTNET_VARIANTS:
            names = list(FASTNET_VARIANTS)
        else:
            names = [cfg.model]
        speeds = self._measure_speeds(names, ds)
        n_eval = (0 if val is None or (cfg.val_every == 0) else len(val.y)) + _n(ds.test)
        tta = None if cfg.tta == "none" else cfg.tta
        views = len(tta_views(torch.zeros(1, 1, 4, 4, dtype=torch.uint8), tta)) if tta else 0
        plan = plan_budget(cfg.time_budget - self._elapsed(), len(ds.train.y), n_eval, speeds,
                           max_epochs=cfg.epochs, tta=tta, tta_views=views)
        return (dataclasses.replace(cfg, model=plan.model, epochs=plan.epochs, tta=plan.tta or "none"),
                plan.eval_seconds + FIXED_END_SECONDS, plan.why)

    def _measure_speeds(self, names: list[str], ds: Dataset, rounds: int = SPEED_ROUNDS) -> list[Speed]:
        """Training and inference images/s of each model in ``names`` on a real batch: one warm-up step each
        (kernel selection, allocations), then ``rounds`` timed steps taken in turn, model after model, and each
        model's fastest kept. On a shared machine a step can be slowed by other work (a VM's "steal"); taking
        turns spreads such a spell over the models instead of hitting one, and the fastest step is the one it
        spared. The global RNG is left as it was."""
        cfg = self.cfg
        bs, ebs = min(cfg.batch_size, len(ds.train.y)), min(cfg.eval_batch_size, len(ds.train.y))
        norm = Normalizer(*channel_stats(ds.train.x[:1000]), self.device)
        x = norm(to_tensor(ds.train.x[:max(bs, ebs)], self.device)).contiguous(memory_format=torch.channels_last)
        y = torch.from_numpy(ds.train.y[:bs]).to(self.device)
        best = {name: [0.0, 0.0] for name in names}  # images/s: training, inference
        with torch.random.fork_rng(devices=[]):
            runs = []
            for name in names:
                model = create_model(name, num_classes=len(ds.classes), in_channels=ds.channels,
                                     image_size=ds.image_size).to(self.device, memory_format=torch.channels_last)
                runs.append((name, model, autocast_dtype(cfg.precision, self.device, model),
                             build_optimizer(dataclasses.replace(cfg, model=name), model)))
            for i in range(1 + rounds):  # round 0 warms up
                for name, model, dtype, opt in runs:
                    model.train()
                    t0 = time.perf_counter()
                    with autocast_context(self.device, dtype):
                        loss = F.cross_entropy(model(x[:bs]).float(), y)
                    scaled_backward(loss, bs, model)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    sync(self.device)
                    train_ips = bs / (time.perf_counter() - t0)
                    model.eval()
                    with torch.no_grad(), autocast_context(self.device, dtype):
                        t0 = time.perf_counter()
                        model(x[:ebs])
                        sync(self.device)
                        eval_ips = ebs / (time.perf_counter() - t0)
                    if i > 0:
                        best[name] = [max(best[name][0], train_ips), max(best[name][1], eval_ips)]
        return [Speed(name, *best[name]) for name in names]

    @torch.no_grad()
    def _init_from_data(self) -> None:
        """Let the model set data-dependent layers (FastNet's patch whitening) from a seeded sample of the
        normalised training images; models without such layers ignore it."""
        g = torch.Generator().manual_seed(self.cfg.seed)
        pick = torch.randperm(len(self.y_train), generator=g)[:INIT_SAMPLE].to(self.device)
        self.model.init_from_data(self.normalizer(self.x_train[pick]))

    def _choose_preprocess(self, ds: Dataset, model, init, resume_ckpt) -> Preprocess:
        """The normalisation the model will always see: a resumed run's own (never re-derived), the one
        pretrained weights were trained with, an initialising checkpoint's, or this data's statistics."""
        if resume_ckpt is not None:
            return Preprocess.from_dict(resume_ckpt.meta["preprocess"])
        if model.input_mean is not None:
            mean, std = model.input_mean[:ds.channels], model.input_std[:ds.channels]
        elif init is not None:
            mean, std = init.meta["preprocess"]["mean"], init.meta["preprocess"]["std"]
        else:
            mean, std = channel_stats(ds.train.x)
        return Preprocess(image_size=ds.image_size, channels=ds.channels, mean=tuple(mean), std=tuple(std))

    def _note_imbalance(self, y: np.ndarray, classes: list[str]) -> None:
        counts = np.bincount(y, minlength=len(classes))
        if len(counts) > 1 and counts.min() * 3 < counts.max():
            few, many = int(counts.argmin()), int(counts.argmax())
            hint = "" if (self.cfg.class_weights == "auto" or self.cfg.balanced_sampling) else \
                "; consider --class-weights auto or --balanced-sampling"
            self.notes.append(f"class imbalance: {classes[many]!r} has {counts[many]:,} training images, "
                              f"{classes[few]!r} only {counts[few]:,}{hint}")

    def _choose_validation(self, ds: Dataset):
        if ds.val is not None:
            share = len(ds.val.y) / (len(ds.val.y) + len(ds.train.y))
            how = "val/ folder" if ds.val_origin == "val-folder" else f"{share:.0%} of train, stratified"
            return ds.val, f"validation set: {len(ds.val.y):,} images ({how})"
        if ds.test is not None:
            self.notes.append("no validation set (no val/ folder, --val-split 0): validating on the TEST set, "
                              "as the seeds do; the best epoch is then chosen on test data, so for an "
                              "unbiased test score pass --val-split 0.1")
            return ds.test, f"TEST set used for validation: {len(ds.test.y):,} images"
        self.notes.append("no validation or test data: the best epoch is the one with the lowest train loss")
        return None, "none (best epoch by train loss)"

    def _initial_state(self, ckpt) -> dict[str, Any]:
        cfg = self.cfg
        self.g_shuffle = torch.Generator(device="cpu").manual_seed(cfg.seed)
        self.g_augment = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)
        # which images start mirrored under alternating flips: fixed by the seed, so nothing to save
        # (on the training device, so that a step indexes it without a copy back to the host)
        self.flip_bits = ((torch.rand(len(self.y_train), generator=torch.Generator().manual_seed(cfg.seed + 2)) < 0.5
                           ).to(self.device) if cfg.augment in ALTERNATING_FLIP else None)
        state = {"epoch": 0, "step": 0, "sums": [0.0, 0, 0], "best_score": None, "best_epoch": None,
                 "bad_epochs": 0, "history": [], "shuffle_state": self.g_shuffle.get_state()}
        if ckpt is None:
            return state
        ts = ckpt.train_state
        if len(ts["optimizer"]["param_groups"]) != len(self.optimizer.param_groups):
            raise ImgclfError(f"cannot resume {self.run_dir}: an older imgclf started it with another optimizer "
                              "layout; finish it with that version, or start a new run")
        self.model.load_state_dict({k: v.to(self.device) for k, v in ckpt.state_dict.items()})
        self.optimizer.load_state_dict(ts["optimizer"])
        match_state_layout(self.optimizer)
        if self.scheduler is not None and ts.get("scheduler") is not None:
            self.scheduler.load_state_dict(ts["scheduler"])
        torch.set_rng_state(ts["rng"]["torch"])
        if ts["rng"].get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ts["rng"]["cuda"])
        # older checkpoints did not say; a CPU generator's state is 5,056 bytes, a CUDA one's 16
        saved_on = ts["rng"].get("device") or ("cpu" if ts["rng"]["augment"].numel() > 16 else "cuda")
        if saved_on == self.device.type:
            self.g_augment.set_state(ts["rng"]["augment"])  # generator states are CPU byte tensors
        else:  # a CPU and a CUDA generator keep different states: draw from a seed fixed by the position
            self.g_augment.manual_seed(cfg.seed + 1 + 1_000_003 * (ts["epoch"] + 1) + ts["step"])
            self.log(f"resume: the run moved from {saved_on} to {self.device.type}; the weights, optimizer and "
                     "schedule carry over, but the augmentation draws restart from the seed, so the rest of the "
                     "run differs from one that stayed on one device")
        state.update({k: ts[k] for k in ("epoch", "step", "sums", "best_score", "best_epoch", "bad_epochs",
                                         "history")})
        state["shuffle_state"] = ts["rng"]["shuffle"]
        done = f"epoch {state['epoch']}" + (f" + {state['step']} steps" if state["step"] else "")
        self.log(f"resume {self.run_dir}: continuing after {done} (best epoch so far: {state['best_epoch']})")
        return state

    # ------------------------------------------------------------------ the loop
    def _fit(self, state: dict[str, Any]) -> str:
        cfg, model, opt = self.cfg, self.model, self.optimizer
        n, bs = len(self.y_train), cfg.batch_size
        train_model = self.world.wrap(model, cfg.sync_bn)  # DDP over several processes; `model` stays bare
        with stop_on_sigint(self):
            while state["epoch"] < cfg.epochs:
                epoch = state["epoch"]
                # 1. the epoch's order: the generator state at the epoch's start is saved, so a resumed
                #    run mid-epoch redraws the same permutation
                self.g_shuffle.set_state(state["shuffle_state"])
                if self.sample_weight is not None:  # every class equally often, drawn with replacement
                    perm = torch.multinomial(self.sample_weight, n, replacement=True, generator=self.g_shuffle)
                else:
                    perm = torch.randperm(n, generator=self.g_shuffle)
                perm = perm.to(self.device)
                if self.stem_epochs is not None:  # set every epoch, so that a resumed run agrees
                    for p in self.stem_params:
                        p.requires_grad_(epoch < self.stem_epochs)
                frozen = epoch < (cfg.freeze_epochs or 0)
                sizes = progressive_sizes(cfg.progressive, self.ds.image_size, cfg.epochs)
                if frozen and self.features is None:
                    self.features = self._backbone_features()
                elif not frozen:
                    self.features = None  # the whole model trains from here on
                t0 = time.perf_counter()
                model.train()
                if self.fine_tuning:
                    # The pretrained statistics, not those of a few small batches of new images: on the photo
                    # benchmark the first fine-tuning epoch reached 86.7 % validation instead of 69.2 %.
                    for m in model.modules():
                        if isinstance(m, _BatchNorm):
                            m.eval()
                desc = f"epoch {epoch + 1}/{cfg.epochs}" + (" head" if frozen else "")
                bar = tqdm(total=self.steps_per_epoch, initial=state["step"], desc=desc, unit="step",
                           disable=not self.progress, leave=False, dynamic_ncols=True, file=sys.stderr)
                # several processes each sum their own images; rank 0 carries the figures from before a resume
                loss_sum, correct, seen = state["sums"] if self.world.is_main else [0.0, 0, 0]
                seen_at_start = seen
                for step in range(state["step"], self.steps_per_epoch):
                    idx = perm[step * bs:(step + 1) * bs]
                    share = self.world.share(idx, self.y_train, self.loss_weight, cfg.seed, epoch, step)
                    if share is not None:  # several processes: this one's images of the global batch
                        idx = share.idx
                    yb = self.y_train[idx]
                    # 2. normalise and augment the whole batch on the device (head-only epochs read the
                    #    cached features of the un-augmented images instead: the backbone is frozen)
                    with autocast_context(self.device, self.autocast_dtype):
                        if frozen:
                            logits = model.forward_head(self.features[idx])
                        else:
                            xb = self.normalizer(self.x_train[idx])
                            if self.flip_bits is not None:
                                xb = alternating_flip(xb, self.flip_bits[idx], epoch)
                            g = self.g_augment if share is None else share.generator
                            xb = self.augment(xb, g)
                            if sizes[epoch] != xb.shape[-1]:  # progressive resizing: a smaller input early on
                                xb = F.interpolate(xb, size=(sizes[epoch], sizes[epoch]), mode="bilinear",
                                                   antialias=True, align_corners=False)
                            xb = xb.contiguous(memory_format=self.memory_format)
                            logits = train_model(xb)
                        # 3. one optimisation step
                        loss = F.cross_entropy(logits.float(), yb, weight=self.loss_weight,
                                               label_smoothing=cfg.label_smoothing,
                                               reduction="mean" if share is None else "sum")
                        if share is not None:  # so that DDP's mean over processes is the global batch's mean
                            loss = loss * share.loss_scale
                    if not torch.isfinite(loss):
                        raise ImgclfError(f"the loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; "
                                          "lower the learning rate (--lr) or check the data")
                    opt.zero_grad(set_to_none=True)
                    scaled_backward(loss, cfg.batch_size, model)
                    if frozen:  # head-only steps bypass DDP: average the head's gradients by hand
                        self.world.average_grads(model)
                    opt.step()
                    if self.scheduler is not None and cfg.schedule != "plateau":
                        self.scheduler.step()
                    # 4. running figures for the bar (one .item() per step is cheap next to the step)
                    loss_sum += loss.item() * (len(yb) if share is None else share.loss_count)
                    correct += int((logits.argmax(1) == yb).sum())
                    seen += len(yb)
                    state["step"], state["sums"] = step + 1, [loss_sum, correct, seen]
                    bar.update(1)
                    if step % 10 == 0 or step + 1 == self.steps_per_epoch:
                        ips = (seen - seen_at_start) / max(time.perf_counter() - t0, 1e-9)
                        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}",
                                        img_s=f"{ips:.0f}", refresh=False)
                    for cb in self.callbacks:
                        cb.on_step_end(self, epoch, step, loss.item())
                    if self.world.any(self.stop_requested) and step + 1 < self.steps_per_epoch:
                        bar.close()
                        state["sums"] = self.world.sum(state["sums"])  # the whole job's figures
                        self._save_last(state)
                        return "interrupted"
                    if (self.budget_end_seconds is not None and step + 1 < self.steps_per_epoch
                            and self.world.any(self._seconds_left() < 0)):
                        self.log("time budget: ending this epoch early to leave time for the final evaluation")
                        self.cfg = cfg = dataclasses.replace(cfg, epochs=epoch + 1)
                        break
                bar.close()
                seconds = time.perf_counter() - t0
                loss_sum, correct, seen = self.world.sum([loss_sum, correct, seen])  # over the processes

                # 5. validate, record, checkpoint
                row = self._end_epoch(state, epoch, loss_sum / seen, correct / seen, seconds)
                if self.budget_end_seconds is not None:
                    self.cfg = cfg = self.world.from_main(
                        functools.partial(self._replan, state, time.perf_counter() - t0))
                for cb in self.callbacks:
                    cb.on_epoch_end(self, row)
                if cfg.patience and state["bad_epochs"] >= cfg.patience:
                    self.log(f"early stopping: {cfg.monitor} has not improved for {cfg.patience} epochs "
                             f"(best epoch {state['best_epoch']})")
                    return "early-stopped"
                if self.world.any(self.stop_requested):
                    return "interrupted"
        return "finished"

    def _seconds_left(self) -> float:
        """Of the time budget, what is left once the final evaluation and files are paid for."""
        return self.cfg.time_budget - self._elapsed() - self.budget_end_seconds

    def _elapsed(self) -> float:
        return time.monotonic() - self.started

    def _replan(self, state: dict[str, Any], epoch_seconds: float) -> TrainConfig:
        """After an epoch: if the epochs left will not fit at this epoch's pace, plan fewer and make the
        linear schedule reach 0 at the new end (a slower machine than measured, or a busy one)."""
        cfg, done = self.cfg, state["epoch"]
        fit = done + max(0, math.floor(self._seconds_left() / epoch_seconds))
        if fit >= cfg.epochs:
            return cfg
        self.log(f"time budget: epochs take {epoch_seconds:.0f}s here, so the run ends after epoch {max(fit, done)} "
                 f"instead of {cfg.epochs}" + ("; the lr schedule is shortened to match" if cfg.schedule == "linear"
                                              else ""))
        if isinstance(self.scheduler, torch.optim.lr_scheduler.LambdaLR):
            for fn in self.scheduler.lr_lambdas:
                if type(fn) is LinearDecay:  # not StemDecay: the stem's epochs stay as they were
                    fn.total = max(fit, done + 1) * self.steps_per_epoch
        return dataclasses.replace(cfg, epochs=max(fit, done))

    @torch.no_grad()
    def _backbone_features(self) -> torch.Tensor:
        """forward_features of every training image, computed once for the head-only epochs, in eval mode
        (BatchNorm on its running statistics, as the frozen backbone will be used at validation)."""
        t0, bs, out = time.perf_counter(), self.cfg.eval_batch_size, []
        was_training = self.model.training
        self.model.eval()
        for i in range(0, len(self.x_train), bs):
            xb = self.normalizer(self.x_train[i:i + bs]).contiguous(memory_format=self.memory_format)
            with autocast_context(self.device, self.autocast_dtype):
                out.append(self.model.forward_features(xb).float())
        self.model.train(was_training)
        self.log(f"cache  backbone features of {len(self.x_train):,} images for the head-only epochs "
                 f"({time.perf_counter() - t0:.1f}s; augmentation starts with the full fine-tuning)")
        return torch.cat(out)

    def _end_epoch(self, state, epoch: int, train_loss: float, train_acc: float, seconds: float) -> dict:
        cfg = self.cfg
        every = 1 if cfg.val_every is None else cfg.val_every
        validate = self.val is not None and (epoch + 1 >= cfg.epochs or (every > 0 and (epoch + 1) % every == 0))
        if validate:
            # several processes: each scores a slice, every one gets all the logits (and so the same metrics)
            logits = self.world.predict_logits(self.model, self.val[0], self.normalizer,
                                               batch_size=cfg.eval_batch_size, autocast_dtype=self.autocast_dtype,
                                               channels_last=cfg.channels_last)
            m = metrics_from_logits(logits, self.val[1], self.ds.classes)
            val_loss, val_acc = m["loss"], m["top1"]
            if self.val_is_test:  # the final test of these same weights needs no second pass
                self.scored_test = (epoch + 1, logits)
        else:
            val_loss, val_acc = float("nan"), float("nan")
        # the head's lr (the backbone's is lower when fine-tuning); with Muon the filters' (its SGD groups'
        # rates are per-example figures times the batch size, not comparable with other optimizers')
        lr = self.optimizer.param_groups[0 if cfg.optimizer == "muon" else -1]["lr"]
        row = {"epoch": epoch + 1, "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss,
               "val_acc": val_acc, "lr": lr, "seconds": seconds}
        score = {"val_loss": val_loss, "val_acc": val_acc}[cfg.monitor] if self.val is not None else train_loss
        lower_is_better = cfg.monitor == "val_loss" or self.val is None
        if self.scheduler is not None and cfg.schedule == "plateau" and (validate or self.val is None):
            self.scheduler.step(score)
        improved = state["best_score"] is None or (score < state["best_score"] if lower_is_better
                                                   else score > state["best_score"])
        if self.val is not None and not validate:
            improved = False  # not scored this epoch (--val-every): neither better nor worse
        elif improved:
            state["best_score"], state["best_epoch"], state["bad_epochs"] = score, epoch + 1, 0
        else:
            state["bad_epochs"] += 1
        state["history"].append(row)
        state["epoch"], state["step"], state["sums"] = epoch + 1, 0, [0.0, 0, 0]
        state["shuffle_state"] = self.g_shuffle.get_state()
        # `last` first: if we crash between the two writes, resume still finds a consistent state.
        self._save_last(state)
        if self.world.is_main:  # one process writes the run folder
            if improved:
                save_checkpoint(self.run_dir / "best.safetensors", self.model, self._meta("best", state, row))
            write_metrics_csv(self.run_dir / "metrics.csv", state["history"])
        mark = " *" if improved else ""
        val_txt = (f"val loss {val_loss:.4f} acc {val_acc:.2%}" if validate else
                   "no val" if self.val is None else "val skipped (--val-every)")
        self.log(f"epoch {epoch + 1:>3}/{cfg.epochs}  train loss {train_loss:.4f} acc {train_acc:.2%}  {val_txt}  "
                 f"lr {lr:.3g}  {seconds:.1f}s  {len(self.y_train) / seconds:.0f} img/s{mark}")
        return row

    # ------------------------------------------------------------------ saving
    def _meta(self, kind: str, state: dict, row: dict | None = None, extra: dict | None = None) -> dict:
        cfg, ds = self.cfg, self.ds
        return {
            "kind": kind,
            "imgclf_version": __version__,
            "torch_version": torch.__version__,
            "arch": self.model.arch_args,
            "classes": ds.classes,
            "preprocess": self.preprocess.to_dict(),
            "channels_last": cfg.channels_last,
            "data": {"source": ds.source, "name": ds.name, "builtin": cfg.data if cfg.data in BUILTINS else None,
                     "val_split": cfg.val_split,
                     "test_split": cfg.test_split, "seed": cfg.seed, "skip_bad_images": cfg.skip_bad_images,
                     **self.decode_args},
            "epoch": state["epoch"],
            "metrics": dict(row or (state["history"][-1] if state["history"] else {})),
            "best": {"epoch": state["best_epoch"], "monitor": cfg.monitor, "score": state["best_score"]},
            **(extra or {}),
        }

    def _save_last(self, state: dict[str, Any]) -> None:
        if not self.world.is_main:  # one process writes the run folder
            return
        rng = {"torch": torch.get_rng_state(), "shuffle": state["shuffle_state"], "augment": self.g_augment.get_state(),
               "device": self.device.type,  # the augment generator's kind: its state fits only that kind
               "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None}
        train_state = {
            "epoch": state["epoch"], "step": state["step"], "sums": state["sums"],
            "best_score": state["best_score"], "best_epoch": state["best_epoch"], "bad_epochs": state["bad_epochs"],
            "history": state["history"], "rng": rng, "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
        }
        save_checkpoint(self.run_dir / "last.safetensors", self.model, self._meta("last", state), train_state)

    def _write_run_json(self, status: str, **extra: Any) -> None:
        if not self.world.is_main:  # one process writes the run folder
            return
        ds = self.ds
        info = {
            "status": status,
            "imgclf_version": __version__, "torch_version": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "device": str(self.device), "precision": "bf16" if self.autocast_dtype else "fp32",
            "processes": self.world.size,
            "lr": self.cfg.resolved_lr(), "command": " ".join(sys.argv) if sys.argv and sys.argv[0] else None,
            "data": {"source": ds.source, "name": ds.name, "classes": ds.classes, "channels": ds.channels,
                     "image_size": ds.image_size, "train": len(ds.train.y), "val": _n(ds.val), "test": _n(ds.test),
                     "val_origin": ds.val_origin, "skipped": ds.skipped},
            "notes": self.notes,
            **extra,
        }
        atomic_write_text(self.run_dir / "run.json", json.dumps(info, indent=2, default=str) + "\n")

    def _finish(self, state: dict[str, Any], status: str) -> TrainResult:
        if not self.world.is_main:  # rank 0 alone tests the final model, writes the report, prints the folder
            return TrainResult(run_dir=self.run_dir, status=status, epochs_done=state["epoch"],
                               best_epoch=state["best_epoch"], history=state["history"], notes=self.notes)
        cfg = self.cfg
        test_metrics = evaluation = None
        if status == "interrupted":
            self.log(f"interrupted: progress saved in {self.run_dir / 'last.safetensors'}; "
                     f"continue with: imgclf train --resume {self.run_dir}")
        else:
            final = "best"
            best_path = self.run_dir / "best.safetensors"
            if cfg.restore_best and best_path.is_file():
                # restore-best holds whether or not early stopping triggered
                best = load_checkpoint(best_path)
                self.model.load_state_dict({k: v.to(self.device) for k, v in best.state_dict.items()})
            else:  # asked for the last weights, or no epoch was ever scored (--val-every 0 cut short)
                final = "last"
            if self.ds.test is not None:
                final_epoch = state["best_epoch"] if final == "best" else state["epoch"]
                if self.scored_test is not None and self.scored_test[0] == final_epoch:
                    logits = self.scored_test[1]  # validated on the test split with these very weights
                else:
                    logits = predict_logits(self.model, to_tensor(self.ds.test.x, self.device), self.normalizer,
                                            batch_size=cfg.eval_batch_size, autocast_dtype=self.autocast_dtype,
                                            channels_last=cfg.channels_last)
                # the report's numbers (evaluate.py) from these same logits: no second forward pass
                evaluation = evaluation_from_logits(logits, self.ds.test.y, self.ds.classes, self.ds.test.x)
                test_metrics = {k: evaluation.metrics[k] for k in ("n", "loss", "top1", "top5",
                                                                    "per_class_accuracy")}
                evaluation.metrics.update(split="test", data=self.ds.source,
                                          checkpoint=str(self.run_dir / f"{final}.safetensors"))
                m = test_metrics
                m["weights"] = f"{final} (epoch {state['best_epoch'] if final == 'best' else state['epoch']})"
                self.log(f"test   loss {m['loss']:.4f}  top-1 {m['top1']:.2%}  top-5 {m['top5']:.2%}  "
                         f"on {m['n']:,} images ({m['weights']})")
                if cfg.tta not in (None, "none"):
                    m["tta"] = evaluation.metrics["tta"] = self._test_tta(m["top1"], logits)
                    self.log(f"test   top-1 {m['tta']['top1']:.2%} with test-time augmentation "
                             f"({cfg.tta}, {m['tta']['views']} views)")
            # the deliverable checkpoint carries its final metrics
            target = self.run_dir / f"{final}.safetensors"
            if final == "best" and target.is_file():
                ckpt = load_checkpoint(target)
                meta = {k: v for k, v in ckpt.meta.items() if k not in ("format", "format_version")}
                meta["test_metrics"] = test_metrics
                save_checkpoint(target, ckpt.state_dict, meta)
        self._write_run_json(status, epochs_done=state["epoch"], best_epoch=state["best_epoch"],
                             test_metrics=test_metrics)
        if status != "interrupted":
            self._write_report(evaluation)
        print(self.run_dir, flush=True)  # the last line printed: the run folder
        return TrainResult(run_dir=self.run_dir, status=status, epochs_done=state["epoch"],
                           best_epoch=state["best_epoch"], history=state["history"], test_metrics=test_metrics,
                           notes=self.notes)

    def _test_tta(self, plain_top1: float, plain_logits: torch.Tensor) -> dict[str, Any]:
        """TTA top-1 on the test split, through the same batched, normalised forward pass; the un-augmented
        view reuses the test logits already computed (tta_views returns the batch itself first)."""
        cfg, x = self.cfg, to_tensor(self.ds.test.x, self.device)
        scorer = SimpleNamespace(logits=lambda v, batch_size: plain_logits if v is x else predict_logits(
            self.model, v, self.normalizer, batch_size=batch_size, autocast_dtype=self.autocast_dtype,
            channels_last=cfg.channels_last))
        return tta_metrics(scorer, x, self.ds.test.y, cfg.tta, batch_size=cfg.eval_batch_size,
                           plain_top1=plain_top1)

    def _write_report(self, evaluation) -> None:
        """Plots + report.html; a failure here must never cost the run, so it only warns."""
        from ..evaluation.report import write_report

        try:
            path = write_report(self.run_dir, evaluation)
            self.log(f"report {path}")
        except Exception as e:  # noqa: BLE001 -- the weights and metrics are saved; the report can be redone
            self.log(f"warning: could not write the report ({type(e).__name__}: {e}); "
                     f"retry with: imgclf report {self.run_dir}")


def _progressive_note(cfg: TrainConfig, image_size: int) -> str:
    sizes = progressive_sizes(cfg.progressive, image_size, cfg.epochs)
    steps = [f"{size}px x{sum(1 for s in sizes if s == size)}" for size in dict.fromkeys(sizes)]
    return f", progressive {' -> '.join(steps)}" if len(steps) > 1 else ""


def _steps_per_epoch(n: int, batch_size: int) -> int:
    # Keep a final partial batch (as Keras does) unless it would hold a single image, which
    # BatchNorm cannot normalise in training mode.
    steps = math.ceil(n / batch_size)
    if n % batch_size == 1 and steps > 1:
        steps -= 1
    if n < 2:
        raise ImgclfError(f"only {n} training image(s): need at least 2")
    return steps


def _n(split) -> int:
    return 0 if split is None else len(split.y)


