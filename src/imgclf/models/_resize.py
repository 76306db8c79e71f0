"""Networks whose layer widths come from their weights: the registry's models after structured pruning.

    model = create_model_for(ckpt.meta["arch"], {k: v.shape for k, v in ckpt.state_dict.items()})

A pruned model (``arch["pruned"]`` true, see :mod:`imgclf.models._prune`) keeps the registry's layout, but its
convolutions, BatchNorms and linear layers are narrower than the constructor's arguments say. It is rebuilt as the
registry builds it, then each of those layers is narrowed to the shapes its weights have, and one image must pass
through, before a strict load. Only narrowing is explained by pruning: a layer wider than the registry's, a changed
kernel, a grouped convolution that is not depthwise, a head with other classes or a weight of another rank is refused,
and so is anything else that differs (the caller's strict load and checkpoint_check see to that).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import ImgclfError
from ._registry import create_model

PRUNED = "pruned"  # the arch key that says the widths come from the weights


def create_model_for(arch: Mapping, shapes: Mapping[str, Sequence[int]]) -> nn.Module:
    """The network a checkpoint describes: ``create_model(**arch)``, and for a pruned ``arch`` every layer narrowed
    to the widths of ``shapes`` (state-dict name -> shape). ``model.arch_args`` keeps ``pruned``."""
    arch = dict(arch)
    pruned = arch.pop(PRUNED, False)
    model = create_model(**arch)
    if pruned:
        resize_to(model, shapes)
        model.arch_args[PRUNED] = True
        if next(model.parameters()).device.type != "meta":
            _check_chain(model)
    return model


@torch.no_grad()
def _check_chain(model: nn.Module) -> None:
    """Each layer narrowed alone can still disagree with the next: one image through the model (its weights not yet
    loaded: only shapes matter) must come out as one logit a class. Not on the meta device, where a BatchNorm
    pass imports torch's decompositions (seconds)."""
    side, was_training = model.arch_args["image_size"], model.training
    try:
        out = model.eval()(torch.zeros(1, model.in_channels, side, side, device=next(model.parameters()).device))
    except RuntimeError as e:
        raise ImgclfError(f"the pruned {model.arch_args['name']}'s layers do not fit together "
                          f"({str(e).splitlines()[0][:120]}); the checkpoint is damaged") from None
    finally:
        model.train(was_training)
    if tuple(out.shape) != (1, model.num_classes):
        raise ImgclfError(f"the pruned {model.arch_args['name']} gives {list(out.shape)} outputs an image, not "
                          f"{model.num_classes}; the checkpoint is damaged")


def resize_to(model: nn.Module, shapes: Mapping[str, Sequence[int]]) -> None:
    """Narrow every Conv2d, BatchNorm and Linear of ``model`` to the shapes ``shapes`` gives their weights (values
    are left uninitialised: a load follows). Raises ImgclfError, one line, for a shape pruning cannot explain."""
    head = [m for m in model.get_classifier().modules() if isinstance(m, nn.Linear)]
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            _resize_conv(name, m, _shape(shapes, f"{name}.weight", m.weight))
        elif isinstance(m, _BatchNorm) and m.running_mean is not None:
            _resize_norm(name, m, _shape(shapes, f"{name}.running_mean", m.running_mean)[0])
        elif isinstance(m, nn.Linear):
            out_f, in_f = _shape(shapes, f"{name}.weight", m.weight)
            if m in head and out_f != m.out_features:
                raise ImgclfError(f"pruned head {name} has {out_f} outputs; pruning keeps its {m.out_features} classes")
            m.in_features = _narrower(name, "inputs", in_f, m.in_features)
            m.out_features = _narrower(name, "outputs", out_f, m.out_features)
            _replace(m, "weight", (out_f, in_f))
            _replace(m, "bias", (out_f,))
    if head:  # new_head() builds a head for this many features (train --init-from with other classes)
        model.num_features = head[0].in_features


def _shape(shapes: Mapping[str, Sequence[int]], key: str, current: torch.Tensor) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shapes.get(key, current.shape))
    if len(shape) != current.ndim:
        raise ImgclfError(f"pruned weight {key} has shape {list(shape)}, not a narrower {list(current.shape)}")
    return shape


def _narrower(layer: str, what: str, new: int, old: int) -> int:
    if not 1 <= new <= old:
        raise ImgclfError(f"pruned layer {layer} has {new} {what}; pruning leaves 1 to {old}")
    return new


def _resize_conv(name: str, m: nn.Conv2d, shape: tuple[int, ...]) -> None:
    out_c, per_group, *kernel = shape
    if tuple(kernel) != tuple(m.kernel_size):
        raise ImgclfError(f"pruned layer {name} has a {kernel} kernel; pruning keeps {list(m.kernel_size)}")
    if m.groups == 1:
        in_c, groups = per_group, 1
    elif m.groups == m.in_channels == m.out_channels and per_group == 1:  # depthwise: one filter per channel
        in_c = groups = out_c
    else:
        raise ImgclfError(f"pruned layer {name}: a grouped convolution other than depthwise cannot be resized")
    m.in_channels = _narrower(name, "input channels", in_c, m.in_channels)
    m.out_channels = _narrower(name, "output channels", out_c, m.out_channels)
    m.groups = groups
    _replace(m, "weight", shape)
    _replace(m, "bias", (out_c,))


def _resize_norm(name: str, m: _BatchNorm, n: int) -> None:
    m.num_features = _narrower(name, "channels", n, m.num_features)
    for attr in ("weight", "bias", "running_mean", "running_var"):
        _replace(m, attr, (n,))


def _replace(m: nn.Module, attr: str, shape: tuple[int, ...]) -> None:
    """A parameter or buffer of the new shape in place of ``attr``, on its device and dtype; a parameter keeps
    whether it trains (FastNet's BatchNorm scales stay fixed at 1)."""
    old = getattr(m, attr, None)
    if old is None or tuple(old.shape) == tuple(shape):
        return
    new = torch.empty(shape, dtype=old.dtype, device=old.device)
    if isinstance(old, nn.Parameter):
        setattr(m, attr, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        setattr(m, attr, new)  # a registered buffer: setattr replaces it in the module's buffers
