"""Test-time augmentation views."""
import torch

from imgclf.inference import TTA_SHIFT, tta_views


def test_tta_views():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.uint8).view(2, 3, 5, 5)
    flip = tta_views(x, "flip")
    assert len(flip) == 2 and torch.equal(flip[1], x.flip(3))
    both = tta_views(x, "flip+translate")
    assert len(both) == 6 and all(v.shape == x.shape and v.dtype == torch.uint8 for v in both)
    d = TTA_SHIFT
    shifted = both[2]  # moved d px down-right, edge rows/columns repeated
    assert torch.equal(shifted[..., d:, d:], x[..., :-d, :-d]) and torch.equal(shifted[..., 0, 0], x[..., 0, 0])
    assert torch.equal(both[4][..., :-d, :-d], x[..., d:, d:])  # and up-left
    shifts = tta_views(x, "translate")  # no mirror images: the image and its two shifts
    assert len(shifts) == 3 and torch.equal(shifts[0], x)
    assert torch.equal(shifts[1], both[2]) and torch.equal(shifts[2], both[4])
