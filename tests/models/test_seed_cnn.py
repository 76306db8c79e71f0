"""The seeds' CNN: the Keras seed's layers and parameter counts, with and without BatchNorm."""
import torch

from imgclf.models import create_model

from support import trainable


def _keras_count(model: torch.nn.Module) -> int:
    """What Keras' summary() reports: trainable weights plus BatchNorm moving mean/variance."""
    running = sum(b.numel() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var")))
    return sum(p.numel() for p in model.parameters() if p.requires_grad) + running



def test_seed_cnn_matches_the_keras_seed():
    model = create_model("seed-cnn", num_classes=10)
    assert trainable(model) == 160_202  # the seeds' Keras summary
    assert model.pre_logits[0].in_features == 2 * 2 * 128
    mnist = create_model("seed-cnn", num_classes=10, in_channels=1, image_size=28)
    assert mnist.pre_logits[0].in_features == 1 * 1 * 128
    # Keras init: zero biases everywhere (glorot weights are random, so only their bound is checkable).
    assert all(m.bias.abs().sum() == 0 for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    conv = model.features[0]
    assert conv.weight.abs().max() <= (6 / (3 * 9 + 32 * 9)) ** 0.5


def test_seed_cnn_bn_counts():
    model = create_model("seed-cnn-bn", num_classes=10)
    assert trainable(model) == 160_650
    assert _keras_count(model) == 161_098  # Keras counts BN's moving mean/variance as parameters
