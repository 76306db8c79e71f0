"""Structured channel pruning of the registry's models: whole filters go, and every layer that reads them shrinks
with them, so the result is a smaller dense network that any runtime speeds up (no sparse kernels needed).

    result = prune_channels(model, amount=0.5, image_size=32)   # in place; -> PruneResult (params, MACs, kept)

The dependency graph is torch-pruning's (DepGraph, Fang et al., CVPR 2023): it traces one forward pass and groups
the layers whose channels must go together: a conv's filters with its BatchNorm and the next layer's inputs, the
two sides of every residual add, a depthwise conv with the 1x1 conv before it, a Flatten into a Dense layer.
Each group's channels are ranked by the L2 norm of all their weights in the group (magnitude, the library's
DepGraph baseline) or by |weight x loss gradient| summed over the group (first-order Taylor, Molchanov et al. 2019,
from gradients the caller accumulated on a calibration sample), and the same share ``amount`` of every group goes
("uniform"). ``global_ranking`` ranks all groups' channels together instead (normalised per group), which lets
wide layers give up more (docs/prune.md compares both).

Never pruned: the input channels (the image's), the head's outputs (the classes), and the layers a model names in
:meth:`~imgclf.models._base.ImageClassifier.pruning_exempt` (FastNet's whitening filters). The pruned model
records ``arch_args["pruned"] = True``; :func:`~imgclf.models._resize.create_model_for` rebuilds it from a
checkpoint's shapes.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ImgclfError
from ._resize import PRUNED


@dataclass
class PruneResult:
    params_before: int
    params_after: int
    macs_before: int        # multiply-accumulates of the convolutions and linear layers, one image
    macs_after: int
    kept: dict[str, str]    # layers whose output channels stayed whole -> why
    widths: dict[str, tuple[int, int]]  # pruned layer -> (output channels before, after)

    def summary(self) -> str:
        return (f"parameters {self.params_before:,} -> {self.params_after:,} "
                f"({self.params_after / self.params_before:.0%}), MACs {self.macs_before / 1e6:,.1f}M -> "
                f"{self.macs_after / 1e6:,.1f}M ({self.macs_after / self.macs_before:.0%})")


def check_amount(amount: float) -> float:
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0 < amount < 1:
        raise ImgclfError(f"--amount must be a fraction of the channels strictly between 0 and 1 (0.5 prunes "
                          f"half), got {amount!r}")
    return float(amount)


def check_importance(importance: str) -> str:
    if importance not in ("taylor", "magnitude"):
        raise ImgclfError(f"importance must be taylor or magnitude, got {importance!r}")
    return importance


def prune_channels(model: nn.Module, amount: float, image_size: int, global_ranking: bool = False,
                   importance: str = "magnitude") -> PruneResult:
    """Remove ``amount`` of the prunable output channels of ``model`` (an ImageClassifier, on the CPU, any mode)
    in place. ``importance``: "magnitude" (the L2 norm of a channel's weights across its group) or "taylor"
    (|weight x gradient| summed over the group: the loss gradients must be in the weights' ``.grad`` already).
    Raises ImgclfError, one line, when the graph cannot be traced or a layer would lose every channel."""
    import torch_pruning as tp  # 1.4 s to import: only where pruning happens

    amount = check_amount(amount)
    check_importance(importance)
    ranking = (tp.importance.GroupTaylorImportance() if importance == "taylor" else
               tp.importance.GroupMagnitudeImportance(p=2))
    example = torch.zeros(1, model.in_channels, image_size, image_size)
    was_training = model.training
    model.eval()  # tracing in train mode would move the BatchNorm running statistics
    names = {m: n for n, m in model.named_modules()}
    kept = model.pruning_exempt()
    exempt = [m for n, m in model.named_modules() if n in kept]
    trains = {name: p.requires_grad for name, p in model.named_parameters()}
    params_before, macs_before = count_params(model), count_macs(model, image_size)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its notes on unwrapped parameters and the like
            pruner = tp.pruner.MetaPruner(
                model, example, importance=ranking, pruning_ratio=amount,
                global_pruning=global_ranking, ignored_layers=exempt)
            emptied = _record_emptied(pruner.DG)
            groups = list(pruner.step(interactive=True))  # every group chosen before any is cut
    except Exception as e:  # noqa: BLE001  (torch-pruning's own, whatever its type: the model cannot be traced)
        raise ImgclfError(f"cannot prune {type(model).__name__}: torch-pruning could not trace its layers "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if emptied:  # torch-pruning would leave these layers whole, silently: say so instead, with nothing cut yet
        order = list(names)
        emptied.sort(key=lambda e: order.index(e[0]))
        layers = ", ".join(f"{names[layer]} ({width})" for layer, width in emptied)
        raise ImgclfError(f"--amount {amount:g} would remove every channel of {layers}; use a smaller amount")
    widths = {}
    for group in groups:
        dep, idxs = group[0]
        width = pruner.DG.get_out_channels(dep.target.module)
        widths[names[dep.target.module]] = (width, width - len(idxs))
    for group in groups:
        group.prune()
    # torch-pruning makes new Parameters, which train by default: weights that were fixed stay fixed
    for name, p in model.named_parameters():
        p.requires_grad_(trains.get(name, True))
    head = [m for m in model.get_classifier().modules() if isinstance(m, nn.Linear)]
    model.num_features = head[0].in_features  # new_head() builds a head for the pruned width
    model.arch_args[PRUNED] = True
    model.train(was_training)
    return PruneResult(params_before, count_params(model), macs_before, count_macs(model, image_size), kept, widths)


def _record_emptied(graph) -> list[tuple[nn.Module, int]]:
    """Wrap ``graph.check_pruning_group``, which refuses (and torch-pruning then skips) a group that would take
    every channel of one of its layers: -> the list of (root layer, its width) it refuses, filled as it runs."""
    emptied, check = [], graph.check_pruning_group

    def checked(group) -> bool:
        ok = check(group)
        if not ok:
            emptied.append((group[0].dep.target.module, graph.get_out_channels(group[0].dep.target.module)))
        return ok

    graph.check_pruning_group = checked
    return emptied


def count_params(model: nn.Module) -> int:
    """Trainable parameters, as ``imgclf models`` and the training log count them."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def count_macs(model: nn.Module, image_size: int) -> int:
    """Multiply-accumulates of one image through the convolutions and linear layers (the rest is a few %),
    counted from the shapes of one forward pass in inference mode."""
    total = 0

    def hook(m, inputs, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        else:
            total += out.numel() * m.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    try:
        model.eval()  # a train-mode pass would move the BatchNorm running statistics
        model(torch.zeros(1, model.in_channels, image_size, image_size, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total
