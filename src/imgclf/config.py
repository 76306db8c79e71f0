"""Training configuration: one frozen dataclass, the single source of defaults.

    cfg = TrainConfig.from_sources(config_file="run.toml", overrides={"epochs": 5})

A config file (TOML or JSON) is applied first, then explicit overrides (CLI flags or keyword arguments).
Unknown keys are rejected with the nearest valid name. Derived values (the learning rate an optimizer
defaults to, the device actually used) are never written back here: the trainer records them separately.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import json
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from .errors import ImgclfError

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

OPTIMIZERS = ("adam", "adamw", "sgd", "muon")
SCHEDULES = ("constant", "onecycle", "plateau", "cosine", "linear")
TTA_MODES = ("flip", "flip+translate", "translate")
PRECISIONS = ("auto", "fp32", "bf16")
MONITORS = ("val_loss", "val_acc")
TRACKERS = ("tensorboard", "mlflow")
DEFAULT_LR = {"adam": 1e-3, "adamw": 1e-3, "sgd": 0.05,  # Keras' Adam default; a safe SGD+Nesterov start
              "muon": 0.18}  # Muon's filter step (see optim.py); its SGD groups scale with it


@dataclass(frozen=True)
class TrainConfig:
    # --- data
    data: str = "cifar10"               # built-in name (cifar10), official archive/folder, or an image folder /
                                        # .tar(.gz) / .zip of one (train/<class>/*, test/<class>/*)
    image_size: int | None = None       # square input side; None = the dataset's native size
    val_split: float = 0.0              # fraction of train held out for validation (stratified, seeded)
    test_split: float = 0.0             # fraction held out for test when the data has no test/ folder
    skip_bad_images: bool = False       # skip (and list) unreadable images instead of stopping
    fraction: float = 1.0               # train on this fraction of the training images (stratified, seeded)
    exclude: str | None = None          # a CSV of images to leave out (doctor.csv: the rows whose action is
                                        # exclude; a list without an action column: every row)
    relabel: str | None = None          # a CSV of images to move to another class (doctor.csv: the rows whose
                                        # action is relabel, to the class in their suggested column)
    data_in_memory: str = "auto"        # yes: load the decoded images into memory; no: stream each batch from
                                        # the memory-mapped cache; auto: in memory when they take under half
                                        # the memory available (and streamed under torchrun: one copy a machine)
    # Settings left None are filled by the recipe (see recipes.py); a value given here always wins.
    recipe: str = "auto"                # auto (photo for large images, else fast), fast, seed or photo: the
                                        # defaults for every setting not given
    augment: str | None = None          # augmentation preset: none, flip, standard, strong, seed004, fast, shift, photo
    progressive: str | None = None      # progressive resizing "0.75:0.375,0.875:0.25": the first 37.5% of epochs
                                        # at 0.75x the input size, the next 25% at 0.875x, the rest full; "none"
    # --- model
    model: str | None = None            # registry name (`imgclf models` lists them)
    pretrained: str | None = None       # "imagenet" weights for models that have them; "none" = from scratch
    init_from: str | None = None        # start from this imgclf checkpoint/run (new head if classes differ)
    freeze_epochs: int | None = None    # train only the head for this many epochs first (fastai's fine_tune)
    backbone_lr_mult: float = 0.1       # backbone lr = lr x this when fine-tuning a pretrained/initialised model
    freeze_blocks: int | None = None    # fine-tuning: the stem and first N blocks keep their weights (no backward)
    freeze_bn: bool | None = None       # fine-tuning: BatchNorm keeps the loaded statistics (inference mode); false:
                                        # re-estimated as it trains (imgclf prune); None: true when fine-tuning
    # --- optimisation
    epochs: int | None = None           # number of epochs
    batch_size: int | None = None       # training batch size
    optimizer: str | None = None        # adam (the seeds'), adamw, sgd (Nesterov momentum), muon (+ Nesterov SGD)
    lr: float | None = None             # learning rate; None = the recipe's, or the optimizer's default (adam
                                        # 1e-3, sgd 0.05, muon 0.18)
    momentum: float = 0.9               # SGD momentum
    weight_decay: float | None = None   # weight decay (per example with muon)
    schedule: str | None = None         # constant, onecycle, cosine, linear (decay to 0), plateau (seed 004's)
    plateau_patience: int = 2           # epochs without improvement before plateau lowers the lr
    plateau_factor: float = 0.2         # lr multiplier on a plateau (Keras ReduceLROnPlateau-style)
    label_smoothing: float | None = None  # label smoothing (0 = off)
    class_weights: str = "none"         # "auto": weight the loss by inverse class frequency (imbalanced data)
    balanced_sampling: bool = False     # draw batches so every class is seen equally often (with replacement)
    # --- validation / early stopping
    monitor: str = "val_loss"           # what decides the best epoch and early stopping
    patience: int = 0                   # early stopping after this many epochs without improvement; 0 = off
    restore_best: bool = True           # end the run with the best epoch's weights (seed 004)
    val_every: int | None = None        # validate every N epochs and after the last (0: only then); None: recipe's
    tta: str | None = None              # final test-time augmentation: flip, flip+translate, translate, none
    time_budget: float | None = None    # finish, evaluated, within this time (300, 90s, 5m, 1h): epochs and
                                        # model width are planned from measured speed
    # --- run
    seed: int = 0                       # random seed: same seed, same run
    device: str = "auto"                # auto, cpu, cuda, cuda:N
    precision: str = "auto"             # auto (bf16 where the device computes it natively and it pays), fp32, bf16
    channels_last: bool = True          # memory format for conv nets
    sync_bn: bool = False               # several GPUs (torchrun): BatchNorm statistics over the whole batch
    eval_batch_size: int = 256          # batch size of validation and testing (256 scores fastest on 2 CPU cores)
    project: str = "runs"               # parent folder of run folders
    name: str | None = None             # run folder name; None = "<dataset>-<model>", auto-numbered
    log: tuple[str, ...] = ()           # experiment tracking, repeatable: tensorboard (events in the run folder),
                                        # mlflow (to MLFLOW_TRACKING_URI)

    def __post_init__(self):
        _check_types(self)
        _one_of("optimizer", self.optimizer, OPTIMIZERS)
        _one_of("schedule", self.schedule, SCHEDULES)
        _one_of("precision", self.precision, PRECISIONS)
        _one_of("monitor", self.monitor, MONITORS)
        _one_of("tta", self.tta, TTA_MODES + ("none",))
        _one_of("class_weights", self.class_weights, ("none", "auto"))
        _one_of("data_in_memory", self.data_in_memory, ("auto", "yes", "no"))
        for tracker in self.log:
            _one_of("log", tracker, TRACKERS)
        if self.val_every is not None and self.val_every < 0:
            raise ImgclfError(f"val_every must be 0 (only after the last epoch) or more, got {self.val_every}")
        for key in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ImgclfError(f"{key} must be at least 1, got {getattr(self, key)}")
        for key in ("val_split", "test_split"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ImgclfError(f"{key} must be a fraction in [0, 1), got {getattr(self, key)}")
        if not 0.0 < self.fraction <= 1.0:
            raise ImgclfError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.val_split + self.test_split >= 1.0:
            raise ImgclfError("val_split + test_split must leave some training data (sum < 1)")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ImgclfError(f"lr must be a positive number, got {self.lr}")
        if self.label_smoothing is not None and not 0.0 <= self.label_smoothing < 1.0:
            raise ImgclfError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.image_size is not None and self.image_size < 8:
            raise ImgclfError(f"image_size must be at least 8 pixels, got {self.image_size}")
        if (self.patience < 0 or (self.weight_decay or 0) < 0 or (self.freeze_epochs or 0) < 0
                or (self.freeze_blocks or 0) < 0):
            raise ImgclfError("patience, weight_decay, freeze_epochs and freeze_blocks must not be negative")
        if not 0.0 < self.backbone_lr_mult <= 1.0:
            raise ImgclfError(f"backbone_lr_mult must be in (0, 1], got {self.backbone_lr_mult}")
        if self.progressive is not None:
            progressive_sizes(self.progressive, 32, 1)  # raises on a malformed value
        if self.time_budget is not None and not (self.time_budget > 0 and math.isfinite(self.time_budget)):
            raise ImgclfError(f"time_budget must be a positive number of seconds, got {self.time_budget}")
        if self.name is not None and (not self.name or "/" in self.name or self.name in (".", "..")):
            raise ImgclfError(f"--name must be a plain folder name, got {self.name!r}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_sources(cls, config_file: str | Path | None = None, overrides: dict[str, Any] | None = None,
                     base: TrainConfig | None = None) -> TrainConfig:
        """``base`` (or the defaults) <- values from ``config_file`` <- ``overrides`` (None values ignored)."""
        values: dict[str, Any] = dataclasses.asdict(base) if base is not None else {}
        if config_file is not None:
            values.update(_check_keys(read_config_file(config_file), f"config file {config_file}"))
        values.update(_check_keys({k: v for k, v in (overrides or {}).items() if v is not None}, "arguments"))
        if isinstance(values.get("time_budget"), str):  # "5m" in a config file or a keyword argument
            values["time_budget"] = parse_duration(values["time_budget"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer or "adam"]

    def to_toml(self) -> str:
        """A flat TOML document that ``--config`` reads back (None values are left out)."""
        lines = ["# imgclf training config; reuse with: imgclf train --config config.toml"]
        for key, value in self.to_dict().items():
            if value is not None:
                lines.append(f"{key} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"


@functools.cache
def field_help() -> dict[str, str]:
    """Each :class:`TrainConfig` field's comment above, the one description of a setting: ``imgclf train --help``
    shows it. A comment continued on the next lines (at the same column) counts too."""
    out: dict[str, str] = {}
    name, column = None, -1
    for line in inspect.getsource(TrainConfig).splitlines():
        field = re.match(r"    (\w+): [^#]+#\s?(.*)$", line)
        more = re.match(r"(\s*)#\s?(.*)$", line)
        if field:
            name, column = field.group(1), line.index("#")
            out[name] = field.group(2).strip()
        elif more and name and len(more.group(1)) == column:
            out[name] += " " + more.group(2).strip()
        else:
            name = None
    return {k: v + ("" if v.endswith(".") else ".") for k, v in out.items()}


def progressive_sizes(spec: str | None, image_size: int, epochs: int) -> list[int]:
    """The input side for each epoch under a ``progressive`` spec: "0.75:0.375,0.875:0.25" = the first 37.5 % of
    the epochs at 0.75x the size, the next 25 % at 0.875x, the rest at full size (None or "none": all full).
    Shares, not epoch counts, so a shorter run (a time budget) keeps the same shape; an epoch takes the size
    of the stretch its middle falls in, except the last, always at full size."""
    stretches: list[tuple[float, float]] = []
    if spec and spec != "none":
        for part in spec.split(","):
            try:
                scale, share = (float(v) for v in part.split(":"))
            except ValueError:
                raise ImgclfError(f"progressive must look like 0.75:0.375,0.875:0.25 (scale:share of the epochs, "
                                  f"...), got {spec!r}") from None
            if not 0.25 <= scale <= 1.0 or not 0.0 <= share <= 1.0:
                raise ImgclfError(f"progressive: scales must be in [0.25, 1] and shares in [0, 1], got {part!r}")
            stretches.append((scale, share))
        if sum(share for _, share in stretches) > 1.0:
            raise ImgclfError(f"progressive: the shares add up to more than 1 in {spec!r}")
    sizes = []
    for epoch in range(epochs):
        middle, end, scale = (epoch + 0.5) / epochs, 0.0, 1.0
        for s, share in stretches:
            end += share
            if middle < end:
                scale = s
                break
        sizes.append(max(8, round(image_size * scale / 2) * 2))
    if sizes:
        sizes[-1] = image_size  # the last epoch always sees what evaluation will: full-size images
    return sizes


def parse_duration(text: str | float) -> float:
    """'300', '90s', '5m', '1.5h' -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    raw = str(text).strip().lower()
    try:
        return float(raw[:-1]) * units[raw[-1]] if raw[-1:] in units else float(raw)
    except ValueError:
        raise ImgclfError(f"cannot read {text!r} as a duration: write seconds (300) or 90s, 5m, 1h") from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ImgclfError(f"config file {path} not found")
    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
        else:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise ImgclfError(f"config file {path} is not valid {path.suffix.lstrip('.') or 'TOML'}: {e}") from e
    if not isinstance(data, dict):
        raise ImgclfError(f"config file {path} must hold a table of key = value pairs")
    # Accept `[train]` as a section too, so one file can later hold several sections.
    if set(data) == {"train"} and isinstance(data["train"], dict):
        data = data["train"]
    return {k.replace("-", "_"): v for k, v in data.items()}


