"""Data: where images come from (built-in names, official archives, image folders) and how they are
decoded, cached and handed to training as uint8 arrays.

    from imgclf.data import load_dataset
    ds = load_dataset("../shared/datasets/cifar10-jpeg.tar.gz")   # -> Dataset (uint8 NHWC arrays)
"""
from .dataset import Dataset, Split, load_dataset
from .images import Preprocess, load_image, preprocess_image

__all__ = ["Dataset", "Split", "load_dataset", "Preprocess", "load_image", "preprocess_image"]
