"""Training recipes: named sets of defaults, chosen for the data when the user does not name one.

    resolved, why = resolve(TrainConfig(data="photos/"))   # -> a TrainConfig with every setting filled

A setting left as None in :class:`~imgclf.config.TrainConfig` is the recipe's to fill; one the user gave
always wins. ``recipe="auto"`` picks ``photo`` (an ImageNet-pretrained EfficientNet-Lite0, fine-tuned) for
a folder of photos, i.e. images larger than 64 px, and ``fast`` (FastNet trained from scratch with the
speed record's methods, tuned for a CPU) for CIFAR/MNIST-sized data; for digits and letters (MNIST, or
small greyscale images) ``fast`` shifts but never mirrors. ``seed`` is the seed notebooks' CNN
and schedule, one flag away. The user's config is never changed: the resolved one is a new object, and
the run records both.
"""
from __future__ import annotations

import dataclasses

from .config import DEFAULT_LR, TrainConfig
from .data.probe import ImageProbe, probe_images
from .errors import ImgclfError
from .models import has_pretrained, takes_one_input_size
from .models.fastnet import VARIANTS as FASTNET_VARIANTS

RECIPES: dict[str, dict] = {
    # CIFAR-sized data from scratch, fast: FastNet (patch whitening, BatchNorm/GELU conv groups), Muon for the
    # filters and Nesterov SGD for the rest, linear decay to 0, label smoothing 0.2, 2px shifts and alternating
    # flips, validation only at the end (the schedule is fixed, so no epoch is "best" before the last), and
    # flip+translate test-time augmentation. No progressive resizing: once subnormals are flushed
    # (utils.flush_denormals) a full-size epoch costs little more than a reduced one, and full-size epochs
    # train better for the time (benchmarks/cifar10_record.py).
    "fast": {"model": "fastnet", "epochs": 8, "batch_size": 1000, "optimizer": "muon", "lr": 0.18,
             "schedule": "linear", "label_smoothing": 0.2, "augment": "fast", "weight_decay": 2e-6,
             "freeze_epochs": 0, "val_every": 0, "tta": "flip+translate", "progressive": "none"},
    # The seeds' Keras recipe: their CNN, Adam 1e-3, batch 64, 10 epochs, no augmentation.
    "seed": {"model": "seed-cnn", "epochs": 10, "batch_size": 64, "optimizer": "adam", "lr": 1e-3,
             "schedule": "constant", "label_smoothing": 0.0, "augment": "none", "weight_decay": 0.0,
             "freeze_epochs": 0},
    # Photos: fine-tune ImageNet EfficientNet-Lite0 fastai-style: 1 head-only epoch on cached features,
    # then the whole net with a 10x lower backbone lr, one-cycle, label smoothing, crop+flip augmentation.
    # Validation only after the last epoch, whose weights the run keeps, as fastai's fine_tune does: the
    # one-cycle schedule ends at its best, and a photo folder's validation split is often a few dozen images,
    # too few to pick an epoch by: on a noisy score, "best" picks an early epoch by chance.
    # Less work per epoch: the stem and first 4 blocks (the 16- and 24-channel stages, the largest feature
    # maps) keep their ImageNet weights, so the backward pass stops before them, and the crops of all but
    # the last fifth of the epochs are 0.8x the side, tested at full size (Touvron et al. 2019: random
    # resized crops make objects look larger in training than in testing, so a smaller training size
    # matches): fine-tuning epochs 2.3x faster, the same accuracy on real photos (benchmarks/README.md).
    "photo": {"model": "efficientnet-lite0", "pretrained": "imagenet", "epochs": 6, "freeze_epochs": 1,
              "batch_size": 32, "optimizer": "adamw", "lr": 2e-3, "schedule": "onecycle",
              "label_smoothing": 0.1, "augment": "photo", "weight_decay": 0.01, "val_every": 0,
              "freeze_blocks": 5, "progressive": "0.8:0.8"},
}
# The fast recipe's optimizer settings are FastNet's (Muon at rates that BatchNorm after every conv makes
# safe); another model under it gets the robust Keras default instead, with the rest of the recipe.
FAST_OTHER_MODEL = {"optimizer": "adam", "lr": 1e-3, "batch_size": 128, "weight_decay": 0.0, "progressive": "none"}
# Digits and letters read differently in a mirror (a mirrored 2 is no 2): for them the fast recipe shifts only.
NO_MIRROR = {"augment": "shift", "tta": "translate"}
PHOTO_MIN_SIDE = 64      # images larger than this are "photos"
PHOTO_MAX_SIDE = 160     # input side for photos: EfficientNet's accuracy keeps most of its 224px value at a
                         # half of its CPU cost (cost grows with the square of the side)


