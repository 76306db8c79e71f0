"""The seed notebooks' small Keras CNN, rebuilt layer for layer in PyTorch.

    model = create_model("seed-cnn", num_classes=10)        # 160,202 parameters at 3x32x32
    model = create_model("seed-cnn-bn", num_classes=10)     # seed 004: BatchNorm after each conv

Three blocks of valid 3x3 conv (32, 64, 128) -> [BatchNorm] -> ReLU -> 2x2 max-pool, then
Flatten -> Dense 128 + ReLU (the features) and Dropout 0.5 -> Dense (the head).
Differences from Keras that do not change what the network can compute: tensors are NCHW, so
Flatten orders the 2x2x128 block channel-first where Keras (NHWC) flattens height-width-channel;
the Dense weights are a permutation of Keras', not a different model.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ImgclfError
from ._base import ImageClassifier
from ._registry import register_model

_WIDTHS = (32, 64, 128)
_DENSE = 128


def _keras_init(module: nn.Module) -> None:
    # Keras' defaults (glorot_uniform kernels, zero biases) rather than PyTorch's kaiming-uniform:
    # the seeds' learning rates and epochs were tuned against this init.
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)


class SeedCNN(ImageClassifier):
    fixed_input_size = True  # Flatten -> Dense: the dense layer's width is set by the input size
    def __init__(self, num_classes: int, in_channels: int = 3, image_size: int = 32,
                 batch_norm: bool = False, dropout: float = 0.5):
        super().__init__()
        self.num_classes, self.in_channels, self.num_features = num_classes, in_channels, _DENSE
        self.dropout = dropout
        side, layers, ch = image_size, [], in_channels
        for width in _WIDTHS:
            layers.append(nn.Conv2d(ch, width, 3))  # 'valid' padding, as in the seeds
            if batch_norm:
                # Keras BatchNormalization defaults: epsilon 1e-3, moving average 0.99 (= torch momentum 0.01).
                layers.append(nn.BatchNorm2d(width, eps=1e-3, momentum=0.01))
            # Pool before ReLU: max-pool commutes with any monotonic function, so this is the seeds'
            # conv-ReLU-pool exactly, with the ReLU (and its backward) on a quarter of the pixels.
            layers += [nn.MaxPool2d(2), nn.ReLU(inplace=True)]
            side, ch = (side - 2) // 2, width
        if side < 1:
            raise ImgclfError(f"seed-cnn needs images of at least 22x22 pixels, got {image_size}")
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.pre_logits = nn.Sequential(nn.Linear(ch * side * side, _DENSE), nn.ReLU(inplace=True))
        self.head = self.new_head(num_classes)
        _keras_init(self)

    def new_head(self, num_classes: int) -> nn.Module:
        # Dropout belongs to the head: a fine-tuner replacing the head gets the seeds' regularisation with it.
        head = nn.Sequential(nn.Dropout(self.dropout), nn.Linear(self.num_features, num_classes))
        _keras_init(head)
        return head

    def cam_layer(self) -> nn.Module:
        return [m for m in self.features if isinstance(m, nn.ReLU)][-2]  # the block before the last's ReLU

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pre_logits(self.features(x))


@register_model("seed-cnn")
def seed_cnn(num_classes: int, in_channels: int = 3, image_size: int = 32, dropout: float = 0.5) -> SeedCNN:
    """The seed notebooks' Keras CNN: 3x(conv3x3-ReLU-maxpool) 32/64/128, dense 128, dropout 0.5."""
    return SeedCNN(num_classes, in_channels, image_size, batch_norm=False, dropout=dropout)


@register_model("seed-cnn-bn")
def seed_cnn_bn(num_classes: int, in_channels: int = 3, image_size: int = 32, dropout: float = 0.5) -> SeedCNN:
    """Seed 004's CNN: the seed CNN with BatchNorm after each conv (Keras BN defaults)."""
    return SeedCNN(num_classes, in_channels, image_size, batch_norm=True, dropout=dropout)
