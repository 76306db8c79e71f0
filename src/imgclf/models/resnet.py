"""ResNet-18 for small images (CIFAR-style stem), after He et al. 2016 and timm's resnet.py.

    model = create_model("resnet18", num_classes=10)   # 11,173,962 parameters at 10 classes

The ImageNet stem (7x7 stride-2 conv + max-pool) would shrink a 32x32 image to 8x8 before the
first block; on small images the stem is one 3x3 stride-1 conv and there is no max-pool.
Global average pooling makes the network work for any image size from 8 pixels up (three stride-2
stages take 8x8 to 1x1; below that the last stages would see mostly padding).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ImgclfError
from ._base import ImageClassifier
from ._registry import register_model


class BasicBlock(nn.Module):
    """Two 3x3 convs with a shortcut; a 1x1 conv + BN projects the shortcut when shape changes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.act = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + shortcut)


class ResNet(ImageClassifier):
    def __init__(self, num_classes: int, in_channels: int = 3, layers=(2, 2, 2, 2),
                 widths=(64, 128, 256, 512), zero_init_residual: bool = True):
        super().__init__()
        self.num_classes, self.in_channels, self.num_features = num_classes, in_channels, widths[-1]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        stages, ch = [], widths[0]
        for i, (depth, width) in enumerate(zip(layers, widths, strict=True)):
            stride = 1 if i == 0 else 2
            blocks = [BasicBlock(ch, width, stride)] + [BasicBlock(width, width) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            ch = width
        self.stages = nn.Sequential(*stages)
        self.head = self.new_head(num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Goyal et al. 2017 ("ImageNet in 1 hour"): with the last BN of each branch at gamma=0,
            # every block starts as the identity, so the network starts shallow and the signal
            # and gradients pass cleanly at large learning rates; typically +0.2-0.5% accuracy.
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def new_head(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes)  # PyTorch's default Linear init, as torchvision

    def cam_layer(self) -> nn.Module:
        return self.stages[-2]  # the stage before the last, whose first block halves the map

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return x.mean(dim=(2, 3))  # global average pool; works for channels_last too


@register_model("resnet18")
def resnet18(num_classes: int, in_channels: int = 3, image_size: int = 32,
             zero_init_residual: bool = True) -> ResNet:
    """ResNet-18, CIFAR stem (3x3 conv, no max-pool), blocks 2-2-2-2 of width 64-512, global avg pool."""
    if image_size < 8:
        raise ImgclfError(f"resnet18 needs images of at least 8x8 pixels, got {image_size}")
    return ResNet(num_classes, in_channels, zero_init_residual=zero_init_residual)
