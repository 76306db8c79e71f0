"""Checkpoints: one ``.safetensors`` file = weights + JSON metadata (+ training state for ``last``).

    save_checkpoint("runs/x/best.safetensors", model, meta)
    ckpt = load_checkpoint("runs/x/best.safetensors")   # -> Checkpoint(state_dict, meta, train_state)

Why safetensors: loading it only ever parses a JSON header and raw tensor bytes, so opening a stranger's
checkpoint cannot run code (a pickled ``torch.save`` file can). The metadata travels inside the same file
(the safetensors header's ``__metadata__``), so weights and their class names can never be separated.

Training state (optimizer, scheduler, RNG states, counters) is stored in the same file under the
``train/`` tensor prefix plus a JSON skeleton in the metadata; any nested Python structure of dicts,
lists, tuples, numbers, strings and tensors round-trips (see ``_encode``/``_decode``).
"""
from __future__ import annotations

import contextlib
import errno
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .checkpoint_check import (
    MAX_META_CHARS,
    MAX_TRAIN_STATE_CHARS,
    Invalid,
    check_layout,
    check_meta,
    check_skeleton,
    check_train_state,
    parse_json,
    show,
)
from .errors import ImgclfError
from .utils import atomic_path

FORMAT = "imgclf-checkpoint"
FORMAT_VERSION = 1
_TRAIN_PREFIX = "train/"  # model state keys never contain "/", so the prefixes cannot collide


@dataclass
class Checkpoint:
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any]                       # arch, classes, preprocess, metrics, data, versions ...
    train_state: dict[str, Any] | None = None  # only in `last`: optimizer, scheduler, rng, counters
    path: Path | None = field(default=None, compare=False)


def save_checkpoint(path: str | Path, model: torch.nn.Module | dict[str, torch.Tensor], meta: dict[str, Any],
                    train_state: dict[str, Any] | None = None) -> Path:
    """Write atomically: a crash mid-write leaves the previous file intact, never a truncated one."""
    state = model.state_dict() if isinstance(model, torch.nn.Module) else model
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta}
    metadata = {"imgclf": json.dumps(header)}
    if train_state is not None:
        skeleton = _encode(train_state, tensors, _TRAIN_PREFIX)
        metadata["imgclf_train_state"] = json.dumps(skeleton)
    # safetensors refuses tensors that share memory; clone any that alias another.
    seen: dict[int, str] = {}
    for k, v in tensors.items():
        ptr = v.data_ptr() if v.numel() else None
        if ptr is not None and ptr in seen:
            tensors[k] = v.clone()
        elif ptr is not None:
            seen[ptr] = k
    path = Path(path)
    with atomic_path(path, durable=True) as tmp:  # fsynced: a power cut never takes the last good `last`
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as e:  # its I/O errors, as the OSError atomic_path reports in one line
            code = re.search(r"code: (\d+)", str(e))
            raise OSError(int(code.group(1)) if code else errno.EIO, str(e)) from None
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint file, or a run folder (its ``best``, else ``last``). Refuses anything else.

    Nothing in the file is believed before it is checked (see checkpoint_check): the metadata's types and
    bounds, the weights' names, shapes and dtypes against the network the metadata describes (built on the
    meta device), the training state's references; then the weights must be finite. A file that is not an
    imgclf checkpoint raises ImgclfError, one that is but is truncated, garbled or inconsistent raises
    :class:`DamagedCheckpoint`; both one line, naming the file."""
    path = resolve_checkpoint_path(path)
    with contextlib.ExitStack() as stack:  # one open file throughout: a file replaced meanwhile cannot mix in
        with _reading(path):
            f = stack.enter_context(safe_open(str(path), framework="pt", device=str(map_location)))
            raw_meta = f.metadata() or {}
            layout = {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118
        meta, skeleton, float_keys = _checked_metadata(path, raw_meta, layout)
        with _reading(path, device=str(map_location)):
            tensors = {k: f.get_tensor(k) for k in layout}
    state_dict = {k: v for k, v in tensors.items() if not k.startswith(_TRAIN_PREFIX)}
    bad = next((k for k in float_keys if not _finite(state_dict[k])), None)
    if bad is not None:
        raise DamagedCheckpoint(path, f"its weights are damaged: {bad} holds NaN or infinite values")
    train_state = None
    if skeleton is not None:
        try:
            train_state = _decode(skeleton, tensors)
            if "arch" in meta:  # a training run's `last`: what resuming reads
                check_train_state(train_state)
        except Invalid as e:
            raise DamagedCheckpoint(path, str(e)) from None
    return Checkpoint(state_dict=state_dict, meta=meta, train_state=train_state, path=path)


class DamagedCheckpoint(ImgclfError):
    """An imgclf checkpoint that cannot be used as it is: truncated, garbled, or its parts disagree.
    ``path``: the file; ``reason``: what is wrong (one line)."""

    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path} is damaged: {reason}; copy it again, pass another checkpoint (e.g. the run's "
                         "best.safetensors) or retrain")

    def __reduce__(self):  # picklable although __init__ takes two arguments
        return type(self), (self.path, self.reason)


@contextlib.contextmanager
def _reading(path: Path, device: str | None = None):
    """safetensors' and the OS's errors on reading ``path`` -> one-line ImgclfError (DamagedCheckpoint when the
    file starts like a safetensors file: a truncated or garbled one). ``device``: tensors are being put there,
    so torch's RuntimeError/ValueError are about the device, not the file."""
    try:
        yield
    except MemoryError:
        raise ImgclfError(f"{path}: not enough memory to load this checkpoint ({_size(path)}); free some memory "
                          "or load it on a bigger machine") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        detail = show(str(e).splitlines()[0] if str(e) else type(e).__name__, 160)
        if device not in (None, "cpu") and isinstance(e, (ValueError, RuntimeError)):
            raise ImgclfError(f"{path}: cannot load its tensors onto {device} ({detail}); "
                              "load it onto the CPU") from None
        if _looks_like_safetensors(path):
            raise DamagedCheckpoint(path, f"truncated or garbled ({detail})") from None
        raise ImgclfError(
            f"{path} is not an imgclf checkpoint: imgclf reads only .safetensors files it wrote "
            f"(pickled PyTorch files are refused because loading them can run code) ({detail})") from None


