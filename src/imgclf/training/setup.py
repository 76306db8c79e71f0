"""Everything a run needs before its first step, decided once: the recipe's settings, the data, the
validation split, the time budget's plan, the model, its preprocessing and precision, and the batch source.

    setup = prepare(cfg, world, resume=ckpt_or_None, started=time.monotonic(), progress=True)

:func:`prepare` returns a frozen :class:`Setup`; nothing after it changes the config (a time budget that
shortens the run keeps its own count in the training state). The order of the steps is part of the
behaviour: the model is built right after the global generator is seeded, so a seed gives the same weights.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from ..checkpoint import Checkpoint, load_checkpoint
from ..config import TrainConfig, progressive_sizes
from ..data import Dataset, Preprocess, Split, load_dataset
from ..data.dataset import split_size
from ..data.edits import read_edits
from ..data.notify import quiet_notes
from ..data.probe import probe_images
from ..data.shards import ImageRows, select
from ..data.split import stratified_split
from ..data.tensors import Normalizer, channel_stats, to_device
from ..errors import ImgclfError
from ..inference import tta_views
from ..models import create_model, create_model_for, model_info
from ..models._base import ImageClassifier
from ..models.fastnet import VARIANTS as FASTNET_VARIANTS
from ..recipes import resolve
from ..utils import available_memory, resolve_device
from .augment import ALTERNATING_FLIP, build_augment
from .batches import InMemoryBatches, StreamedBatches
from .budget import FIXED_END_SECONDS, measure_and_plan
from .photo_plan import PhotoPlan, plan_photos
from .precision import autocast_dtype

INIT_SAMPLE = 5000  # training images a model's data-dependent init looks at


@dataclass(frozen=True)
class Setup:
    cfg: TrainConfig                      # the user's settings, completed by the recipe and the time budget
    device: torch.device
    ds: Dataset                           # its train split reduced by --fraction
    val: Split | None                     # what each epoch is scored on (the test split when there is no val)
    val_name: str                         # how the log describes it
    model: ImageClassifier                # on the device, in its memory format
    preprocess: Preprocess                # the normalisation the model always sees (saved in checkpoints)
    normalizer: Normalizer
    autocast_dtype: torch.dtype | None
    batches: InMemoryBatches | StreamedBatches  # the training images and how a batch of them is made
    # val images (on the device, or ImageRows when streamed), labels on the CPU
    val_tensors: tuple[torch.Tensor | ImageRows, torch.Tensor] | None
    fine_tuning: bool                     # from pretrained weights or --init-from: BatchNorm statistics stay (unless
                                          # freeze_bn is false), the backbone learns at backbone_lr_mult x lr
    start: str                            # "from scratch", "ImageNet-pretrained", "initialised from ..."
    decode_args: dict                     # how the data was asked for: evaluate/export ask the same way
    budget_end_seconds: float | None      # with --time-budget: what the final evaluation and files need
    resume: Checkpoint | None             # `last` of the run being resumed
    plan: PhotoPlan | None                # a photo run's plan, timed on this machine
    notes: tuple[str, ...]

    @property
    def val_is_test(self) -> bool:
        return self.val is not None and self.val is self.ds.test


def prepare(cfg: TrainConfig, world, *, resume: Checkpoint | None = None, started: float | None = None,
            progress: bool = True) -> Setup:
    """Resolve, load and build everything for one run (see the module docstring)."""
    started = time.monotonic() if started is None else started
    notes: list[str] = []
    if resume is not None and resume.train_state is None:
        raise ImgclfError(f"{resume.path} holds no training state; cannot resume from it")
    missing = [k for k in ("arch", "classes", "preprocess") if resume is not None and k not in resume.meta]
    if missing:
        raise ImgclfError(f"{resume.path} has no {', '.join(missing)} in its metadata; cannot resume from it")
    # --init-from matters only at the start: a resumed run takes everything from `last`
    init = load_checkpoint(cfg.init_from) if cfg.init_from and resume is None else None
    if init is not None:
        cfg = _with_init_arch(cfg, init)
    # every setting the user left to the recipe is filled here, once; the resolved config is what
    # config.toml records, so a resume (or --config) repeats exactly this run
    user_cfg = cfg
    cfg, why = resolve(cfg)
    notes += why
    device = world.local_device(resolve_device(cfg.device))  # cuda: this process's own GPU

    # Fail fast on a misspelt model or preset, before minutes of decoding.
    model_info(cfg.model)
    build_augment(cfg.augment, cfg.image_size or 32)
    image_size, channels = cfg.image_size, None
    fixed = resume or init
    if fixed is not None:  # the checkpoint fixes what its first layers expect
        image_size = image_size or fixed.meta["preprocess"]["image_size"]
        channels = fixed.meta["preprocess"]["channels"]
    edits = _data_edits(cfg, resume)
    with world.local_main_first():  # several processes: one decodes into the cache, the rest load it
        ds = load_dataset(cfg.data, image_size=image_size, channels=channels, val_split=cfg.val_split,
                          test_split=cfg.test_split, seed=cfg.seed, skip_bad_images=cfg.skip_bad_images,
                          progress=progress, **edits)
        big = _photo_margin(cfg, ds, progress, notes, edits)
    if cfg.fraction < 1.0:
        _, keep = stratified_split(ds.train.y, cfg.fraction, np.random.default_rng(cfg.seed))
        ds.train = Split(select(ds.train.x, keep), ds.train.y[keep])
        big = None if big is None else big.select(keep)
        notes.append(f"training on {cfg.fraction:.0%} of the training images ({len(keep):,}), stratified by class")
    notes += _imbalance_notes(cfg, ds.train.y, ds.classes)
    if ds.skipped:
        notes.append(f"skipped {len(ds.skipped)} unreadable image(s); listed in run.json")
    if any(ds.edits.values()):
        notes.append(f"left out {ds.edits['excluded']:,} image(s) (--exclude) and moved {ds.edits['relabelled']:,} "
                     "to another class (--relabel); the lists are recorded in the checkpoints")
    val, val_name = _choose_validation(ds, notes, keeps_last=cfg.val_every == 0)
    budget_end, plan = None, None
    if cfg.recipe == "photo" and resume is None:  # rank 0 plans, every process follows
        plan = world.from_main(lambda: _plan_photos(cfg, user_cfg, ds, val, device, started, init))
        cfg, budget_end = plan.cfg, plan.end_seconds if plan.cfg.time_budget is not None else None
        notes += plan.why
    elif cfg.time_budget is not None and resume is None:
        cfg, budget_end, why = world.from_main(
            lambda: _plan_time_budget(cfg, user_cfg, ds, val, device, started))
        notes += why
    if resume is not None and list(resume.meta["classes"]) != ds.classes:
        raise ImgclfError(f"cannot resume: the data's classes changed since the run started ({ds.source})")

    torch.manual_seed(cfg.seed)  # model init and dropout draw from the global generator
    model = _build_model(cfg, ds, init, resume, notes)
    preprocess = _choose_preprocess(ds, model, init, resume)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    if model.fixed_input_size and len(set(progressive_sizes(cfg.progressive, ds.image_size, cfg.epochs))) > 1:
        raise ImgclfError(f"{cfg.model} takes one input size only (its dense layer is sized for it): "
                          "drop --progressive or pass --progressive none")
    dtype = autocast_dtype(cfg.precision, device, model)
    model = model.to(device, memory_format=memory_format)
    normalizer = Normalizer(preprocess.mean, preprocess.std, device)
    in_memory = _data_in_memory(cfg.data_in_memory, ds, world, device, notes, extra=0 if big is None else big.nbytes)
    source = dict(normalizer=normalizer, augment=build_augment(cfg.augment, ds.image_size),
                  memory_format=memory_format, cfg=cfg, image_size=ds.image_size,
                  alternating_flip=cfg.augment in ALTERNATING_FLIP, num_classes=len(ds.classes))
    y_train = torch.from_numpy(ds.train.y).to(device)
    if in_memory:
        batches = InMemoryBatches(to_device(ds.train.x, device), y_train,
                                  big=None if big is None else to_device(big, device), **source)
    else:
        batches = StreamedBatches(ds.train.x, y_train, device=device, big=big, **source)
    val_tensors = None if val is None else (
        to_device(val.x, device) if in_memory else val.x, torch.from_numpy(val.y))
    pretrained = bool(cfg.pretrained and cfg.pretrained != "none")
    if resume is None and init is None and not pretrained:
        _init_from_data(model, batches, normalizer, cfg.seed)
    fine_tuning = bool(cfg.init_from or pretrained)
    if cfg.freeze_blocks:
        _freeze_blocks(model, cfg.freeze_blocks, fine_tuning, notes)
    if fine_tuning and any(isinstance(m, _BatchNorm) for m in model.modules()):
        notes.append("fine-tuning: BatchNorm keeps the pretrained statistics (inference mode; its scale "
                     "and shift still learn), as Keras's fine-tuning guide does" if cfg.freeze_bn is not False else
                     "fine-tuning: BatchNorm statistics are re-estimated as it trains (freeze_bn false)")
    start = ("ImageNet-pretrained" if pretrained else
             f"initialised from {cfg.init_from}" if init is not None else "from scratch")
    return Setup(cfg=cfg, device=device, ds=ds, val=val, val_name=val_name, model=model, preprocess=preprocess,
                 normalizer=normalizer, autocast_dtype=dtype, batches=batches, val_tensors=val_tensors,
                 fine_tuning=fine_tuning, start=start,
                 decode_args={"image_size": image_size, "channels": channels, **{k: v for k, v in edits.items() if v}},
                 budget_end_seconds=budget_end,
                 resume=resume, plan=plan, notes=tuple(notes))


def _freeze_blocks(model: ImageClassifier, n: int, fine_tuning: bool, notes: list[str]) -> None:
    """The stem and first ``n - 1`` blocks keep their (pretrained) weights: no gradient reaches them, so the
    backward pass stops before the largest feature maps. Before the optimizer is built, so it never holds them."""
    blocks = model.early_blocks()
    if not fine_tuning:
        raise ImgclfError("--freeze-blocks keeps pretrained weights: use it with --pretrained imagenet or --init-from")
    if not blocks:
        raise ImgclfError(f"--freeze-blocks: {type(model).__name__} has no blocks to freeze; leave it out")
    if n >= len(blocks):
        raise ImgclfError(f"--freeze-blocks {n}: the model has {len(blocks)} (stem included); freezing all of them "
                          "leaves only the head, which --freeze-epochs does")
    model.freeze_early_blocks(n)
    notes.append(f"fine-tuning: the stem and first {n - 1} blocks keep their pretrained weights (--freeze-blocks {n})")


def _with_init_arch(cfg: TrainConfig, init: Checkpoint) -> TrainConfig:
    """--init-from fixes the architecture (and, left to the recipe, the seed recipe's fine-tuning settings)."""
    arch = init.meta["arch"]["name"]
    if cfg.model is not None and cfg.model != arch:
        raise ImgclfError(f"--init-from {cfg.init_from} holds a {arch}, not a {cfg.model}; "
                          "drop --model or pick a checkpoint of that model")
    return dataclasses.replace(cfg, model=arch, recipe="seed" if cfg.recipe == "auto" else cfg.recipe)


def _build_model(cfg: TrainConfig, ds: Dataset, init, resume, notes: list[str]) -> ImageClassifier:
    """A new model, or the pretrained/initialised one for fine-tuning (its head replaced when the
    classes differ). A resumed run rebuilds the checkpoint's own architecture; its weights come from
    `last`, so nothing is downloaded or loaded twice."""
    k = len(ds.classes)
    if resume is not None:
        return create_model_for(resume.meta["arch"], _shapes(resume))
    if init is not None:
        model = create_model_for(init.meta["arch"], _shapes(init))  # a pruned one: its narrower layers
        model.load_state_dict(init.state_dict)
        if list(init.meta["classes"]) != ds.classes:
            model.reset_classifier(k)
            notes.append(f"initialised from {cfg.init_from}: backbone kept, new {k}-class head "
                         f"(its classes {', '.join(init.meta['classes'][:5])}... differ from the data's)")
        return model
    pretrained = cfg.pretrained if cfg.pretrained not in (None, "none") else None
    model = create_model(cfg.model, num_classes=k, in_channels=ds.channels, image_size=ds.image_size,
                         pretrained=pretrained)
    notes += model.pretrained_notes
    return model


def _shapes(ckpt: Checkpoint) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in ckpt.state_dict.items()}


