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

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

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
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint file, or a run folder (its ``best``, else ``last``). Refuses anything else."""
    path = resolve_checkpoint_path(path)
    try:
        with safe_open(str(path), framework="pt", device=str(map_location)) as f:
            raw_meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ImgclfError(
            f"{path} is not an imgclf checkpoint: imgclf reads only .safetensors files it wrote "
            f"(pickled PyTorch files are refused because loading them can run code) ({e})") from None
    try:
        meta = json.loads(raw_meta["imgclf"])
    except (KeyError, ValueError):
        raise ImgclfError(f"{path} is a safetensors file but has no imgclf metadata; "
                          "was it written by imgclf (a run's best.safetensors / last.safetensors)?") from None
    if meta.get("format") != FORMAT or int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise ImgclfError(f"{path}: unsupported checkpoint format {meta.get('format')!r} "
                          f"v{meta.get('format_version')}; upgrade imgclf")
    train_state = None
    if "imgclf_train_state" in raw_meta:
        train_state = _decode(json.loads(raw_meta["imgclf_train_state"]), tensors)
    state_dict = {k: v for k, v in tensors.items() if not k.startswith(_TRAIN_PREFIX)}
    return Checkpoint(state_dict=state_dict, meta=meta, train_state=train_state, path=path)


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