def _finite(t: torch.Tensor) -> bool:
    """No NaN or infinity in ``t``. min and max propagate NaN: 2 ms for 11M floats, isfinite().all() 100 ms."""
    if not t.numel():
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) and torch.isfinite(hi))


def _looks_like_safetensors(path: Path) -> bool:
    """An 8-byte little-endian header length, then the JSON header's ``{`` (an empty file counts too)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError:
        return False
    return len(head) == 0 or (len(head) == 9 and head[8:9] == b"{")


def _size(path: Path) -> str:
    try:
        return f"{path.stat().st_size / 2**20:,.0f} MiB"
    except OSError:
        return "size unknown"


def _checked_metadata(path: Path, raw_meta: dict[str, str], layout: dict[str, tuple[list[int], str]]):
    """-> (meta, training-state skeleton or None, names of the model's floating-point tensors), all checked."""
    if "imgclf" not in raw_meta:
        raise ImgclfError(f"{path} is a safetensors file but has no imgclf metadata; "
                          "was it written by imgclf (a run's best.safetensors / last.safetensors)?")
    try:
        meta = parse_json(raw_meta["imgclf"], "its imgclf metadata", MAX_META_CHARS)
        if not isinstance(meta, dict):
            raise Invalid("its imgclf metadata is not a JSON object")
        fmt, version = meta.get("format"), meta.get("format_version", 0)
        if fmt is None:
            raise Invalid("its imgclf metadata lacks its format")
        if isinstance(version, bool) or not isinstance(version, int):
            raise Invalid(f"format_version must be an integer, got {show(version)}")
        if fmt != FORMAT or version > FORMAT_VERSION:
            raise ImgclfError(f"{path}: unsupported checkpoint format {show(fmt)} v{version} (this imgclf reads "
                              f"{FORMAT} v{FORMAT_VERSION}); upgrade imgclf")
        check_meta(meta)
        skeleton = None
        if "imgclf_train_state" in raw_meta:
            skeleton = parse_json(raw_meta["imgclf_train_state"], "its training state", MAX_TRAIN_STATE_CHARS)
            check_skeleton(skeleton, set(layout), _TRAIN_PREFIX)
        model_layout = {k: v for k, v in layout.items() if not k.startswith(_TRAIN_PREFIX)}
        return meta, skeleton, check_layout(meta, model_layout)
    except Invalid as e:
        raise DamagedCheckpoint(path, str(e)) from None


def resolve_checkpoint_path(path: str | Path) -> Path:
    """A run folder -> its best (else last) checkpoint; ``runs/NAME/best`` -> ``runs/NAME/best.safetensors``."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.safetensors", "last.safetensors"):
            if (path / name).is_file():
                return path / name
        raise ImgclfError(f"{path} holds no checkpoint (best.safetensors or last.safetensors); "
                          "pass a run folder written by `imgclf train` or a .safetensors file")
    if not path.exists() and not path.suffix and path.with_suffix(".safetensors").is_file():
        return path.with_suffix(".safetensors")  # runs/NAME/best, as Ultralytics users write it
    if not path.exists():
        raise ImgclfError(f"checkpoint {path} not found; pass a run folder (runs/NAME), runs/NAME/best, or a "
                          ".safetensors file")
    if not path.is_file():  # a FIFO would block the read, a device never end
        raise ImgclfError(f"checkpoint {path} is not a regular file; pass a run folder or a .safetensors file")
    return path


# ---------------------------------------------------------------------------- nested state <-> JSON + tensors
def _encode(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """Replace tensors by {"__tensor__": key} (stored in ``tensors``); keep dict key types and tuples."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}{len(tensors)}"  # unique: tensors only grows
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and "__tensor__" not in obj:
            return {k: _encode(v, tensors, prefix) for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors, prefix), _encode(v, tensors, prefix)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, prefix) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors, prefix) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj
