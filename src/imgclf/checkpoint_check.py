"""Checks of a checkpoint's metadata before anything believes it (used by checkpoint.py and onnx_runtime.py).

A checkpoint is a stranger's file as often as our own: its JSON says which network to build, how many classes,
which image size to decode to, and which tensors hold the training state. Each check here raises
:class:`Invalid` with a one-line reason; the caller adds the file name and what to do.

    meta = parse_json(text, "its imgclf metadata", MAX_META_CHARS)
    check_meta(meta)                          # types and bounds of every field other code reads
    float_keys = check_layout(meta, shapes)   # the weights fit the network the metadata describes

Bounds: at most 100,000 classes of at most 1,000 characters; images of 8..2,048 px, 1 or 3 channels; JSON
at most 32 levels deep (the real training state is 7), its text at most 16 MiB (metadata; 21k ImageNet
class names take 0.5 MB) or 64 MiB (training state; safetensors' own header limit is 100 MB).
"""
from __future__ import annotations

import json
import math
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from .data.images import Preprocess
from .errors import ImgclfError
from .models import PRUNED, create_model, list_models
from .models._resize import resize_to

MAX_META_CHARS = 16 * 2**20
MAX_TRAIN_STATE_CHARS = 64 * 2**20
MAX_DEPTH = 32
MAX_CLASSES = 100_000
MAX_CLASS_CHARS = 1_000
IMAGE_SIZES = (8, 2048)          # resnet18's minimum, and far beyond what these CNNs are trained at
CHANNELS = (1, 3)
RESIZE_MODES = ("shorter-center-crop",)
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors' names of what a model state may hold
MAX_COUNT = 10**9                # epochs, steps and the like
_OPTIONS = {  # model options the registered builders take, and their bounds
    "dropout": lambda v, what: _number(v, 0.0, 1.0, what),
    "zero_init_residual": lambda v, what: _type(v, bool, what),
    "widths": lambda v, what: [_int(w, 1, 4096, f"{what}[{i}]") for i, w in enumerate(_list(v, 1, 8, what))],
}


class Invalid(Exception):
    """A check failed; the message is one line saying which field and why."""


def show(value: Any, limit: int = 60) -> str:
    """A value for an error message: one line, at most ``limit`` characters."""
    try:
        text = repr(value)
    except ValueError:  # an int too long to print
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def parse_json(text: Any, what: str, max_chars: int) -> Any:
    """JSON text -> value, its size and depth bounded (so the recursive code that walks it later is safe)."""
    if not isinstance(text, str):
        raise Invalid(f"{what} is not text")
    if len(text) > max_chars:
        raise Invalid(f"{what} is {len(text):,} characters long (at most {max_chars:,})")
    try:
        value = json.loads(text)
    except RecursionError:
        raise Invalid(f"{what} is nested too deeply") from None
    except ValueError as e:
        raise Invalid(f"{what} is not valid JSON ({show(str(e), 80)})") from None
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise Invalid(f"{what} is nested more than {MAX_DEPTH} levels deep")
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((child, depth + 1) for child in children)
    return value


# ---------------------------------------------------------------------------------------------- values
_NAMES = {dict: "a JSON object", list: "a list", str: "a string", bool: "true or false", int: "an integer",
          float: "a number"}


def _type(v: Any, kind: type | tuple, what: str) -> Any:
    if not isinstance(v, kind) or (isinstance(v, bool) and kind in (int, (int, float))):
        names = " or ".join(_NAMES[k] for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise Invalid(f"{what} must be {names}, got {show(v)}")
    return v


def _int(v: Any, lo: int, hi: int, what: str) -> int:
    if not (isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi):
        raise Invalid(f"{what} must be an integer in {lo:,}..{hi:,}, got {show(v)}")
    return v


def _number(v: Any, lo: float, hi: float, what: str) -> float:
    if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and lo <= v <= hi):
        raise Invalid(f"{what} must be a number in {lo:g}..{hi:g}, got {show(v)}")
    return v


def _str(v: Any, max_chars: int, what: str, empty: bool = True) -> str:
    if not isinstance(v, str) or len(v) > max_chars or (not empty and not v):
        raise Invalid(f"{what} must be {'a' if empty else 'a non-empty'} string of at most {max_chars:,} "
                      f"characters, got {show(v)}")
    return v


def _channels(v: Any, what: str) -> int:
    if not (isinstance(v, int) and not isinstance(v, bool) and v in CHANNELS):
        raise Invalid(f"{what} must be 1 or 3, got {show(v)}")
    return v


def _list(v: Any, lo: int, hi: int, what: str) -> list:
    if not isinstance(v, list) or not lo <= len(v) <= hi:
        count = f"{lo:,}" if lo == hi else f"{lo:,}..{hi:,}"
        raise Invalid(f"{what} must be a list of {count} items, got {show(v)}")
    return v


def _dict(v: Any, what: str, required: tuple[str, ...] = ()) -> dict:
    _type(v, dict, what)
    missing = [k for k in required if k not in v]
    if missing:
        raise Invalid(f"{what} lacks {', '.join(missing)}")
    return v


def _optional(meta: dict, key: str, check) -> None:
    if meta.get(key) is not None:
        check(meta[key], key)


# ---------------------------------------------------------------------------------------------- metadata
def check_meta(meta: Any, required: tuple[str, ...] = ()) -> None:
    """Types and bounds of the fields imgclf reads. A model checkpoint (one with ``arch``) also needs its classes
    and preprocessing, which must agree with the architecture."""
    _type(meta, dict, "the metadata")
    _dict(meta, "the metadata", required + (("classes", "preprocess") if "arch" in meta else ()))
    if "arch" in meta:
        arch = _check_arch(meta["arch"])
    if "classes" in meta:
        classes = _list(meta["classes"], 1, MAX_CLASSES, "classes")
        for i, name in enumerate(classes):
            _str(name, MAX_CLASS_CHARS, f"classes[{i}]", empty=False)
        if len(set(classes)) != len(classes):
            raise Invalid("classes has repeated names")
    if "preprocess" in meta:
        pre = _dict(meta["preprocess"], "preprocess", ("image_size", "channels", "mean", "std"))
        unknown = sorted(set(pre) - set(Preprocess.__dataclass_fields__))
        if unknown:
            raise Invalid(f"preprocess has unknown fields {show(unknown)}")
        _int(pre["image_size"], *IMAGE_SIZES, "preprocess.image_size")
        channels = _channels(pre["channels"], "preprocess.channels")
        for key, lo, hi in (("mean", -1.0, 2.0), ("std", 1e-4, 10.0)):
            for i, v in enumerate(_list(pre[key], channels, channels, f"preprocess.{key}")):
                _number(v, lo, hi, f"preprocess.{key}[{i}]")
        if pre.get("resize", RESIZE_MODES[0]) not in RESIZE_MODES:
            raise Invalid(f"preprocess.resize must be one of {', '.join(RESIZE_MODES)}, got {show(pre['resize'])}")
    if "arch" in meta:
        if len(meta["classes"]) != arch["num_classes"]:
            raise Invalid(f"{len(meta['classes']):,} class names for a network of {arch['num_classes']:,} classes")
        if meta["preprocess"]["channels"] != arch.get("in_channels", 3):
            raise Invalid(f"preprocess.channels {meta['preprocess']['channels']} differs from the network's "
                          f"in_channels {arch.get('in_channels', 3)}")
    _optional(meta, "channels_last", lambda v, what: _type(v, bool, what))
    _optional(meta, "temperature", lambda v, what: _number(v, 0.01, 100.0, what))
    _optional(meta, "temperature_fitted_on", lambda v, what: _str(v, 1000, what))
    _optional(meta, "kind", lambda v, what: _str(v, 100, what))
    _optional(meta, "epoch", lambda v, what: _int(v, 0, MAX_COUNT, what))
    for key in ("metrics", "best", "test_metrics", "onnx", "tflite"):
        _optional(meta, key, lambda v, what: _type(v, dict, what))
    _optional(meta, "data", _check_data)


