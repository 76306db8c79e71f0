"""Schedules: progressive resizing's sizes and the phased one-cycle learning rate."""
import pytest

from imgclf.errors import ImgclfError
from imgclf.training.schedule import PhasedOneCycle


def test_progressive_sizes_keep_their_shape_and_end_at_full_size():
    from imgclf.config import TrainConfig, progressive_sizes
    spec = "0.75:0.375,0.875:0.25"
    assert progressive_sizes(spec, 32, 8) == [24, 24, 24, 28, 28, 32, 32, 32]
    assert progressive_sizes(spec, 32, 4) == [24, 28, 32, 32]   # shares, so a shorter run keeps the shape
    assert progressive_sizes(spec, 28, 8)[:3] == [20, 20, 20]   # relative to the input size (MNIST: 28px)
    assert progressive_sizes(spec, 32, 1) == [32]               # the last epoch is always full size
    assert progressive_sizes(None, 32, 3) == progressive_sizes("none", 32, 3) == [32, 32, 32]
    for bad in ("0.75", "2:0.5", "0.5:0.7,0.75:0.5"):
        with pytest.raises(ImgclfError, match="progressive"):
            TrainConfig(progressive=bad)


def test_phased_one_cycle_keeps_head_only_epochs_at_full_rate():
    f = PhasedOneCycle(flat=10, total=110)
    assert [f(s) for s in (0, 9)] == [1.0, 1.0]           # head-only steps: the full lr
    assert f(10) == pytest.approx(1 / 25)                   # then one cycle: warm up from 1/25 ...
    assert f(40) == pytest.approx(1.0)                      # ... to the peak at 30 % of the rest ...
    assert f(110) == pytest.approx(1 / 25_000) and f(75) < f(50)  # ... and down
