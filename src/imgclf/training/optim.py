"""Muon for convolution filters, Nesterov SGD for everything else, in one optimizer.

    opt = Muon([{"params": filters, "lr": 0.24, "muon": True, "momentum": 0.6},
                {"params": biases, "lr": 0.05, "momentum": 0.85, "weight_decay": 0.08}])

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers") replaces each filter bank's
momentum update by the nearest semi-orthogonal matrix, found with a few Newton-Schulz iterations: every
direction of the update moves by the same amount, so rarely-used directions learn as fast as
dominant ones. It suits matrices (conv filters flattened to out x in*k*k), not vectors, so BatchNorm
shifts, biases and the head use plain Nesterov SGD in the other groups.
"""
from __future__ import annotations

import functools

import torch

from ..config import DEFAULT_LR, TrainConfig
from ..utils import native_bf16

# Coefficients of the quintic Newton-Schulz iteration from the Muon write-up: chosen to push all
# singular values into roughly [0.7, 1.2] in very few steps rather than to converge exactly to 1.
_NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 3, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U V^T of the 2-D matrix g = U S V^T, in bfloat16 where the device computes it natively (it
    only needs to be rough), else in float32 (:func:`iteration_dtype`)."""
    a, b, c = _NS_COEFFS
    x = g.to(iteration_dtype(g.device))
    x = x / (x.norm() + eps)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def iteration_dtype(device: torch.device) -> torch.dtype:
    """bf16 for the Newton-Schulz iteration where the device has bf16 arithmetic (GPUs, AMX / AVX512-BF16 CPUs);
    float32 elsewhere: AVX2-only CPUs emulate bf16 matrix products, and one iteration of a 256 x 2304 filter
    bank takes 50x as long there in bf16 as in float32 (773 vs 14 ms on 2 AVX2 cores), most of FastNet's
    optimizer step."""
    return torch.bfloat16 if _native_bf16(device.type, device.index) else torch.float32


@functools.cache
def _native_bf16(kind: str, index: int | None) -> bool:
    return native_bf16(torch.device(kind, index) if index is not None else torch.device(kind))


class Muon(torch.optim.Optimizer):
    """Groups with ``muon=True`` get orthogonalised Nesterov-momentum updates; the others get Nesterov SGD.
    With ``normalize=True`` (only for weights a normalisation layer follows, which makes their scale
    irrelevant) each output filter is first rescaled to unit norm on average, so the step size relative to
    the weights stays fixed as training goes on."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.9, weight_decay: float = 0.0,
                 muon: bool = False, normalize: bool = False, ns_steps: int = 3):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, muon=muon, normalize=normalize,
                        ns_steps=ns_steps)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                if group["muon"]:
                    buf.mul_(mom).add_(g)
                    update = g.add(buf, alpha=mom)  # Nesterov
                    if group["normalize"]:
                        p.mul_(len(p) ** 0.5 / p.norm().clamp_min(1e-12))
                    flat = update.reshape(len(update), -1)
                    ortho = orthogonalize(flat, group["ns_steps"]).view_as(p).to(p.dtype)
                    p.add_(ortho, alpha=-lr)
                else:
                    if wd:
                        g = g.add(p, alpha=wd)
                    buf.mul_(mom).add_(g)
                    p.add_(g.add(buf, alpha=mom), alpha=-lr)
        return loss


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module, backbone_lr_mult: float = 1.0
                     ) -> torch.optim.Optimizer:
    """Two parameter groups, backbone and head: fine-tuning gives the backbone a lower learning rate."""
    if cfg.optimizer == "muon":
        return build_muon(cfg, model, backbone_lr_mult)
    lr, wd = cfg.resolved_lr(), cfg.weight_decay or 0.0
    head = {id(p) for p in model.get_classifier().parameters()}
    groups = [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in head],
               "lr": lr * backbone_lr_mult},
              {"params": [p for p in model.parameters() if p.requires_grad and id(p) in head], "lr": lr}]
    # fused kernels: one pass over all parameters instead of ~10 small ops per tensor (a measurable
    # share of a small CNN's step on a CPU); fall back where this build has none for the device.
    for fused in (True, None):
        kw = {"fused": fused} if fused else {}
        try:
            if cfg.optimizer == "sgd":
                return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                                       weight_decay=wd, **kw)
            if cfg.optimizer == "adamw":
                return torch.optim.AdamW(groups, lr=lr, weight_decay=wd, **kw)
            return torch.optim.Adam(groups, lr=lr, weight_decay=wd, **kw)
        except (RuntimeError, TypeError, ValueError):
            continue
    raise AssertionError("unreachable")


# Muon's Nesterov-SGD groups: step sizes per training example, so a change of batch size needs no retuning
# (the loss is a batch mean, so a group's lr is this x the batch size), at the default filter lr
# (DEFAULT_LR["muon"]); all scale with --lr. They are the CIFAR-10 speed record's rates (arXiv 2404.00498: 0.053
# and 0.67 at a filter lr of 0.24) scaled with our filter lr of 0.18, which suits our batch of 1000 (twice the
# record's steps); benchmarks/recipe_seeds.py compares such choices over seeds.
MUON_SGD_LR = {"backbone": 0.053 * 0.75, "head": 0.67 * 0.75}


MUON_MOMENTUM, MUON_SGD_MOMENTUM = 0.6, 0.85


def build_muon(cfg: TrainConfig, model: torch.nn.Module, backbone_lr_mult: float) -> Muon:
    """Muon for every weight matrix and filter bank of the backbone; Nesterov SGD for the vectors
    (BatchNorm shifts, biases) and for the head, whose rows are class templates, not a hidden map.
    ``weight_decay`` is per example, coupled as in SGD: lr x decay = weight_decay x batch size."""
    scale = cfg.resolved_lr() / DEFAULT_LR["muon"]
    bs, wd = cfg.batch_size, cfg.weight_decay or 0.0
    head = {id(p) for p in model.get_classifier().parameters()}
    params = [p for p in model.parameters() if p.requires_grad]

    def sgd(group, per_example_lr):
        lr = per_example_lr * scale * bs
        return {"params": group, "lr": lr, "momentum": MUON_SGD_MOMENTUM, "weight_decay": wd * bs / lr}

    stem = {id(p) for p in model.stem_parameters()}
    groups = [
        {"params": [p for p in params if p.ndim >= 2 and id(p) not in head], "muon": True,
         "lr": cfg.resolved_lr() * backbone_lr_mult, "momentum": MUON_MOMENTUM,
         "normalize": model.normalized_filters},
        sgd([p for p in params if p.ndim < 2 and id(p) not in head | stem],
            MUON_SGD_LR["backbone"] * backbone_lr_mult),
        sgd([p for p in params if id(p) in head], MUON_SGD_LR["head"]),
    ]
    if stem := [p for p in params if id(p) in stem]:  # trains in the first epochs only (see FastNet)
        groups.append({**sgd(stem, MUON_SGD_LR["backbone"] * backbone_lr_mult), "stem": True})
    return Muon(groups)


def match_state_layout(opt: torch.optim.Optimizer) -> None:
    """Give loaded optimizer buffers their parameter's memory layout. Checkpoints store tensors contiguous,
    while channels-last conv weights have NHWC strides; fused optimizers walk parameter and buffer memory
    in lockstep, so a layout mismatch would silently pair the wrong elements."""
    for p, st in opt.state.items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.shape == p.shape and v.stride() != p.stride():
                st[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)
