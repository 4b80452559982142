"""A three-block CNN that trains in seconds on CPU, for tests and quick experiments.

``block1`` keeps the resolution; ``block2`` and ``block3`` halve it with stride-2
convs. Channels are ``width``, ``2*width``, ``4*width``; each block is a 3x3
conv -> BN -> ReLU. The head is global average pooling plus ``classifier``.
"""

from __future__ import annotations

import torch
from torch import nn

from eigenguard.models._layers import conv_bn_relu, init_weights
from eigenguard.models.registry import register_model


class SmallCNN(nn.Module):
    """Three conv blocks; stages ``block1``, ``block2``, ``block3``."""

    stage_names: tuple[str, ...] = ("block1", "block2", "block3")

    def __init__(self, *, in_channels: int = 3, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.block1 = conv_bn_relu(in_channels, width)
        self.block2 = conv_bn_relu(width, 2 * width, stride=2)
        self.block3 = conv_bn_relu(2 * width, 4 * width, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(4 * width, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block1(x)
        x = self.block2(x)
        x = self.block3(x)
        x = torch.flatten(self.pool(x), 1)
        return self.classifier(x)


@register_model("small_cnn")
def small_cnn(*, in_channels: int = 3, num_classes: int = 10, width: int = 32) -> SmallCNN:
    """Small fast CNN (width 32 by default: 32-64-128 channels)."""
    return SmallCNN(in_channels=in_channels, num_classes=num_classes, width=width)
