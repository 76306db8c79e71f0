"""Precision on the device at hand: bf16 autocast where the device computes it natively and the model gains
from it, the backward pass of a summed loss, and device synchronisation for honest timings."""
from __future__ import annotations

import math

import torch

from ..utils import native_bf16


# ---------------------------------------------------------------------------- helpers
def autocast_dtype(precision: str, device: torch.device, model: torch.nn.Module) -> torch.dtype | None:
    """bf16 autocast when asked for; with "auto", where the device computes bf16 natively and (on a CPU) the
    model's kernels gain from it; fp32 otherwise."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and native_bf16(device) and (device.type != "cpu" or model.cpu_bf16):
        return torch.bfloat16
    return None


def scaled_backward(loss: torch.Tensor, batch_size: int, model: torch.nn.Module) -> None:
    """loss.backward() with the loss scaled up by a power of two near the batch size, and the gradients scaled
    back down. A batch-mean loss makes the gradients flowing through the net ~batch_size times smaller than
    one image's; deep in a wide net they reach float32's denormal range, where x86 CPUs compute many times
    slower (measured: 1.5x slower steps for FastNet at batch 1000, growing as the loss falls). Powers of two
    scale exactly, so the result is the same; only the denormals are avoided."""
    scale = float(2 ** max(0, round(math.log2(max(1, batch_size)))))
    (loss * scale).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if grads and scale != 1.0:
        torch._foreach_mul_(grads, 1.0 / scale)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
