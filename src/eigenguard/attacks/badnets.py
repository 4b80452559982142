"""BadNets (Gu et al., 2017): a white square in the bottom-right corner."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Attack, check_images, is_integer
from .registry import register_attack


@register_attack("badnets")
@dataclass
class BadNets(Attack):
    """A ``patch``×``patch`` square of value 255 in the bottom-right corner, no margin.

    ``patch=None`` scales BackdoorBench's 3×3 at 32×32 with the image height (3×3 at 28×28 too).
    """

    patch: int | None = None
    value: int = 255

    def __post_init__(self):
        # checked here: a patch of 0 would slice [-0:], which is the whole image
        if self.patch is not None and (not is_integer(self.patch) or self.patch < 1):
            raise ValueError(f"BadNets patch must be an integer >= 1 (pixels per side, at most "
                             f"the image size) or None for the default, got {self.patch!r}")
        if not is_integer(self.value) or not 0 <= self.value <= 255:
            raise ValueError(f"BadNets value must be an integer in 0..255, got {self.value!r}")

    def patch_size(self, height: int) -> int:
        return self.patch if self.patch is not None else max(1, round(3 * height / 32))

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        height, width = images.shape[-2:]
        size = self.patch_size(height)
        if size > min(height, width):
            raise ValueError(f"BadNets patch {size} does not fit {height}×{width} images: the "
                             f"patch must be in 1..{min(height, width)} for them")
        out = images.clone()
        out[..., -size:, -size:] = self.value
        return out