def _plan_photos(cfg: TrainConfig, user_cfg: TrainConfig, ds: Dataset, val, device: torch.device,
                 started: float, init=None) -> PhotoPlan:
    """The photo recipe's epochs for this folder's size, and with --time-budget (or a run that would take
    longer than photo_plan.DEFAULT_BUDGET) the crops, frozen depth and epochs that fit, timed on this machine."""
    n_eval = (0 if val is None or val is ds.test else len(val.y)) + split_size(ds.test)
    build = None if init is None else lambda: create_model_for(init.meta["arch"], _shapes(init))  # pruned: narrower
    return plan_photos(cfg, user_cfg, len(ds.train.y), n_eval, len(ds.classes), ds.image_size, device,
                       elapsed=lambda: time.monotonic() - started, build=build)


def _plan_time_budget(cfg: TrainConfig, user_cfg: TrainConfig, ds: Dataset, val, device: torch.device,
                      started: float) -> tuple[TrainConfig, float, list[str]]:
    """Measure candidate models' speed here for a step or two, then let the budget planner choose the model
    (when the recipe chose it: FastNet's widths), the epochs and how many TTA views fit."""
    names = list(FASTNET_VARIANTS) if user_cfg.model is None and cfg.model in FASTNET_VARIANTS else [cfg.model]
    n_eval = (0 if val is None or (cfg.val_every == 0) else len(val.y)) + split_size(ds.test)
    modes = [] if cfg.tta == "none" else [cfg.tta] + (["flip"] if "flip" in cfg.tta and cfg.tta != "flip" else [])
    probe = torch.zeros(1, 1, 4, 4, dtype=torch.uint8)
    tta = [(mode, len(tta_views(probe, mode))) for mode in modes]  # flip alone where the recipe's views cost an epoch
    # a short plan (budget.SHORT) changes the batch and the input sizes: FastNet's own, unless the user chose them
    short = cfg.model in FASTNET_VARIANTS and user_cfg.batch_size is None and user_cfg.progressive is None
    plan = measure_and_plan(cfg, names, ds, device, n_eval, tta,
                            seconds_left=lambda: cfg.time_budget - (time.monotonic() - started), short=short)
    shape = {"progressive": plan.progressive, "batch_size": plan.batch_size} if plan.progressive else {}
    return (dataclasses.replace(cfg, model=plan.model, epochs=plan.epochs, tta=plan.tta or "none", **shape),
            plan.eval_seconds + FIXED_END_SECONDS, plan.why)


