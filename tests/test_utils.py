"""imgclf flushes subnormal floats to zero, once any of its torch code loads, unless told not to."""
import sys

import pytest
import torch


def _product_of_tiny_numbers(env: dict) -> float:
    """1e-30 * 1e-10 = 1e-40 is a float32 subnormal: 0.0 when the CPU flushes them, after imgclf's models load
    (`import imgclf` alone loads no torch: its names resolve on first use)."""
    import os
    import subprocess

    code = "import imgclf, torch; imgclf.create_model; print((torch.tensor([1e-30]) * torch.tensor([1e-10])).item())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, **env})
    return float(out.stdout.strip())


@pytest.mark.skipif(not torch.set_flush_denormal(True), reason="this CPU cannot flush subnormals (not x86 with SSE3)")
def test_imgclf_flushes_subnormals_unless_told_not_to():
    """x86 computes subnormals 10-100x slower; imgclf flushes them to zero (IMGCLF_KEEP_DENORMALS=1 keeps them)."""
    assert _product_of_tiny_numbers({"IMGCLF_KEEP_DENORMALS": ""}) == 0.0
    assert 0.0 < _product_of_tiny_numbers({"IMGCLF_KEEP_DENORMALS": "1"}) < 1e-39
