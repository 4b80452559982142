"""SIG (Barni, Kallas & Tondi, "A new backdoor attack in CNNs by training set corruption without
label poisoning", ICIP 2019): a clean-label attack whose trigger is a horizontal sinusoid.

The trigger adds, to every channel and every row of the image, the same column profile

    v(i, j) = delta · sin(2π · j · f / W),   j = 0 .. W−1 the column, W the image width,

then clips to 0..255 and rounds to uint8. Only images of the target class are poisoned and they
keep their (correct) label (``clean_label = True``): the network learns to associate the stripes
with the target class, and at test time the stripes on an image of another class pull it there.

Defaults: ``frequency = 6`` and ``delta = 40`` on the 0..255 scale, the setting of BackdoorBench's
attack config (``config/attack/sig/default.yaml``: ``sig_delta: 40``), which produced its
leaderboard numbers and which REFERENCE.md §2 quotes (40/255). The paper (Δ = 20 for the poisoned
training images) and BackdoorBench's ``sigTriggerAttack`` transform default use 20: pass
``delta=20`` for that.
One amplitude serves both the poisoned training images and the triggered test images here.

Adaptation to 28×28 grey images: none is needed. The profile is defined per column through j/W,
so it has f periods across any width (6 periods over 28 columns as over 32), and a grey image is
a single channel that gets the same profile as each colour channel would.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import Attack, check_images, is_real
from .registry import register_attack


def sinusoid_profile(width: int, delta: float, frequency: float,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """delta · sin(2π j f / W) for the columns j = 0 .. W−1, as float64 of shape (W,)."""
    columns = torch.arange(width, dtype=torch.float64, device=device)
    return delta * torch.sin(2 * math.pi * columns * frequency / width)


@register_attack("sig")
@dataclass
class SIG(Attack):
    """x' = clip(round(x + delta · sin(2π j f / W)), 0, 255) on every channel; clean label."""

    clean_label = True

    delta: float = 40.0
    frequency: float = 6.0

    def __post_init__(self):
        if not is_real(self.delta) or not 0 < self.delta <= 255:
            raise ValueError(f"SIG delta must be a number in (0, 255] (the sinusoid's amplitude "
                             f"on the 0..255 scale), got {self.delta!r}")
        if not is_real(self.frequency) or self.frequency <= 0:
            raise ValueError(f"SIG frequency must be a number > 0 (periods across the image "
                             f"width), got {self.frequency!r}")
        self.delta = float(self.delta)
        self.frequency = float(self.frequency)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        profile = sinusoid_profile(images.shape[-1], self.delta, self.frequency, images.device)
        # float64 so that x + v rounds as the formula says; the profile broadcasts over the batch,
        # the channels and the rows
        return (images.double() + profile).round().clamp(0, 255).to(torch.uint8)
