"""Data: where images come from (built-in names, official archives, image folders) and how they are
decoded, cached and handed to training as uint8 arrays.

    from imgclf.data import load_dataset
    ds = load_dataset("../shared/datasets/cifar10-jpeg.tar.gz")   # -> Dataset (uint8 NHWC arrays)

Modules: dataset (load_dataset, the entry point), images (the one image loader, also used at predict
time), builtin + download (named datasets), cifar (the official CIFAR-10 batches), folder + archives
(image folders and archives of them), decode (parallel decoding), cache (decoded arrays on disk),
split (stratified val/test carving), edits (images excluded or relabelled by a person, e.g. from doctor.csv).
"""
from .builtin import BUILTINS, BuiltinDataset, RemoteFile, list_datasets
from .dataset import Dataset, Split, load_dataset
from .images import Preprocess, load_image, preprocess_image

__all__ = ["BUILTINS", "BuiltinDataset", "RemoteFile", "list_datasets", "Dataset", "Preprocess", "Split",
           "load_dataset", "load_image", "preprocess_image"]