def _check_arch(arch: Any) -> dict:
    _dict(arch, "arch", ("name", "num_classes"))
    if "pretrained" in arch:  # create_model would load published weights; a checkpoint brings its own
        raise Invalid("arch.pretrained has no place in a checkpoint (its own weights replace them)")
    if arch["name"] not in list_models():
        raise Invalid(f"arch.name {show(arch['name'])} is not a model this imgclf knows ({', '.join(list_models())})")
    _int(arch["num_classes"], 1, MAX_CLASSES, "arch.num_classes")
    _channels(arch.get("in_channels", 3), "arch.in_channels")
    _int(arch.get("image_size", 32), *IMAGE_SIZES, "arch.image_size")
    _optional(arch, PRUNED, lambda v, what: _type(v, bool, f"arch.{what}"))  # the widths come from the weights
    for key, value in arch.items():
        if key in _OPTIONS:
            _OPTIONS[key](value, f"arch.{key}")
        elif key not in ("name", "num_classes", "in_channels", "image_size"):  # a future option: a plain value
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                _number(value, -1e6, 1e6, f"arch.{key}")
            elif not (value is None or isinstance(value, bool) or (isinstance(value, str) and len(value) <= 100)):
                raise Invalid(f"arch.{key} must be a number, bool or short string, got {show(value)}")
    return arch


def _check_data(rec: Any, what: str) -> None:
    _dict(rec, what)
    for key in ("source", "name", "builtin"):
        _optional(rec, key, lambda v, w: _str(v, 4096, f"{what}.{w}"))
    for key in ("val_split", "test_split"):
        _optional(rec, key, lambda v, w: _number(v, 0.0, 1.0, f"{what}.{w}"))
    _optional(rec, "seed", lambda v, w: _int(v, -(2**63), 2**64 - 1, f"{what}.{w}"))
    _optional(rec, "skip_bad_images", lambda v, w: _type(v, bool, f"{what}.{w}"))
    _optional(rec, "image_size", lambda v, w: _int(v, 1, IMAGE_SIZES[1], f"{what}.{w}"))
    _optional(rec, "channels", lambda v, w: _channels(v, f"{what}.{w}"))
    _optional(rec, "exclude", lambda v, w: _names(v, f"{what}.{w}"))
    _optional(rec, "relabel", lambda v, w: _relabels(v, f"{what}.{w}"))


def _names(value: Any, what: str) -> None:
    """Image names (--exclude): a list of short strings."""
    _type(value, list, what)
    for i, name in enumerate(value):
        _str(name, 4096, f"{what}[{i}]")


def _relabels(value: Any, what: str) -> None:
    """Image name -> class name (--relabel)."""
    _dict(value, what)
    for name, cls in value.items():
        _str(name, 4096, f"{what} key")
        _str(cls, MAX_CLASS_CHARS, f"{what}[{show(name)}]")


