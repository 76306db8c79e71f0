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

import torch

# Coefficients of the quintic Newton-Schulz iteration from the Muon write-up: chosen to push all
# singular values into roughly [0.7, 1.2] in very few steps rather than to converge exactly to 1.
_NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 3, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U V^T of the 2-D matrix g = U S V^T, computed in bfloat16 (it only needs to be rough)."""
    a, b, c = _NS_COEFFS
    x = g.to(torch.bfloat16)
    x = x / (x.norm() + eps)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


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
