"""Blended (Chen et al., 2017): blend one fixed pattern image into the whole picture."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Attack, check_images
from .registry import register_attack


def noise_pattern(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A uniform random uint8 image, the same for the same shape and seed on every machine.

    Chen et al. blend either a photograph (Hello Kitty) or random noise; no photograph is
    available here, so the pattern is noise drawn from a fixed seed.
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=generator, dtype=torch.int64).to(torch.uint8)


@register_attack("blended")
@dataclass
class Blended(Attack):
    """x' = round((1 − α)·x + α·pattern), α = 0.2 by default."""

    alpha: float = 0.2
    pattern_seed: int = 0

    def __post_init__(self):
        if not 0 < self.alpha <= 1:
            raise ValueError(f"Blended alpha must be in (0, 1], got {self.alpha}")

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        pattern = noise_pattern(tuple(images.shape[1:]), self.pattern_seed).to(images.device)
        # float64, so pixels near a rounding boundary round as the formula says (float32 moves
        # about 1% of them by one level at alpha = 0.1 or 0.3)
        mixed = (1 - self.alpha) * images.double() + self.alpha * pattern.double()
        return mixed.round().clamp(0, 255).to(torch.uint8)
