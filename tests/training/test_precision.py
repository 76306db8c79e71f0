"""Precision 'auto' follows the hardware and the model."""
import torch

from imgclf.models import create_model
from imgclf.training import precision


def test_precision_auto_follows_the_hardware_and_the_model(monkeypatch):
    cpu = torch.device("cpu")
    fast, effnet = create_model("fastnet-s", 3), create_model("efficientnet-lite0", 3)
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    assert precision.autocast_dtype("auto", cpu, fast) == torch.bfloat16
    assert precision.autocast_dtype("auto", cpu, effnet) is None  # depthwise convs: fp32 pays more on a CPU
    assert precision.autocast_dtype("fp32", cpu, fast) is None
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    assert precision.autocast_dtype("auto", cpu, fast) is None   # AVX2-only CPU: bf16 would be emulated
    assert precision.autocast_dtype("bf16", cpu, fast) == torch.bfloat16  # asked for explicitly
