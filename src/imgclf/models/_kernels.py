"""CPU kernels for the few places where PyTorch's own are measured slow on our shapes.

    y = conv3x3(x, weight)        # == F.conv2d(x, weight, padding=1), with a faster weight gradient

oneDNN's backward-weights kernel for a 3x3 convolution runs at a third of its forward speed when the
image is small (FastNet's 256-channel convs at 7x7 and 3x3: 156 and 67 GFLOP/s against 468 forward, bf16,
this 2-core AMX Xeon, batch 1000), and it is a third of FastNet's training step. The same gradient as
matrix products, im2col over ~4,000 output pixels at a time so that each chunk stays in the L2 cache,
takes 191 instead of 325 ms at 7x7 and 42 instead of 170 ms at 3x3. At 3x3 the forward pass and the input
gradient are matrix products too (25 instead of 50 ms each). ``benchmarks/conv_grad.py`` measures each
layer and the whole step (1.10-1.20x here). Everything else (other shapes, float32, inference, GPUs) is
PyTorch's own.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SMALL_IMAGE_PIXELS = 64   # at most 8x8 outputs: where the matrix-product weight gradient was measured faster
TINY_IMAGE_PIXELS = 16    # at most 4x4: where the matrix-product forward (and input gradient) was measured faster
CHUNK_PIXELS = 4096       # output pixels per im2col chunk (~4,000 rows x 9*C columns stay in L2)


def conv3x3(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A 3x3, stride-1, padding-1, bias-free convolution of (N, C, H, W) ``x``. On a CPU in bf16, in training,
    for images of at most 8x8 its weight gradient comes from :func:`conv3x3_weight_grad` (and for at most 4x4
    its forward pass and input gradient from :func:`conv3x3_matmul`); otherwise it is plain F.conv2d."""
    if not _fast_grad_pays(x, weight):
        return F.conv2d(x, weight, padding=1)
    if torch.is_autocast_enabled("cpu"):  # the cast autocast would do, made here so the Function sees it
        dtype = torch.get_autocast_dtype("cpu")
        x, weight = x.to(dtype), weight.to(dtype)
    with torch.autocast("cpu", enabled=False):
        return _Conv3x3.apply(x, weight)


def conv3x3_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, chunk_pixels: int | None = None) -> torch.Tensor:
    """d(loss)/d(weight) of a 3x3 'same' convolution: sum over images and pixels of grad_out x the 3x3
    patches of x, as matrix products over chunks of images (accumulated in float32)."""
    n, cin, h, w = x.shape
    cout = grad_out.shape[1]
    g = grad_out.permute(0, 2, 3, 1).reshape(n * h * w, cout)       # (N*H*W, Cout); free when channels last
    total = torch.zeros(cout, 9 * cin, dtype=torch.float32, device=x.device)
    for i, m, cols in _patches(x, chunk_pixels or CHUNK_PIXELS):
        total += g[i * h * w:(i + m) * h * w].T @ cols
    return total.view(cout, 3, 3, cin).permute(0, 3, 1, 2).to(x.dtype)


def conv3x3_matmul(x: torch.Tensor, weight: torch.Tensor, chunk_pixels: int | None = None) -> torch.Tensor:
    """F.conv2d(x, weight, padding=1) as matrix products (patches x filters), channels-last out. Faster than
    oneDNN's kernel for tiny images (3x3 at 256 channels: 25 instead of 50 ms), slower from 7x7 on."""
    n, cin, h, w = x.shape
    cout = weight.shape[0]
    filters = weight.permute(2, 3, 1, 0).reshape(9 * cin, cout)     # rows in the patches' (ky, kx, c) order
    out = torch.empty(n, h, w, cout, dtype=x.dtype, device=x.device)
    for i, m, cols in _patches(x, chunk_pixels or CHUNK_PIXELS):
        torch.mm(cols, filters, out=out[i:i + m].view(m * h * w, cout))
    return out.permute(0, 3, 1, 2)


def _patches(x: torch.Tensor, chunk_pixels: int):
    """(first image, images, their 3x3 patches as a (images*H*W, 9*C) matrix) for chunks of about
    ``chunk_pixels`` output pixels: im2col of the zero-padded, channels-last images, a chunk at a time."""
    n, c, h, w = x.shape
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))           # N, H+2, W+2, C (a copy, channels last)
    s_n, s_h, s_w, s_c = xp.stride()
    step = max(1, chunk_pixels // (h * w))
    for i in range(0, n, step):
        m = min(step, n - i)
        cols = xp[i:i + m].as_strided((m, h, w, 3, 3, c), (s_n, s_h, s_w, s_h, s_w, s_c))
        yield i, m, cols.reshape(m * h * w, 9 * c)


class _Conv3x3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return _forward(x, weight)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:  # the input gradient is the convolution of grad_out with the flipped filters
            grad_x = _forward(grad_out, weight.flip(2, 3).transpose(0, 1))
        if ctx.needs_input_grad[1]:
            grad_w = conv3x3_weight_grad(x, grad_out)
        return grad_x, grad_w


def _forward(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if x.shape[2] * x.shape[3] <= TINY_IMAGE_PIXELS:
        return conv3x3_matmul(x.contiguous(memory_format=torch.channels_last), weight)
    return F.conv2d(x, weight, padding=1)


def _fast_grad_pays(x: torch.Tensor, weight: torch.Tensor) -> bool:
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    return (x.device.type == "cpu" and dtype == torch.bfloat16 and x.dim() == 4
            and x.shape[2] * x.shape[3] <= SMALL_IMAGE_PIXELS and tuple(weight.shape[2:]) == (3, 3)
            and weight.requires_grad and torch.is_grad_enabled()
            and not torch.jit.is_tracing() and not torch.jit.is_scripting() and not torch.onnx.is_in_onnx_export()
            and not torch.compiler.is_compiling())