def _check_keys(values: dict[str, Any], where: str) -> dict[str, Any]:
    valid = [f.name for f in fields(TrainConfig)]
    for key in values:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"
            raise ImgclfError(f"unknown setting {key!r} in {where}{hint}")
    return values


def _check_types(cfg: TrainConfig) -> None:
    hints = get_type_hints(TrainConfig)
    for f in fields(cfg):
        value, hint = getattr(cfg, f.name), hints[f.name]
        if get_origin(hint) is tuple:  # a list of values; one value alone (log="mlflow") is a list of one
            item = get_args(hint)[0]
            value = (value,) if isinstance(value, item) else value
            if not (isinstance(value, (list, tuple)) and all(isinstance(v, item) for v in value)):
                raise ImgclfError(f"setting {f.name!r} must be a list of {item.__name__}, got {value!r}")
            object.__setattr__(cfg, f.name, tuple(value))  # TOML and the command line give lists
            continue
        allowed = getattr(hint, "__args__", (hint,))
        if value is None and type(None) in allowed:
            continue
        if float in allowed and isinstance(value, int) and not isinstance(value, bool):
            object.__setattr__(cfg, f.name, float(value))  # TOML `lr = 1` means 1.0
            continue
        if not any(isinstance(value, t) and not (t is int and isinstance(value, bool))
                   for t in allowed if t is not type(None)):
            names = " or ".join(t.__name__ for t in allowed)
            raise ImgclfError(f"setting {f.name!r} must be {names}, got {value!r}")


def _one_of(key: str, value: str | None, choices: tuple[str, ...]) -> None:
    if value is not None and value not in choices:
        raise ImgclfError(f"{key} must be one of {', '.join(choices)}; got {value!r}")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string
