"""VGG-16 with BatchNorm, CIFAR-style: the plain (no-shortcut) deep victim network.

Five stages of 3x3 conv-BN-ReLU units (2, 2, 3, 3, 3 convs) each end in a 2x2
max-pool. The pools use ``ceil_mode=True`` so small inputs never shrink to zero:
28x28 goes 28->14->7->4->2->1 and 32x32 goes 32->16->8->4->2->1. The head is
adaptive average pooling plus one linear layer ``classifier`` (8*width -> classes),
the usual CIFAR head: 14.73M parameters at width 64 and 10 classes.
Stage widths are 64-128-256-512-512 scaled by ``width / 64``.
"""

from __future__ import annotations

import torch
from torch import nn

from eigenguard.models._layers import conv_bn_relu, init_weights, scale_channels
from eigenguard.models.registry import register_model

# (channels at width 64, convs in the stage) for each of the five stages.
_VGG16_PLAN: tuple[tuple[int, int], ...] = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))


class VGG(nn.Module):
    """VGG with BN; stages ``stage1``..``stage5`` (each ends in its max-pool)."""

    stage_names: tuple[str, ...] = ("stage1", "stage2", "stage3", "stage4", "stage5")

    def __init__(
        self,
        plan: tuple[tuple[int, int], ...] = _VGG16_PLAN,
        *,
        in_channels: int = 3,
        num_classes: int = 10,
        width: int = 64,
    ) -> None:
        super().__init__()
        if len(plan) != len(self.stage_names):
            raise ValueError(f"VGG needs {len(self.stage_names)} stages, got {len(plan)}")
        in_ch = in_channels
        for name, (channels, n_convs) in zip(self.stage_names, plan):
            out_ch = scale_channels(channels, width, 64)
            units: list[nn.Module] = []
            for _ in range(n_convs):
                units.append(conv_bn_relu(in_ch, out_ch))
                in_ch = out_ch
            units.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
            self.add_module(name, nn.Sequential(*units))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_ch, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage1(x)
        x = self.stage2(x)
        x = self.stage3(x)
        x = self.stage4(x)
        x = self.stage5(x)
        x = torch.flatten(self.pool(x), 1)
        return self.classifier(x)


@register_model("vgg16_bn")
def vgg16_bn(*, in_channels: int = 3, num_classes: int = 10, width: int = 64) -> VGG:
    """VGG-16-BN with a single linear head; 14.73M parameters at width 64, 10 classes."""
    return VGG(_VGG16_PLAN, in_channels=in_channels, num_classes=num_classes, width=width)