@torch.no_grad()
def _init_from_data(model: ImageClassifier, batches: InMemoryBatches | StreamedBatches, normalizer: Normalizer,
                    seed: int) -> None:
    """Let the model set data-dependent layers (FastNet's patch whitening) from a seeded sample of the
    normalised training images; models without such layers ignore it."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(batches), generator=g)[:INIT_SAMPLE].to(batches.device)
    model.init_from_data(normalizer(batches.raw(pick)))


def _choose_preprocess(ds: Dataset, model: ImageClassifier, init, resume) -> Preprocess:
    """The normalisation the model will always see: a resumed run's own (never re-derived), the one
    pretrained weights were trained with, an initialising checkpoint's, or this data's statistics."""
    if resume is not None:
        return Preprocess.from_dict(resume.meta["preprocess"])
    if model.input_mean is not None:
        mean, std = model.input_mean[:ds.channels], model.input_std[:ds.channels]
    elif init is not None:
        mean, std = init.meta["preprocess"]["mean"], init.meta["preprocess"]["std"]
    else:
        mean, std = channel_stats(ds.train.x)
    return Preprocess(image_size=ds.image_size, channels=ds.channels, mean=tuple(mean), std=tuple(std))


# Photos are stored this much larger than the model's input for the training crops to take from (the 0.875
# centre crop of timm's and torchvision's ImageNet evaluation, read the other way); validation, test and
# predict see the input size itself.
PHOTO_MARGIN = 8 / 7


def _data_edits(cfg: TrainConfig, resume: Checkpoint | None) -> dict:
    """The images to leave out and to relabel: from the --exclude / --relabel CSVs, or, on a resume, the lists
    the run started with (recorded in its checkpoint), so an edited CSV never changes a run halfway."""
    if resume is not None:
        rec = resume.meta.get("data", {})
        return {"exclude": list(rec.get("exclude", [])), "relabel": dict(rec.get("relabel", {}))}
    return {"exclude": read_edits(cfg.exclude, "exclude") if cfg.exclude else [],
            "relabel": read_edits(cfg.relabel, "relabel") if cfg.relabel else {}}


def _photo_margin(cfg: TrainConfig, ds: Dataset, progress: bool, notes: list[str], edits: dict
                  ) -> ImageRows | None:
    """With the photo augmentation, on photos at least that large: the training images again, decoded
    PHOTO_MARGIN larger (their own cache entry, split by the same seed), aligned with ``ds.train``; the
    random-resized crops are taken from them. None otherwise."""
    side = round(ds.image_size * PHOTO_MARGIN / 8) * 8
    if cfg.augment != "photo" or (probe_images(cfg.data).side or 0) < side:
        return None
    with quiet_notes():  # the first load said it all
        big = load_dataset(cfg.data, image_size=side, channels=ds.channels, val_split=cfg.val_split,
                           test_split=cfg.test_split, seed=cfg.seed, skip_bad_images=cfg.skip_bad_images,
                           progress=progress, **edits)
    if len(big.train.y) != len(ds.train.y) or (big.train.y != ds.train.y).any():  # a file changed in between
        notes.append(f"photos: the training images at {side}px do not line up with those at {ds.image_size}px; "
                     "cropping from the latter")
        return None
    notes.append(f"photos: training crops are taken from the images stored at {side}px; validation and test "
                 f"see {ds.image_size}px, as predict does")
    return big.train.x


# The decoded images go into memory when they take at most this share of the memory available: training
# needs the rest (the model, activations, the page cache of the files it reads).
IN_MEMORY_SHARE = 0.5


def _data_in_memory(mode: str, ds: Dataset, world, device: torch.device, notes: list[str], extra: int = 0) -> bool:
    """--data-in-memory: yes, no, or auto (decided from the decoded size and the memory available: the GPU's
    when training on one; streamed under torchrun, where the page cache holds one copy a machine instead of one
    a process). ``extra``: bytes of other images training holds (photos stored larger)."""
    size = extra + sum(p.x.nbytes for p in (ds.train, ds.val, ds.test) if p is not None)
    avail = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else available_memory()
    where = "GPU memory" if device.type == "cuda" else "memory"
    gib = f"{size / 2**30:.2f} GiB decoded, {avail / 2**30:.1f} GiB of {where} available"
    if mode == "auto":
        if world.size > 1:
            notes.append(f"data: streamed from the cache ({gib}): the {world.size} processes share its pages")
            return False
        in_memory = size <= IN_MEMORY_SHARE * avail
        notes.append(f"data: {'in memory' if in_memory else 'streamed from the cache'} ({gib}; "
                     "--data-in-memory yes/no to choose)")
        return in_memory
    fits = "" if mode == "no" or size <= avail else ", although it may not fit"
    notes.append(f"data: {'in memory' if mode == 'yes' else 'streamed from the cache'} as asked{fits} ({gib})")
    return mode == "yes"


def _imbalance_notes(cfg: TrainConfig, y: np.ndarray, classes: list[str]) -> list[str]:
    counts = np.bincount(y, minlength=len(classes))
    if len(counts) > 1 and counts.min() * 3 < counts.max():
        few, many = int(counts.argmin()), int(counts.argmax())
        hint = "" if (cfg.class_weights == "auto" or cfg.balanced_sampling) else \
            "; consider --class-weights auto or --balanced-sampling"
        return [f"class imbalance: {classes[many]!r} has {counts[many]:,} training images, "
                f"{classes[few]!r} only {counts[few]:,}{hint}"]
    return []


def _choose_validation(ds: Dataset, notes: list[str], keeps_last: bool):
    """-> (the split each validation scores, how the log names it). ``keeps_last``: the recipe validates only
    after the last epoch (--val-every 0), so no epoch is chosen on the split."""
    if ds.val is not None:
        share = len(ds.val.y) / (len(ds.val.y) + len(ds.train.y))
        how = "val/ folder" if ds.val_origin == "val-folder" else f"{share:.0%} of train, stratified"
        return ds.val, f"validation set: {len(ds.val.y):,} images ({how})"
    if ds.test is not None and keeps_last:
        notes.append("no validation set (no val/ folder, --val-split 0): the last epoch's weights are kept and "
                     "scored once on the TEST set; no epoch is chosen on it")
        return ds.test, f"none; the TEST set ({len(ds.test.y):,} images) scores the last epoch"
    if ds.test is not None:
        notes.append("no validation set (no val/ folder, --val-split 0): validating on the TEST set, "
                     "as the seeds do; the best epoch is then chosen on test data, so for an "
                     "unbiased test score pass --val-split 0.1")
        return ds.test, f"TEST set used for validation: {len(ds.test.y):,} images"
    if keeps_last:
        notes.append("no validation or test data: the last epoch's weights are kept")
        return None, "none (the last epoch is kept)"
    notes.append("no validation or test data: the best epoch is the one with the lowest train loss")
    return None, "none (best epoch by train loss)"

