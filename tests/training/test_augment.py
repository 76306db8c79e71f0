"""Batched augmentation on the device: seeded, shape-preserving, each operation doing what it says."""

import pytest
import torch
import torch.nn.functional as F

from imgclf.errors import ImgclfError
from imgclf.training.augment import (
    alternating_flip,
    build_augment,
    cutout,
    list_presets,
    random_hflip,
    random_rotate_zoom,
    random_translate,
)

OPS = {
    "translate": lambda x, g: random_translate(x, 4, g),
    "hflip": random_hflip,
    "cutout": lambda x, g: cutout(x, 8, g),
    "rotate_zoom": random_rotate_zoom,
}


def _batch(n=16, c=3, size=32, seed=0):
    return torch.randn(n, c, size, size, generator=torch.Generator().manual_seed(seed))


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("op", OPS.values(), ids=OPS.keys())
def test_same_seed_same_output_other_seed_differs(op):
    x = _batch()
    assert torch.equal(op(x, _gen(1)), op(x, _gen(1)))
    assert not torch.equal(op(x, _gen(1)), op(x, _gen(2)))


@pytest.mark.parametrize("op", OPS.values(), ids=OPS.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_shape_and_dtype_preserved(op, dtype):
    x = _batch(c=1, size=28).to(dtype)
    out = op(x, _gen(0))
    assert out.shape == x.shape and out.dtype == dtype


def test_translate_pad_zero_is_identity():
    x = _batch()
    assert torch.equal(random_translate(x, 0, _gen(0)), x)


def test_translate_is_a_crop_of_the_reflect_padded_image():
    x = _batch(n=8)
    out = random_translate(x, 3, _gen(5))
    padded = F.pad(x, (3, 3, 3, 3), mode="reflect")
    for img, src in zip(out, padded):
        crops = [src[:, i:i + 32, j:j + 32] for i in range(7) for j in range(7)]
        assert any(torch.equal(img, crop) for crop in crops)


def test_hflip_p1_flips_every_image_p0_none():
    x = _batch()
    assert torch.equal(random_hflip(x, _gen(0), p=1.0), x.flip(-1))
    assert torch.equal(random_hflip(x, _gen(0), p=0.0), x)


def test_cutout_zeroes_size_squared_pixels_per_image():
    x = torch.ones(64, 3, 32, 32)
    out = cutout(x, 8, _gen(0))
    zeros = (out == 0).all(dim=1).sum(dim=(1, 2))  # zeroed pixels per image, across all channels
    assert ((out == 0).any(dim=1) == (out == 0).all(dim=1)).all()  # whole pixels, every channel
    assert (zeros <= 64).all() and (zeros > 0).all()
    # A centre at least size/2 from every border leaves the square fully inside: exactly 8*8 pixels.
    g = _gen(0)
    centres = torch.rand(64, 2, generator=g)
    rows, cols = (centres[:, 0] * 32).long(), (centres[:, 1] * 32).long()
    inside = (rows >= 4) & (rows <= 28) & (cols >= 4) & (cols <= 28)
    assert inside.any()
    assert (zeros[inside] == 64).all()


def test_rotate_zoom_without_rotation_or_zoom_is_identity():
    x = _batch()
    torch.testing.assert_close(random_rotate_zoom(x, _gen(0), degrees=0.0, zoom=0.0), x, atol=1e-5, rtol=0)


def test_rotate_zoom_changes_the_image():
    x = _batch()
    assert (random_rotate_zoom(x, _gen(0)) - x).abs().mean() > 0.1


@pytest.mark.parametrize("name", list_presets())
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_every_preset_runs(name, channels, size):
    x = _batch(c=channels, size=size)
    out = build_augment(name, size)(x, _gen(0))
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()


def test_presets_listed():
    assert {"none", "flip", "standard", "strong", "seed004"} <= set(list_presets())
    x = _batch()
    assert torch.equal(build_augment("none", 32)(x, _gen(0)), x)


def test_unknown_preset_names_the_valid_ones():
    with pytest.raises(ImgclfError) as err:
        build_augment("strnog", 32)
    msg = str(err.value)
    assert "'strong'" in msg and all(name in msg for name in list_presets())


def test_global_rng_untouched():
    x = _batch()
    before = torch.get_rng_state()
    for name in list_presets():
        build_augment(name, 32)(x, _gen(0))
    for op in OPS.values():
        op(x, _gen(0))
    assert torch.equal(torch.get_rng_state(), before)


def test_channels_last_input():
    x = _batch().to(memory_format=torch.channels_last)
    expected = build_augment("strong", 32)(x.contiguous(), _gen(3))
    assert torch.equal(build_augment("strong", 32)(x, _gen(3)), expected)


def test_random_resized_crop_full_box_is_identity_and_crops_zoom():
    from imgclf.training.augment import random_resized_crop
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    same = random_resized_crop(x, g, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.allclose(same, x, atol=1e-5)
    # a quarter-area box is a 2x zoom: a vertical ramp image keeps its order but spans half the range
    ramp = torch.linspace(0, 1, 32).view(1, 1, 32, 1).expand(4, 1, 32, 32).contiguous()
    out = random_resized_crop(ramp, torch.Generator().manual_seed(1), scale=(0.25, 0.25), ratio=(1.0, 1.0))
    spans = out[:, 0, -1, 0] - out[:, 0, 0, 0]
    assert torch.all(spans > 0.4) and torch.all(spans < 0.6)
    a = random_resized_crop(x, torch.Generator().manual_seed(3))
    b = random_resized_crop(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == x.shape


def test_alternating_flip_mirrors_every_other_epoch():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    bits = torch.tensor([True, False])
    e0, e1 = alternating_flip(x, bits, 0), alternating_flip(x, bits, 1)
    assert torch.equal(e0[0], x[0].flip(-1)) and torch.equal(e0[1], x[1])
    assert torch.equal(e1[0], x[0]) and torch.equal(e1[1], x[1].flip(-1))
