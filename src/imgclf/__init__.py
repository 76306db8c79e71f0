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
from .utils import flush_denormals

flush_denormals()  # before torch starts its thread pool: see utils.flush_denormals

from .classifier import Classifier, load  # noqa: E402
from .config import TrainConfig  # noqa: E402
from .data import Dataset, Preprocess, load_dataset  # noqa: E402
from .deploy.export import export  # noqa: E402
from .errors import ImgclfError  # noqa: E402
from .evaluation.evaluate import calibrate, evaluate  # noqa: E402
from .evaluation.inspect import inspect  # noqa: E402
from .evaluation.metrics import Evaluation  # noqa: E402
from .evaluation.report import report  # noqa: E402
from .evaluation.runs import compare, runs  # noqa: E402
from .inference import FramePrediction, Prediction  # noqa: E402
from .models import create_model, list_models  # noqa: E402
from .onnx_runtime import OnnxClassifier  # noqa: E402
from .tflite_runtime import TfliteClassifier  # noqa: E402
from .training.callbacks import Callback  # noqa: E402
from .training.prune import prune  # noqa: E402
from .training.train import TrainResult, train  # noqa: E402

__all__ = [
    "__version__", "train", "evaluate", "load", "create_model", "list_models", "load_dataset",
    "TrainConfig", "TrainResult", "Callback", "Classifier", "Prediction", "FramePrediction", "Dataset",
    "Preprocess", "ImgclfError",
    "report", "inspect", "compare", "runs", "calibrate", "Evaluation", "export", "OnnxClassifier",
    "TfliteClassifier", "prune",
]
