"""The face every imgclf model shows, so training, fine-tuning and export treat them alike.

    class MyNet(ImageClassifier): ...  # set num_classes/in_channels/num_features/head, define forward_features

Subclasses build ``self.head`` with :meth:`new_head` and implement :meth:`forward_features`.
"""
from __future__ import annotations

import torch
from torch import nn


class ImageClassifier(nn.Module):
    """Base class: ``forward(x) == forward_head(forward_features(x))``; the head is swappable."""

    num_classes: int
    in_channels: int
    num_features: int  # width of the vector forward_features returns
    arch_args: dict  # set by create_model: the arguments that rebuild this architecture
    # whether precision "auto" trains this model in bf16 on a CPU with native bf16 (dense convolutions and
    # matmuls gain from AMX/AVX512-BF16; depthwise convolutions have no fast bf16 kernels and lose)
    cpu_bf16: bool = True
    # Flatten -> Dense models: the dense layer's width fixes the input size, so no progressive resizing
    fixed_input_size: bool = False
    # every conv is followed by BatchNorm, so filter scale is irrelevant and Muon may normalise the filters
    normalized_filters: bool = False
    # epochs during which :meth:`stem_parameters` train (then their lr decays to 0); None: no such stage
    stem_bias_epochs: int | None = None
    # the normalisation pretrained weights expect (per channel, 0..1 scale); None: the data's own statistics
    input_mean: tuple[float, ...] | None = None
    input_std: tuple[float, ...] | None = None
    # what create_model's pretrained-weight loader did (shown in the training log)
    pretrained_notes: tuple[str, ...] | list[str] = ()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_channels, H, W) images -> (N, num_features) pooled features."""
        raise NotImplementedError

    def new_head(self, num_classes: int) -> nn.Module:
        """A freshly initialised classifier head mapping num_features -> num_classes."""
        raise NotImplementedError

    def init_from_data(self, x: torch.Tensor) -> None:
        """Data-dependent initialisation, called once by the trainer before the first step of a model
        trained from scratch, with a sample of normalised training images (N, C, H, W). Default: nothing."""

    def stem_parameters(self) -> list[nn.Parameter]:
        """Parameters that train only in the first ``stem_bias_epochs`` epochs (a separate optimizer group
        whose lr decays to 0 by then). Default: none."""
        return []

    def early_blocks(self) -> list[nn.Module]:
        """The backbone's modules from the input side, in order (stem first), for ``--freeze-blocks``: freezing
        the first k of them spares the backward pass through the largest feature maps. Default: none (the
        model cannot freeze a prefix)."""
        return []

    def freeze_early_blocks(self, n: int) -> None:
        """The first ``n`` of :meth:`early_blocks` keep their weights: no gradient reaches them."""
        for block in self.early_blocks()[:n]:
            for p in block.parameters():
                p.requires_grad_(False)

    def cam_layer(self) -> nn.Module | None:
        """The module whose output is the feature map (N, C, h, w) that heat maps (imgclf.explain) weigh: the
        last one before the network's last downsampling (stride 16 in a stride-32 network), semantic enough to
        name the class and fine enough to point at it. Its output must not be changed in place afterwards.
        Default: None, the model cannot explain its answers."""
        return None

    def pruning_exempt(self) -> dict[str, str]:
        """Layers, by module name, whose output channels structured pruning (``imgclf prune``) keeps, each with
        why. Default: the head's linear layers, whose outputs are the classes."""
        head = {id(m) for m in self.get_classifier().modules() if isinstance(m, nn.Linear)}
        return {name: "its outputs are the classes" for name, m in self.named_modules() if id(m) in head}

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a fresh one for ``num_classes`` (transfer learning)."""
        old = next(self.head.parameters())
        # Keep the new head where the old one lived, so a model already moved to a device stays usable.
        self.head = self.new_head(num_classes).to(device=old.device, dtype=old.dtype)
        self.num_classes = num_classes
        if hasattr(self, "arch_args"):
            # Checkpoints rebuild from arch_args; they must describe the head the weights belong to.
            self.arch_args["num_classes"] = num_classes