def resolve(cfg: TrainConfig, probe: ImageProbe | None = None) -> tuple[TrainConfig, list[str]]:
    """-> (a copy of cfg with every recipe setting filled, one line per choice saying why). ``probe``: what
    the data's images look like (default: :func:`~imgclf.data.probe.probe_images` on ``cfg.data``)."""
    why = []
    name = cfg.recipe
    probe = probe_images(cfg.data) if probe is None else probe
    native_side = probe.side
    if name == "auto":
        photo = native_side is not None and native_side > PHOTO_MIN_SIDE and cfg.init_from is None
        name = "photo" if photo else "fast"
        why.append(f"recipe {name}: " + (f"images of about {native_side}px look like photos, so an ImageNet-"
                                         "pretrained backbone is fine-tuned" if photo else
                                         f"{native_side or 'small'}px images: FastNet from scratch "
                                         "(--recipe seed for the seed notebooks' CNN)"))
    if name not in RECIPES:
        raise ImgclfError(f"unknown recipe {name!r}; choose from auto, {', '.join(RECIPES)}")
    defaults = dict(RECIPES[name])
    if name == "fast" and cfg.model is not None and cfg.model not in FASTNET_VARIANTS:
        defaults.update(FAST_OTHER_MODEL)
        if cfg.optimizer is None:
            why.append(f"{cfg.model} is not a FastNet: Adam lr 1e-3, batch 128 instead of the fast recipe's "
                       "Muon settings")
    fill = {k: v for k, v in defaults.items() if getattr(cfg, k) is None}
    if cfg.lr is None and cfg.optimizer is not None and cfg.optimizer != defaults["optimizer"]:
        fill["lr"] = DEFAULT_LR[cfg.optimizer]  # the recipe's lr was tuned for its own optimizer
    if name == "photo" and cfg.image_size is None and native_side:
        side = max(PHOTO_MIN_SIDE, min(PHOTO_MAX_SIDE, round(native_side / 16) * 16))  # nearest multiple of 16
        fill["image_size"] = side
        why.append(f"image size {side}px: the photos' median shorter side {native_side}px, capped at "
                   f"{PHOTO_MAX_SIDE}px for CPU speed (set --image-size to change)")
    if name == "fast" and _mirror_changes_class(probe) and {"augment", "tta"} & fill.keys():
        changed = [k for k in NO_MIRROR if k in fill]
        fill.update({k: NO_MIRROR[k] for k in changed})
        where = " or ".join({"augment": "training", "tta": "TTA"}[k] for k in changed)
        why.append(f"no mirror images in {where}: " + ("this dataset's classes change when mirrored"
                   if probe.mirror_safe is False else f"small ({native_side}px) greyscale images are taken for "
                   "digits or letters, which a mirror changes") + " (--augment fast --tta flip+translate puts "
                   "them back)")
    if fill.get("pretrained") and cfg.model is not None and not has_pretrained(cfg.model, fill["pretrained"]):
        fill.pop("pretrained")  # the user's own model choice has no such weights
        fill.pop("freeze_blocks", None)  # ... and its own blocks
        if fill.get("freeze_epochs"):  # a head on random features learns nothing worth an epoch
            fill["freeze_epochs"] = 0
        why.append(f"{cfg.model} has no {defaults['pretrained']} weights: trained from scratch, no head-only epoch")
    if fill.get("progressive") not in (None, "none") and cfg.model is not None and takes_one_input_size(cfg.model):
        fill["progressive"] = "none"
        why.append(f"no progressive resizing: {cfg.model} takes one input size only (a dense layer sized for it)")
    if "freeze_blocks" in fill and (fill.get("pretrained") or cfg.pretrained) in (None, "none"):
        fill.pop("freeze_blocks")  # from scratch: nothing to keep
    epochs = cfg.epochs or fill.get("epochs", 0)
    if fill.get("freeze_epochs") and fill["freeze_epochs"] >= epochs:  # the user's --epochs is short
        fill["freeze_epochs"] = max(0, epochs - 1)
        why.append(f"{fill['freeze_epochs']} head-only epochs: the recipe's {defaults['freeze_epochs']} would "
                   f"leave none of the {epochs} to fine-tune the whole model")
    resolved = dataclasses.replace(cfg, recipe=name, **fill)
    if resolved.freeze_epochs >= resolved.epochs and resolved.freeze_epochs:
        raise ImgclfError(f"--freeze-epochs {resolved.freeze_epochs} leaves no epoch to fine-tune the whole "
                          f"model in {resolved.epochs} epochs; raise --epochs or lower --freeze-epochs")
    return resolved, why


def _mirror_changes_class(probe: ImageProbe) -> bool:
    """False unless the source says so (a built-in like MNIST) or its images look like characters: greyscale
    and CIFAR-sized or smaller. Colour photos and unknown sources keep their mirror images."""
    if probe.mirror_safe is not None:
        return not probe.mirror_safe
    return probe.channels == 1 and probe.side is not None and probe.side <= 32
