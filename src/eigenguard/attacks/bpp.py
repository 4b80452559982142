"""BppAttack (Wang, Zhai & Ma, "BppAttack: Stealthy and Efficient Trojan Attacks against Deep
Neural Networks via Image Quantization and Contrastive Adversarial Learning", CVPR 2022), in its
data-poisoning mode: the trigger is colour-depth reduction.

Each channel of a poisoned image is quantised to ``squeeze_num`` evenly spaced levels of 0..255,

    x' = round(round(x · (m − 1) / 255) · 255 / (m − 1)),   m = squeeze_num,

so an 8-bit image becomes a 3-bit one at the default m = 8. With ``dither=True`` the quantisation
error is spread to the neighbouring pixels by Floyd–Steinberg error diffusion (7/16 right,
3/16 down-left, 5/16 down, 1/16 down-right, rows scanned top to bottom, left to right), which
keeps the local mean close to the original and makes the trigger harder to see; the output still
takes only the m levels. Dirty label: poisoned samples are relabelled to the target.

Defaults: ``squeeze_num = 8`` and ``dither = False``, as in BackdoorBench's
``config/attack/bpp/default.yaml`` (``squeeze_num: 8``, ``dithering: False``).

Not implemented: the paper's training-controlled mode, in which the attacker also controls
training and adds negative samples that keep their labels (contrastive adversarial learning;
BackdoorBench's ``neg_ratio: 0.1``). Here the quantised images are fixed poisoned samples of the
data set, like BadNets', so the attack runs through the ordinary poisoning path.

Adaptation to 28×28 grey images: none in the code; the quantisation acts per pixel and per
channel, at any size. A grey image has a single channel, so it is left with m grey values in all
(m³ colours for RGB): the trigger is easier to see there than on colour images.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from .base import Attack, check_images
from .registry import register_attack


def _quantise(values: torch.Tensor, levels: int) -> torch.Tensor:
    """The nearest of ``levels`` evenly spaced values of [0, 255] (float, clamped first)."""
    step = 255.0 / (levels - 1)
    return (values.clamp(0, 255) / step).round() * step


def floyd_steinberg(images: torch.Tensor, levels: int) -> torch.Tensor:
    """Floyd–Steinberg dithering of a float64 batch (N, C, H, W) to ``levels`` levels per channel.

    The scan is sequential over the pixels (each one needs the error of its left neighbour) and
    vectorised over the batch and the channels: the working copy is laid out (H, W, N, C) so that
    each pixel position is one contiguous slice of the whole batch.
    """
    height, width = images.shape[-2:]
    work = images.permute(2, 3, 0, 1).contiguous()
    out = torch.empty_like(work)
    for y in range(height):
        below = y + 1 < height
        for x in range(width):
            old = work[y, x]
            new = _quantise(old, levels)
            out[y, x] = new
            error = old - new
            if x + 1 < width:
                work[y, x + 1] += error * (7 / 16)
            if below:
                if x > 0:
                    work[y + 1, x - 1] += error * (3 / 16)
                work[y + 1, x] += error * (5 / 16)
                if x + 1 < width:
                    work[y + 1, x + 1] += error * (1 / 16)
    return out.permute(2, 3, 0, 1)


@register_attack("bpp")
@dataclass
class BppAttack(Attack):
    """Colour-depth reduction to ``squeeze_num`` levels per channel, optionally dithered."""

    squeeze_num: int = 8
    dither: bool = False

    def __post_init__(self):
        if (not isinstance(self.squeeze_num, numbers.Integral) or isinstance(self.squeeze_num, bool)
                or not 2 <= self.squeeze_num <= 255):
            raise ValueError(f"BppAttack squeeze_num must be an integer in 2..255 (levels per "
                             f"channel; 256 would leave 8-bit images unchanged), got "
                             f"{self.squeeze_num!r}")
        if not isinstance(self.dither, bool):
            raise ValueError(f"BppAttack dither must be True or False, got {self.dither!r}")
        self.squeeze_num = int(self.squeeze_num)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        values = images.double()
        if self.dither:
            quantised = floyd_steinberg(values, self.squeeze_num)
        else:
            quantised = _quantise(values, self.squeeze_num)
        return quantised.round().clamp(0, 255).to(torch.uint8)
