"""Image-classifier architectures behind one constructor.

    from imgclf.models import create_model, list_models
    model = create_model("seed-cnn", num_classes=10, in_channels=3, image_size=32)

Every model is an :class:`ImageClassifier`: ``num_classes``, ``in_channels``, ``num_features``,
``forward_features``, ``forward_head``, ``reset_classifier``, ``get_classifier`` and ``arch_args``.
Importing this package registers the built-in families (one file each).
"""
from .. import utils  # noqa: F401  (flushes subnormals before any model runs: utils.flush_denormals)
from . import efficientnet, fastnet, resnet, seed_cnn  # noqa: F401  (imported for their @register_model side effect)
from ._base import ImageClassifier
from ._prune import PruneResult, check_amount, check_importance, count_macs, count_params, prune_channels
from ._registry import (
    create_model,
    has_pretrained,
    list_models,
    model_info,
    register_model,
    register_pretrained,
    takes_one_input_size,
)
from ._resize import PRUNED, create_model_for

__all__ = ["ImageClassifier", "create_model", "create_model_for", "has_pretrained",
           "takes_one_input_size", "list_models", "model_info",
           "register_model", "register_pretrained", "PRUNED", "PruneResult", "check_amount", "check_importance",
           "count_macs", "count_params", "prune_channels"]
