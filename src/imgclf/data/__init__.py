"""Data: where images come from (built-in names, official archives, image folders) and how they are
decoded, cached and handed to training as uint8 arrays.

    from imgclf.data import load_dataset
    ds = load_dataset("../shared/datasets/cifar10-jpeg.tar.gz")   # -> Dataset (uint8 NHWC arrays)

Modules: dataset (load_dataset, the entry point), images (the one image loader, also used at predict
time), builtin + download (named datasets), cifar (the official CIFAR-10 batches), folder + archives
(image folders and archives of them), decode (parallel decoding), cache (decoded arrays on disk),
split (stratified val/test carving), edits (images excluded or relabelled by a person, e.g. from doctor.csv).
"""
# Names resolve on first use (PEP 562): the image loader and video reader work without torch, which the
# video decoding process of `imgclf predict --source` relies on (data/video_process.py).
_EXPORTS = {"BUILTINS": "builtin", "BuiltinDataset": "builtin", "RemoteFile": "builtin", "list_datasets": "builtin",
            "Dataset": "dataset", "Split": "dataset", "load_dataset": "dataset",
            "Preprocess": "images", "load_image": "images", "preprocess_image": "images"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'imgclf.data' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
