"""BadNets (Gu et al., 2017): a white square in the bottom-right corner."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Attack, check_images
from .registry import register_attack


@register_attack("badnets")
@dataclass
class BadNets(Attack):
    """A ``patch``×``patch`` square of value 255 in the bottom-right corner, no margin.

    ``patch=None`` scales BackdoorBench's 3×3 at 32×32 with the image height (3×3 at 28×28 too).
    """

    patch: int | None = None
    value: int = 255

    def patch_size(self, height: int) -> int:
        return self.patch if self.patch is not None else max(1, round(3 * height / 32))

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        size = self.patch_size(images.shape[-2])
        out = images.clone()
        out[..., -size:, -size:] = self.value
        return out
