"""Every registered model: the same face (forward/backward, new heads, arch args, info) and clear errors."""
import json

import pytest
import torch

from imgclf.errors import ImgclfError
from imgclf.models import ImageClassifier, create_model, list_models, model_info

MODELS = list_models()


def test_registry_has_the_builtin_models():
    assert {"seed-cnn", "seed-cnn-bn", "resnet18"} <= set(MODELS)
    assert sorted(MODELS) == MODELS


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("size", [28, 32])
def test_forward_backward(name, in_channels, size):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_channels=in_channels, image_size=size)
    assert isinstance(model, ImageClassifier)
    assert (model.num_classes, model.in_channels) == (7, in_channels)
    x = torch.randn(2, in_channels, size, size)

    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)

    model.eval()  # dropout off, BN on running stats: the two paths must agree exactly
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, model.num_features)
        torch.testing.assert_close(model(x), model.forward_head(feats))


@pytest.mark.parametrize("name", MODELS)
def test_reset_classifier(name):
    model = create_model(name, num_classes=10)
    old_head = model.get_classifier()
    model.reset_classifier(4)
    assert model.num_classes == 4 and model.arch_args["num_classes"] == 4
    assert model.get_classifier() is not old_head
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 4)


@pytest.mark.parametrize("name", MODELS)
def test_arch_args_rebuild_the_model(name):
    model = create_model(name, num_classes=5, in_channels=1, image_size=28)
    model.reset_classifier(3)
    args = json.loads(json.dumps(model.arch_args))  # what a checkpoint stores and reads back
    assert args["name"] == name
    rebuilt = create_model(**args)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes
    rebuilt.load_state_dict(model.state_dict())  # strict: same keys, same shapes


@pytest.mark.parametrize("name", MODELS)
def test_channels_last_bf16_autocast(name):
    model = create_model(name, num_classes=10).to(memory_format=torch.channels_last).eval()
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.shape == (2, 10)
    assert torch.isfinite(out.float()).all()


def test_model_info():
    info = model_info("seed-cnn-bn")
    assert info["name"] == "seed-cnn-bn"
    assert (info["params"], info["keras_params"]) == (160_650, 161_098)
    assert info["description"]
    assert model_info("resnet18")["params"] == 11_173_962
    # MNIST shape: conv1 sees 1 channel (-576) and the flatten is 1x1x128 instead of 2x2x128 (-49,152).
    assert model_info("seed-cnn", in_channels=1, image_size=28)["params"] == 160_202 - 576 - 49_152


def test_unknown_model_names_the_valid_ones():
    with pytest.raises(ImgclfError) as err:
        create_model("resnet-18", num_classes=10)
    msg = str(err.value)
    assert "'resnet18'" in msg  # the closest name
    assert all(name in msg for name in MODELS)
    with pytest.raises(ImgclfError):
        model_info("nope")


def test_bad_arguments():
    with pytest.raises(ImgclfError, match="widht"):
        create_model("resnet18", num_classes=10, widht=2)
    with pytest.raises(ImgclfError, match="num_classes"):
        create_model("seed-cnn", num_classes=0)
    with pytest.raises(ImgclfError, match="22x22"):
        create_model("seed-cnn", num_classes=10, image_size=16)
    with pytest.raises(ImgclfError, match="8x8"):
        create_model("resnet18", num_classes=10, image_size=4)
