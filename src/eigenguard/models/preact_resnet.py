"""Pre-activation ResNet-18, the default victim network in BackdoorBench.

Blocks run BN -> ReLU -> conv twice; the shortcut is a bare 1x1 conv (on the
pre-activated input) only where the shape changes. Because blocks end on an
addition, a final BN -> ReLU (``final_bn``, ``final_relu``) runs after
``layer4`` and before pooling. The stem is a single 3x3 stride-1 conv.
Stage widths are ``width``, ``2*width``, ``4*width``, ``8*width``.
"""

from __future__ import annotations

import torch
from torch import nn

from eigenguard.models._layers import conv3x3, init_weights, residual_stages
from eigenguard.models.registry import register_model


class PreActBlock(nn.Module):
    """BN-ReLU-conv twice plus a shortcut; no activation after the addition."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = conv3x3(in_ch, out_ch, stride)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = conv3x3(out_ch, out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """Pre-activation ResNet; stages ``stem``, ``layer1``..``layer4``, head ``classifier``."""

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
        self.stem = nn.Sequential(conv3x3(in_channels, width))
        layers, in_ch = residual_stages(PreActBlock, width, blocks_per_stage)
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.final_bn = nn.BatchNorm2d(in_ch)
        self.final_relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_ch, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.final_relu(self.final_bn(x))
        x = torch.flatten(self.pool(x), 1)
        return self.classifier(x)


@register_model("preact_resnet18")
def preact_resnet18(
    *, in_channels: int = 3, num_classes: int = 10, width: int = 64
) -> PreActResNet:
    """PreAct ResNet-18, blocks (2, 2, 2, 2); ~11.17M parameters at width 64, 10 classes."""
    return PreActResNet(
        (2, 2, 2, 2), in_channels=in_channels, num_classes=num_classes, width=width
    )