# ---------------------------------------------------------------------------------------------- tensors
def check_layout(meta: dict, layout: dict[str, tuple[list[int], str]]) -> list[str]:
    """The model state (``layout``: name -> (shape, safetensors dtype), no ``train/`` tensors) must be exactly the
    state of the network ``meta["arch"]`` describes, built on the meta device (nothing allocated); a pruned one
    narrowed to the weights' shapes first, as loading does (models._resize). -> the names of its floating-point
    tensors."""
    if "arch" not in meta:
        return [k for k, (_, dtype) in layout.items() if dtype in FLOAT_DTYPES]
    arch, size = meta["arch"], meta["preprocess"]["image_size"]
    model = _meta_model(arch)
    if arch.get(PRUNED):  # narrower layers than the registry's: shape-driven, then the same checks as any other
        _narrow_to(model, arch, {k: shape for k, (shape, _) in layout.items()})
    if size != arch.get("image_size", 32):  # predictions are made at the preprocessing's size
        if getattr(model, "fixed_input_size", False):
            raise Invalid(f"preprocess.image_size {size} differs from arch.image_size {arch.get('image_size', 32)}, "
                          f"and {arch['name']} takes one input size only")
        _meta_model({**arch, "image_size": size})
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(layout)), sorted(set(layout) - set(expected))
    if missing or unexpected:
        raise Invalid(f"its weights do not fit {arch['name']}: missing {show(missing[:3])}, "
                      f"unexpected {show(unexpected[:3])}")
    for name, ref in expected.items():
        shape, dtype = layout[name]
        if list(shape) != list(ref.shape):
            raise Invalid(f"weight {show(name)} has shape {show(list(shape))}, {arch['name']} needs {list(ref.shape)}")
        if (dtype in FLOAT_DTYPES) != ref.is_floating_point():
            raise Invalid(f"weight {show(name)} is stored as {show(dtype)}, {arch['name']} needs {ref.dtype}")
    return [k for k, ref in expected.items() if ref.is_floating_point()]


_IN_PLACE = (torch.Tensor.normal_, torch.Tensor.div_, torch.Tensor.__itruediv__)


