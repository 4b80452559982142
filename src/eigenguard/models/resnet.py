"""CIFAR-style ResNet-18/34 (BasicBlock): the common post-activation baseline victims.

Stem is a 3x3 stride-1 conv with no max-pool, so 28x28 and 32x32 inputs keep
their resolution through ``layer1``. Stage widths are ``width``, ``2*width``,
``4*width``, ``8*width`` (64 gives the standard 64-128-256-512).
"""

from __future__ import annotations

import torch
from torch import nn

from eigenguard.models._layers import conv3x3, conv_bn_relu, init_weights, residual_stages
from eigenguard.models.registry import register_model


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN, added to a shortcut, then ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_ch, out_ch, stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = conv3x3(out_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            # A 1x1 projection only where the identity cannot match the shape.
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Post-activation ResNet; stages ``stem``, ``layer1``..``layer4``, head ``classifier``."""

    stage_names: tuple[str, ...] = ("stem", "layer1", "layer2", "layer3", "layer4")

    def __init__(
        self,
        blocks_per_stage: tuple[int, int, int, int],
        *,
        in_channels: int = 3,
        num_classes: int = 10,
        width: int = 64,
    ) -> None:
        super().__init__()
        self.stem = conv_bn_relu(in_channels, width)
        layers, in_ch = residual_stages(BasicBlock, width, blocks_per_stage)
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_ch, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = torch.flatten(self.pool(x), 1)
        return self.classifier(x)


@register_model("resnet18")
def resnet18(*, in_channels: int = 3, num_classes: int = 10, width: int = 64) -> ResNet:
    """ResNet-18, blocks (2, 2, 2, 2); ~11.17M parameters at width 64, 10 classes."""
    return ResNet((2, 2, 2, 2), in_channels=in_channels, num_classes=num_classes, width=width)


@register_model("resnet34")
def resnet34(*, in_channels: int = 3, num_classes: int = 10, width: int = 64) -> ResNet:
    """ResNet-34, blocks (3, 4, 6, 3); ~21.28M parameters at width 64, 10 classes."""
    return ResNet((3, 4, 6, 3), in_channels=in_channels, num_classes=num_classes, width=width)
