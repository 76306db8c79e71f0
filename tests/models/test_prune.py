"""Structured pruning of every registered model, and pruned weights rebuilt from their shapes alone."""
import pytest
import torch
from torch import nn

from imgclf.checkpoint import DamagedCheckpoint, load_checkpoint, save_checkpoint
from imgclf.errors import ImgclfError
from imgclf.models import PRUNED, count_macs, count_params, create_model, create_model_for, list_models, prune_channels
from imgclf.models._resize import resize_to


def _model(name: str, size: int = 32):
    torch.manual_seed(0)
    return create_model(name, num_classes=5, image_size=size)


def _meta(model, size: int = 32) -> dict:
    return {"arch": model.arch_args, "classes": list("abcde"),
            "preprocess": {"image_size": size, "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3}}


@pytest.mark.parametrize("name", list_models())
def test_every_model_prunes_runs_and_round_trips(name, tmp_path):
    model = _model(name)
    fixed = {n for n, p in model.named_parameters() if not p.requires_grad}
    result = prune_channels(model, 0.5, 32)
    assert result.params_before == count_params(_model(name)) and result.params_after < 0.5 * result.params_before
    assert result.macs_after < 0.5 * result.macs_before and result.macs_after == count_macs(model, 32)
    assert model.arch_args[PRUNED] is True and all(after < before for before, after in result.widths.values())
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == fixed  # fixed weights stay fixed
    x = torch.randn(3, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (3, 5) and model.forward_features(x).shape == (3, model.num_features)

    path = save_checkpoint(tmp_path / "best.safetensors", model, _meta(model))
    ckpt = load_checkpoint(path)  # the strict layout check, on the pruned shapes
    rebuilt = create_model_for(ckpt.meta["arch"], {k: v.shape for k, v in ckpt.state_dict.items()})
    rebuilt.load_state_dict(ckpt.state_dict)  # strict
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), logits)
    rebuilt.reset_classifier(2)  # a new head fits the pruned features (train --init-from other classes)
    assert rebuilt.eval()(x).shape == (3, 2)


def test_what_stays_whole():
    model = _model("fastnet")
    whiten, head = model.whiten.weight.shape, model.head.weight.shape[0]
    result = prune_channels(model, 0.75, 32)
    assert model.whiten.weight.shape == whiten and model.head.weight.shape[0] == head
    assert set(result.kept) == {"head", "whiten"} and "classes" in result.kept["head"]
    assert model.blocks[1][0].in_channels == whiten[0]  # the first 3x3 conv still reads every whitened channel
    assert result.widths["blocks.2.0"] == (256, 64)
    lite = _model("efficientnet-lite0")
    prune_channels(lite, 0.5, 32)
    dw = lite.blocks[3].dw.conv  # depthwise stays depthwise, with the 1x1 expansion before it
    assert dw.groups == dw.in_channels == dw.out_channels == lite.blocks[3].expand.conv.out_channels
    assert lite.blocks[1].residual is False and lite.blocks[2].residual  # a residual add keeps matching widths
    assert lite.blocks[2].project.conv.out_channels == lite.blocks[1].project.conv.out_channels


@pytest.mark.parametrize("amount", [0, 1, 1.5, -0.1, True, "half"])
def test_amount_outside_0_1_is_one_line(amount):
    with pytest.raises(ImgclfError, match=r"strictly between 0 and 1") as e:
        prune_channels(_model("seed-cnn"), amount, 32)
    assert "\n" not in str(e.value)


def test_a_layer_that_would_lose_every_channel_is_refused():
    model = _model("seed-cnn")  # 32, 64 and 128 channels: 0.99 of 32 and of 64 leaves none (int(0.32) = 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ImgclfError, match=r"--amount 0.99 would remove every channel of features\.0 \(32\), "
                                          r"features\.3 \(64\); use a smaller amount") as e:
        prune_channels(model, 0.99, 32)
    assert "\n" not in str(e.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # refused before any cut
    assert prune_channels(_model("seed-cnn"), 0.95, 32).widths["features.0"] == (32, 1)


def _tampered(tmp_path, edit):
    model = _model("seed-cnn-bn")
    prune_channels(model, 0.5, 32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    edit(state)
    return save_checkpoint(tmp_path / "x.safetensors", state, _meta(model))


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update({"head.1.weight": s["head.1.weight"][:3], "head.1.bias": s["head.1.bias"][:3]}),
     "keeps its 5 classes"),
    (lambda s: s.update({"features.0.weight": torch.zeros(40, 3, 3, 3)}), "pruning leaves 1 to 32"),
    (lambda s: s.update({"features.0.weight": s["features.0.weight"][..., :2]}), "kernel"),
    (lambda s: s.update({"features.0.weight": s["features.0.weight"][0]}), "not a narrower"),
])
def test_shapes_pruning_cannot_explain_are_refused(edit, message, tmp_path):
    with pytest.raises(DamagedCheckpoint, match=message) as e:
        load_checkpoint(_tampered(tmp_path, edit))
    assert "\n" not in str(e.value)


def test_pruned_layers_that_do_not_chain_up_are_refused(tmp_path):
    # a BatchNorm one channel narrower than its conv: each shape alone is a narrowing
    ckpt = load_checkpoint(_tampered(tmp_path, lambda s: s.update(
        {k: s[k][:-1] for k in s if k.startswith("features.1.") and s[k].ndim})))
    with pytest.raises(ImgclfError, match="pruned seed-cnn-bn's layers do not fit together") as e:
        create_model_for(ckpt.meta["arch"], {k: v.shape for k, v in ckpt.state_dict.items()})
    assert "\n" not in str(e.value)


def test_narrower_weights_without_the_pruned_mark_are_refused_as_before(tmp_path):
    model = _model("seed-cnn-bn")
    prune_channels(model, 0.5, 32)
    meta = _meta(model)
    meta["arch"] = {k: v for k, v in meta["arch"].items() if k != PRUNED}
    with pytest.raises(DamagedCheckpoint, match="has shape"):
        load_checkpoint(save_checkpoint(tmp_path / "x.safetensors", model, meta))


def test_grouped_conv_other_than_depthwise_is_not_resized():
    model = _model("seed-cnn")
    model.features[3] = nn.Conv2d(32, 64, 3, groups=2)
    with pytest.raises(ImgclfError, match="grouped convolution other than depthwise"):
        resize_to(model, {"features.3.weight": (32, 8, 3, 3)})
