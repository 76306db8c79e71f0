"""The real MNIST copy in ../shared/datasets (slow: decodes 70,000 PNGs the first time)."""
from __future__ import annotations

import numpy as np
import pytest

from imgclf.data import load_dataset

from support import MNIST_PNG as MNIST


@pytest.mark.realdata
@pytest.mark.skipif(not MNIST.is_file(), reason=f"{MNIST} not found")
def test_mnist_png_archive():
    ds = load_dataset(str(MNIST), progress=False)
    assert ds.classes == [str(d) for d in range(10)]
    assert ds.channels == 1 and ds.image_size == 28
    assert ds.train.x.shape == (60000, 28, 28, 1) and ds.test.x.shape == (10000, 28, 28, 1)
    assert np.bincount(ds.train.y).min() > 5000 and np.bincount(ds.test.y).min() > 800
    assert 20 < ds.train.x[:10000].mean() < 50  # white digits on black, as published
    assert ds.skipped == [] and ds.val is None
