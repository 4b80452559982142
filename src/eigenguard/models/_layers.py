"""Building blocks and channel arithmetic shared by several architectures."""

from __future__ import annotations

from typing import Callable

from torch import nn


def scale_channels(channels: int, width: int, base: int) -> int:
    """``channels * width / base`` rounded, at least 1: scales a standard channel plan."""
    return max(1, int(round(channels * width / base)))


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to a multiple of ``divisor`` (at least ``divisor``).

    Rounds to the nearest multiple but never drops more than 10% below ``value``,
    the usual MobileNet rule, so small widths do not lose whole channel groups.
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (a BatchNorm follows or precedes it)."""
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def conv_bn_relu(in_ch: int, out_ch: int, stride: int = 1) -> nn.Sequential:
    """3x3 conv -> BatchNorm -> ReLU, the usual CIFAR stem and plain-CNN unit."""
    return nn.Sequential(
        conv3x3(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)
    )


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs, unit BatchNorm, default linear: a fixed, seed-driven start."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def residual_stages(
    block: Callable[[int, int, int], nn.Module],
    width: int,
    blocks_per_stage: tuple[int, ...],
) -> tuple[list[nn.Sequential], int]:
    """The four stages of a CIFAR ResNet: widths w, 2w, 4w, 8w, stride 2 from the second stage on.

    Returns the stages and the channel count of the last one.
    """
    in_ch = width
    stages = []
    for i, n in enumerate(blocks_per_stage):
        out_ch = width * 2**i
        stride = 1 if i == 0 else 2
        blocks = []
        for j in range(n):
            blocks.append(block(in_ch, out_ch, stride if j == 0 else 1))
            in_ch = out_ch
        stages.append(nn.Sequential(*blocks))
    return stages, in_ch
