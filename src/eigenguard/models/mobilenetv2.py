"""MobileNetV2 adapted to 32x32 inputs: the light-weight victim network.

Changes from the ImageNet version, as is usual for CIFAR: the stem conv has
stride 1 and the seven bottleneck groups use strides (1, 1, 2, 2, 1, 2, 1), so a
32x32 input reaches the head at 4x4 (28x28 reaches 4x4 as well).

Width: the standard network has a 32-channel stem, so every channel count is
scaled by ``width / 32`` and rounded to a multiple of 8 (at least 8) with the
usual make-divisible rule. ``width=32`` is the standard network (~2.24M
parameters for 10 classes). The 1280-channel head conv is only ever widened,
never narrowed, as in the reference design.
"""

from __future__ import annotations

import torch
from torch import nn

from eigenguard.models._layers import init_weights, make_divisible
from eigenguard.models.registry import register_model

# (expansion t, channels c at width 32, repeats n, stride s) per bottleneck group.
_GROUPS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
_HEAD_CHANNELS = 1280


def _conv_bn_relu6(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1):
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 linear project; residual when shapes match."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_ch * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(_conv_bn_relu6(in_ch, hidden, 1))
        layers += [
            _conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2; stages ``stem``, ``stage1``..``stage7`` (bottleneck groups), ``head``.

    ``head`` is the 1x1 conv to 1280 channels, still a 4-D feature map.
    """

    stage_names: tuple[str, ...] = (
        "stem", "stage1", "stage2", "stage3", "stage4", "stage5", "stage6", "stage7", "head",
    )

    def __init__(self, *, in_channels: int = 3, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        scale = width / 32
        in_ch = make_divisible(32 * scale)
        self.stem = _conv_bn_relu6(in_channels, in_ch, 3, stride=1)
        for i, (t, c, n, s) in enumerate(_GROUPS, start=1):
            out_ch = make_divisible(c * scale)
            blocks = []
            for j in range(n):
                blocks.append(InvertedResidual(in_ch, out_ch, s if j == 0 else 1, t))
                in_ch = out_ch
            self.add_module(f"stage{i}", nn.Sequential(*blocks))
        head_ch = make_divisible(_HEAD_CHANNELS * max(1.0, scale))
        self.head = _conv_bn_relu6(in_ch, head_ch, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(head_ch, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.stage1(x)
        x = self.stage2(x)
        x = self.stage3(x)
        x = self.stage4(x)
        x = self.stage5(x)
        x = self.stage6(x)
        x = self.stage7(x)
        x = self.head(x)
        x = torch.flatten(self.pool(x), 1)
        return self.classifier(x)


@register_model("mobilenetv2")
def mobilenetv2(*, in_channels: int = 3, num_classes: int = 10, width: int = 32) -> MobileNetV2:
    """CIFAR MobileNetV2; ``width`` is the stem width (32 = standard, ~2.24M parameters)."""
    return MobileNetV2(in_channels=in_channels, num_classes=num_classes, width=width)
