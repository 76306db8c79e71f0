"""The CPU convolution kernels: weight gradients equal PyTorch's, fast paths taken only where they pay."""
import os

import pytest
import torch
import torch.nn.functional as F

from imgclf.models._kernels import conv3x3, conv3x3_matmul, conv3x3_weight_grad
from imgclf.utils import native_bf16


def _reference(x, w, grad_out, dtype):
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        y = F.conv2d(x, w, padding=1)
    y.backward(grad_out.to(y.dtype))
    return y.detach(), x.grad, w.grad


@pytest.mark.parametrize("side,chunk", [(7, None), (3, 20), (5, 1)])
def test_weight_grad_equals_pytorch_in_float32(side, chunk):
    torch.manual_seed(0)
    x = torch.randn(13, 6, side, side).contiguous(memory_format=torch.channels_last)
    g = torch.randn(13, 4, side, side).contiguous(memory_format=torch.channels_last)
    w = torch.randn(4, 6, 3, 3)
    ref = torch.ops.aten.convolution_backward(g, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                              [False, True, False])[1]
    got = conv3x3_weight_grad(x, g, chunk_pixels=chunk)
    assert got.shape == ref.shape and torch.allclose(got, ref, rtol=1e-4, atol=1e-4)
    # chunks smaller than one image, and contiguous (not channels-last) inputs, give the same
    again = conv3x3_weight_grad(x.contiguous(), g.contiguous(), chunk_pixels=1)
    assert torch.allclose(again, ref, rtol=1e-4, atol=1e-4)


def test_conv3x3_takes_the_fast_gradient_only_where_it_pays():
    torch.manual_seed(0)
    x = torch.randn(40, 16, 7, 7).contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 16, 3, 3, requires_grad=True)
    g = torch.randn(40, 8, 7, 7)
    y_ref, gx_ref, gw_ref = _reference(x, w, g, torch.bfloat16)
    xr = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv3x3(xr, w)
    assert type(y.grad_fn).__name__ == "_Conv3x3Backward" and y.dtype == torch.bfloat16
    y.backward(g.to(y.dtype))
    assert torch.equal(y, y_ref)  # the forward pass is PyTorch's own
    # the input gradient is the convolution of the gradient with the flipped filters, bit for bit; oneDNN's
    # own backward-data kernel gives the same bits where bf16 is native, and differs by bf16 rounding where
    # it is emulated (AVX2-only CPUs, or ONEDNN_MAX_CPU_ISA=AVX2)
    g16 = g.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    flipped = F.conv2d(g16, w.detach().to(torch.bfloat16).flip(2, 3).transpose(0, 1), padding=1)
    assert torch.equal(xr.grad, flipped.float())
    assert (xr.grad - gx_ref).abs().max() <= 0.02 * gx_ref.abs().max()
    if native_bf16(torch.device("cpu")) and os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper() == "ALL":
        assert torch.equal(xr.grad, gx_ref)
    assert w.grad.dtype == torch.float32
    assert (w.grad - gw_ref).abs().max() <= 0.02 * gw_ref.abs().max()  # bf16 rounding, as PyTorch's own
    # float32, large images, no gradient, eval-time export: plain F.conv2d, bit for bit
    assert "Conv3x3" not in type(conv3x3(x, w).grad_fn).__name__
    big = torch.randn(2, 16, 15, 15)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "Conv3x3" not in type(conv3x3(big, w).grad_fn).__name__
        with torch.no_grad():
            assert conv3x3(x, w).grad_fn is None


@pytest.mark.parametrize("side", [1, 3, 4])
def test_tiny_images_go_through_matrix_products(side):
    torch.manual_seed(0)
    x = torch.randn(30, 8, side, side).contiguous(memory_format=torch.channels_last)
    w = torch.randn(5, 8, 3, 3, requires_grad=True)
    out = conv3x3_matmul(x, w.detach(), chunk_pixels=20)
    assert torch.allclose(out, F.conv2d(x, w.detach(), padding=1), rtol=1e-4, atol=1e-4)
    g = torch.randn(30, 5, side, side)
    y_ref, gx_ref, gw_ref = _reference(x, w, g, torch.bfloat16)
    xr = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv3x3(xr, w)
    y.backward(g.to(y.dtype))
    for got, ref in ((y, y_ref), (xr.grad, gx_ref), (w.grad, gw_ref)):
        assert got.shape == ref.shape and (got.float() - ref.float()).abs().max() <= 0.02 * ref.float().abs().max()