class _NoInit(TorchFunctionMode):
    """On the meta device only shapes matter: weight initialisation is skipped (``torch.nn.init`` functions and
    ``normal_`` and in-place division return their tensor, ``std()`` an empty scalar). A speed-up, nothing else:
    the first ``normal_`` or ``std`` on meta tensors imports torch._dynamo, 1.2 s of a CLI call that loads a
    FastNet or ResNet, and the first in-place division (FastNet's head) sympy, 0.9 s."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        module, name = getattr(func, "__module__", None), getattr(func, "__name__", "")
        if (module == "torch.nn.init" and name.endswith("_")) or func in _IN_PLACE:
            return args[0] if args else kwargs["tensor"]
        if func is torch.Tensor.std and len(args) == 1 and not kwargs:
            return args[0].new_empty(())
        return func(*args, **kwargs)


def _meta_model(arch: dict) -> torch.nn.Module:
    try:
        with torch.device("meta"), _NoInit():
            return create_model(**{k: v for k, v in arch.items() if k != PRUNED})
    except Exception as e:  # noqa: BLE001  (the builder's own refusal, whatever its type: the arch is damaged)
        raise Invalid(f"arch {show(arch, 120)} does not build ({show(str(e), 120)})") from None


def _narrow_to(model: torch.nn.Module, arch: dict, shapes: dict[str, list[int]]) -> None:
    """A pruned network: its layers narrowed to the weights' shapes, each of which must be what pruning leaves
    (narrower, same kernel, the head's classes kept). That the widths chain up is checked when the model is built
    for real (models._resize.create_model_for), where a forward pass costs nothing to import."""
    try:
        with torch.device("meta"):
            resize_to(model, shapes)
    except ImgclfError as e:
        raise Invalid(f"its weights do not fit a pruned {arch['name']}: {e}") from None


# ---------------------------------------------------------------------------------------------- training state
def check_skeleton(skeleton: Any, tensors: set[str], prefix: str) -> None:
    """The JSON of a training state (see checkpoint._encode): every ``__tensor__`` names a ``prefix`` tensor of the
    file, ``__items__`` are [key, value] pairs with hashable keys, ``__tuple__`` holds a list. Depth is bounded
    by parse_json already."""
    stack = [skeleton]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict) and "__tensor__" in node:
            ref = node["__tensor__"]
            if not (isinstance(ref, str) and ref.startswith(prefix) and ref in tensors):
                raise Invalid(f"the training state refers to a tensor {show(ref)} the file does not hold")
        elif isinstance(node, dict) and "__items__" in node:
            for pair in _list(node["__items__"], 0, 10**7, "a mapping of the training state"):
                if not (isinstance(pair, list) and len(pair) == 2 and _hashable(pair[0])):
                    raise Invalid(f"the training state holds a bad mapping entry {show(pair)}")
                stack.append(pair[1])
        elif isinstance(node, dict) and "__tuple__" in node:
            stack.extend(_list(node["__tuple__"], 0, 10**7, "a tuple of the training state"))
        elif isinstance(node, dict):
            stack.extend(node.values())


def _hashable(key: Any) -> bool:
    if isinstance(key, dict):
        items = key.get("__tuple__")
        return set(key) == {"__tuple__"} and isinstance(items, list) and all(map(_hashable, items))
    return key is None or isinstance(key, (str, int, float, bool))


def check_train_state(ts: Any) -> None:
    """What ``training.state.TrainState.restore`` reads from a decoded training state, and its types."""
    _dict(ts, "the training state", ("optimizer", "rng", "epoch", "step", "sums", "best_score", "best_epoch",
                                     "bad_epochs", "history"))
    for key in ("epoch", "step", "bad_epochs"):
        _int(ts[key], 0, MAX_COUNT, f"train_state.{key}")
    _optional(ts, "best_epoch", lambda v, what: _int(v, 0, MAX_COUNT, f"train_state.{what}"))
    _optional(ts, "best_score", lambda v, what: _type(v, (int, float), f"train_state.{what}"))
    for i, v in enumerate(_list(ts["sums"], 3, 3, "train_state.sums")):
        _type(v, (int, float), f"train_state.sums[{i}]")
    for i, row in enumerate(_list(ts["history"], 0, 10**6, "train_state.history")):
        _dict(row, f"train_state.history[{i}]")
    opt = _dict(ts["optimizer"], "train_state.optimizer", ("state", "param_groups"))
    _type(opt["state"], dict, "train_state.optimizer.state")
    ids: list = []
    for i, group in enumerate(_list(opt["param_groups"], 1, 10_000, "train_state.optimizer.param_groups")):
        params = _dict(group, f"param_groups[{i}]", ("params",))["params"]
        ids += [_int(p, 0, 10**9, f"param_groups[{i}].params item") for p in _list(params, 0, 10**6, "params")]
    if len(set(ids)) != len(ids) or not set(opt["state"]) <= set(ids):
        raise Invalid("train_state.optimizer refers to parameters inconsistently")
    for key, value in opt["state"].items():
        _type(value, dict, f"train_state.optimizer.state[{show(key)}]")
    _optional(ts, "scheduler", lambda v, what: _type(v, dict, f"train_state.{what}"))
    rng = _dict(ts["rng"], "train_state.rng", ("torch", "augment"))
    cpu_state = torch.get_rng_state().numel()
    _rng_state(rng["torch"], "train_state.rng.torch", cpu_state)
    _optional(rng, "shuffle", lambda v, what: _rng_state(v, f"train_state.rng.{what}", cpu_state))
    _optional(rng, "device", lambda v, what: _str(v, 32, f"train_state.rng.{what}"))
    _rng_state(rng["augment"], "train_state.rng.augment", cpu_state if rng.get("device") == "cpu" else None)
    _optional(rng, "cuda", lambda v, what: [_rng_state(s, f"train_state.rng.{what}[{i}]", None)
                                            for i, s in enumerate(_list(v, 0, 1024, f"train_state.rng.{what}"))])


def _rng_state(t: Any, what: str, numel: int | None) -> None:
    if not (isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.ndim == 1
            and (t.numel() == numel if numel else 0 < t.numel() <= 65536)):
        got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else show(t)
        raise Invalid(f"{what} is not a random generator state (got {got})")
