"""imgclf: train, judge and ship convolutional image classifiers.

    import imgclf
    result = imgclf.train(data="../shared/datasets/cifar10-jpeg.tar.gz", model="seed-cnn", epochs=10)
    print(imgclf.evaluate(result.run_dir)["top1"])
    clf = imgclf.load(result.run_dir)
    clf.predict(["my_cat.jpg"], top_k=3)

The ``imgclf`` command is the same functions: ``imgclf train``, ``imgclf evaluate``, ``imgclf predict``,
``imgclf models``, ``imgclf report``, ``imgclf inspect``, ``imgclf compare``, ``imgclf runs``, ``imgclf prune``.
"""
from ._version import __version__  # a leaf module: importing it runs nothing else

# Names resolve on first use (PEP 562), so ``import imgclf`` and the ``imgclf`` command start without torch:
# `imgclf predict --source` starts decoding a video while torch loads, and `imgclf --help` answers at once.
_EXPORTS = {
    "Classifier": "classifier", "load": "classifier",
    "TrainConfig": "config",
    "Dataset": "data", "Preprocess": "data", "load_dataset": "data",
    "export": "deploy.export",
    "ImgclfError": "errors",
    "calibrate": "evaluation.evaluate", "evaluate": "evaluation.evaluate",
    "inspect": "evaluation.inspect",
    "Evaluation": "evaluation.metrics",
    "report": "evaluation.report",
    "compare": "evaluation.runs", "runs": "evaluation.runs",
    "FramePrediction": "inference", "Prediction": "inference",
    "create_model": "models", "list_models": "models",
    "OnnxClassifier": "onnx_runtime",
    "TfliteClassifier": "tflite_runtime",
    "Callback": "training.callbacks",
    "prune": "training.prune",
    "TrainResult": "training.train", "train": "training.train",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'imgclf' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

