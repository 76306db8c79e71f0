"""FastNet: a small, wide CNN built for training speed, after the ideas of the CIFAR-10 speed records
(Page 2018, tysam-code hlb-cifar10, Jordan 2024 "94% on CIFAR-10 in 3.29 seconds", arXiv 2404.00498).

    model = create_model("fastnet", num_classes=10)                   # widths 64/256/256
    model.init_whitening(x_normalised)                                # data-dependent first layer

Layout: a frozen 2x2 patch-whitening convolution (its filters are the eigenvectors of the training
patches' covariance, each with its negation, so the following GELU loses nothing), then three conv
groups of [3x3 conv -> 2x2 max-pool -> BatchNorm -> GELU -> 3x3 conv -> BatchNorm -> GELU], a global
max-pool and a bias-free linear head whose logits are scaled down by the feature width.
BatchNorm scales are fixed at 1 (only shifts train), the 3x3 convs start as identity maps on their
first channels (Dirac init), which lets the net train at high learning rates from the first step.
Pooling right after the first conv of each group puts the second conv, BatchNorm and GELU at a quarter
of the pixels: most of the net's arithmetic happens at low resolution.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ImgclfError
from ._base import ImageClassifier
from ._kernels import conv3x3
from ._registry import register_model

WHITEN_KERNEL = 2
# BatchNorm's eps: Keras's 1e-3, not the speed records' 1e-12. A channel that is nearly constant over a batch
# (common on digits, whose pixels are mostly background) has a tiny variance, and dividing by its square root
# amplifies rounding noise into gradients that blow the SGD-trained biases up in the first step, so that some
# seeds never learn. 1e-3 caps that gain at ~30x and costs CIFAR-10 nothing (benchmarks/README.md, MNIST).
NORM_EPS = 1e-3


class _Conv(nn.Conv2d):
    """3x3 'same' conv without bias (BatchNorm follows), identity-initialised on its first channels."""

    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, kernel_size=3, padding=1, bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        n = min(self.in_channels, self.out_channels)
        nn.init.dirac_(self.weight.data[:n])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv3x3(x, self.weight)  # F.conv2d, with a faster weight gradient on a CPU for small images


class _Norm(nn.BatchNorm2d):
    """BatchNorm whose scale stays 1: only the shift trains. A fast-moving running average (momentum
    0.4) tracks the weights, which move quickly at these learning rates."""

    def __init__(self, width: int):
        super().__init__(width, eps=NORM_EPS, momentum=0.4)
        self.weight.requires_grad_(False)


class _Group(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(_Conv(cin, cout), nn.MaxPool2d(2), _Norm(cout), nn.GELU(),
                         _Conv(cout, cout), _Norm(cout), nn.GELU())


class _ScaledHead(nn.Linear):
    """Bias-free linear head; the logits are divided by ``scale`` (the feature width), which keeps
    them small at init so the high learning rates of the recipe do not blow them up."""

    def __init__(self, features: int, num_classes: int):
        super().__init__(features, num_classes, bias=False)
        self.scale = float(features)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.weight.data /= self.weight.data.std()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) / self.scale


class FastNet(ImageClassifier):
    normalized_filters = True  # BatchNorm follows every 3x3 conv: their scale is irrelevant (see optim.Muon)
    # The whitening bias trains in the first epochs only, its lr decaying to 0 (as airbench94 does); frozen after
    # that, backpropagation stops at the first 3x3 conv and skips its input gradient, the largest in the net.
    stem_bias_epochs = 3

    def __init__(self, num_classes: int, in_channels: int = 3, image_size: int = 32,
                 widths: tuple[int, int, int] = (64, 256, 256)):
        super().__init__()
        if len(widths) != 3 or min(widths) < 1:
            raise ImgclfError(f"fastnet widths must be three positive integers, got {widths}")
        # whiten (k-1 px) then three 2x2 pools: the last group needs at least 1x1 pixels left
        if (image_size - WHITEN_KERNEL + 1) // 8 < 1:
            raise ImgclfError(f"fastnet needs images of at least {8 + WHITEN_KERNEL - 1}px, got {image_size}")
        self.num_classes, self.in_channels, self.num_features = num_classes, in_channels, widths[-1]
        whiten_width = 2 * in_channels * WHITEN_KERNEL ** 2
        self.whiten = nn.Conv2d(in_channels, whiten_width, WHITEN_KERNEL, bias=True)
        self.whiten.weight.requires_grad_(False)  # set from the data by init_whitening, then fixed
        self.blocks = nn.Sequential(nn.GELU(), _Group(whiten_width, widths[0]), _Group(widths[0], widths[1]),
                                    _Group(widths[1], widths[2]), nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.head = self.new_head(num_classes)

    def new_head(self, num_classes: int) -> nn.Module:
        return _ScaledHead(self.num_features, num_classes)

    def stem_parameters(self) -> list[nn.Parameter]:
        """What trains only in the first ``stem_bias_epochs`` epochs (see the optimizer setup in train.py)."""
        return [self.whiten.bias]

    def pruning_exempt(self) -> dict[str, str]:
        # Its filters are fixed eigenvectors of the data, scaled by 1/sqrt(eigenvalue): their norms measure the
        # data's rarest directions, not their use, and the layer is 0.2 % of the arithmetic.
        return {**super().pruning_exempt(), "whiten": "its filters are the data's whitening eigenvectors"}

    def cam_layer(self) -> nn.Module:
        return self.blocks[-4]  # the second conv group, before the last group's 2x2 max-pool

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.whiten(x))

    def init_from_data(self, x: torch.Tensor) -> None:
        self.init_whitening(x)

    @torch.no_grad()
    def init_whitening(self, x: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the first layer from normalised training images (N, C, H, W): filters are the covariance
        eigenvectors of all 2x2 patches, scaled by 1/sqrt(eigenvalue), and their negations."""
        k = WHITEN_KERNEL
        c = x.shape[1]
        cov, count = torch.zeros(c * k * k, c * k * k, dtype=torch.float64, device=x.device), 0
        for part in x.split(256):  # 256 images at a time: all 5,000 at 64 px would take 2 GB as float64 patches
            patches = part.float().unfold(2, k, 1).unfold(3, k, 1)   # N, C, H', W', k, k
            patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k).double()
            cov += patches.T @ patches
            count += len(patches)
        cov /= count
        eigval, eigvec = torch.linalg.eigh(cov)
        filters = (eigvec.T / torch.sqrt(eigval.clamp_min(0) + eps)[:, None]).reshape(-1, c, k, k)
        weight = torch.cat((filters, -filters)).to(self.whiten.weight)
        self.whiten.weight.copy_(weight)


# Widths of the family, widest first. The time-budget planner (budget.py) picks among them.
VARIANTS = {"fastnet": (64, 256, 256), "fastnet-m": (48, 192, 192), "fastnet-s": (32, 128, 128),
            "fastnet-xs": (24, 96, 96)}


def _register(name: str, widths: tuple[int, int, int]) -> None:
    def build(num_classes: int, in_channels: int = 3, image_size: int = 32,
              widths: tuple[int, int, int] | list[int] = widths) -> FastNet:
        return FastNet(num_classes, in_channels, image_size, tuple(int(w) for w in widths))
    build.__doc__ = (f"Speed-record-style CNN: patch-whitening stem, 3 conv groups "
                     f"({'/'.join(map(str, widths))}), scaled linear head.")
    register_model(name)(build)


for _name, _widths in VARIANTS.items():
    _register(_name, _widths)
