"""The model registry: one decorator to add a builder, one constructor to get a model.

    model = create_model("resnet18", num_classes=10, in_channels=3, image_size=32)

Builders take ``(num_classes, in_channels, image_size, **options)`` and return an
:class:`~imgclf.models._base.ImageClassifier`. ``create_model`` records the resolved arguments
in ``model.arch_args`` so ``create_model(**model.arch_args)`` rebuilds the same architecture.
"""
from __future__ import annotations

import difflib
import inspect
import json
from collections.abc import Callable

import torch
from torch import nn

from ..errors import ImgclfError

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    """Decorator: make the builder callable as ``create_model(name, ...)``."""
    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        _MODELS[name] = builder
        return builder
    return decorate


_PRETRAINED: dict[tuple[str, str], Callable[[nn.Module], list[str]]] = {}


def register_pretrained(name: str, tag: str):
    """Decorator: ``loader(model) -> notes`` puts the ``tag`` weights (e.g. "imagenet") into model ``name``."""
    def decorate(loader):
        _PRETRAINED[(name, tag)] = loader
        return loader
    return decorate


def has_pretrained(name: str, tag: str) -> bool:
    """Whether model ``name`` has published ``tag`` weights (e.g. "imagenet")."""
    return (name, tag) in _PRETRAINED


def takes_one_input_size(name: str) -> bool:
    """Whether model ``name`` runs at the one input size it is built for (a dense layer after a flatten), so
    progressive resizing cannot train it. Asked of a small instance: the builders are plain functions."""
    return bool(getattr(create_model(name, num_classes=2), "fixed_input_size", False))


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(_MODELS)


def _builder(name: str) -> Callable[..., nn.Module]:
    if name not in _MODELS:
        close = difflib.get_close_matches(str(name), _MODELS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ImgclfError(f"unknown model {name!r}.{hint} Valid models: {', '.join(list_models())}")
    return _MODELS[name]


def create_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 32,
                 pretrained: str | None = None, **kwargs) -> nn.Module:
    """Build the registered model ``name``; ``kwargs`` are the builder's own options (see its docstring).
    ``pretrained`` (e.g. "imagenet") loads published weights; it is not part of ``arch_args``, since a
    checkpoint's own weights replace them anyway. What the loader did is in ``model.pretrained_notes``."""
    builder = _builder(name)
    if pretrained is not None and (name, pretrained) not in _PRETRAINED:
        tags = sorted(t for n, t in _PRETRAINED if n == name)
        others = ", ".join(f"{n} ({t})" for n, t in sorted(_PRETRAINED))
        raise ImgclfError(f"no {pretrained!r} weights for {name}; "
                          + (f"available: {', '.join(tags)}" if tags else
                             f"it has no pretrained weights (models that have some: {others or 'none'}); "
                             "pass --pretrained none to train it from scratch"))
    signature = inspect.signature(builder)
    unknown = sorted(set(kwargs) - set(signature.parameters) - {"num_classes", "in_channels", "image_size"})
    if unknown:
        valid = sorted(set(signature.parameters) - {"num_classes", "in_channels", "image_size"})
        raise ImgclfError(f"model {name!r} got unexpected options {unknown}; it accepts {valid or 'none'}")
    for arg, value in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ImgclfError(f"model {name!r}: {arg} must be a positive integer, got {value!r}")
    bound = signature.bind(num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs)
    # Defaults are stored too, so a checkpoint still rebuilds the same network if a default changes later.
    bound.apply_defaults()
    arch_args = {"name": name, **bound.arguments}
    try:
        json.dumps(arch_args)
    except TypeError as e:
        raise ImgclfError(f"model {name!r}: options must be JSON values (they go into checkpoints): {e}") from None
    model = builder(**bound.arguments)
    model.arch_args = arch_args
    if pretrained is not None:
        model.pretrained_notes = _PRETRAINED[(name, pretrained)](model)
    return model


def model_info(name: str, num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> dict:
    """``{name, params, keras_params, description}`` for ``imgclf models``.

    ``params`` counts trainable parameters; ``keras_params`` adds BatchNorm running mean/variance,
    which is what Keras' ``model.summary()`` reports, so figures can be compared with the seeds.
    """
    # The meta device allocates no memory and skips the init arithmetic: counting 11M params is instant.
    with torch.device("meta"):
        model = create_model(name, num_classes, in_channels=in_channels, image_size=image_size)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    running = sum(b.numel() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var")))
    doc = inspect.getdoc(_MODELS[name]) or ""
    return {"name": name, "params": params, "keras_params": params + running,
            "description": doc.splitlines()[0] if doc else ""}
