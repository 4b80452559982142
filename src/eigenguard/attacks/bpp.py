"""BppAttack (Wang, Zhai & Ma, "BppAttack: Stealthy and Efficient Trojan Attacks against Deep
Neural Networks via Image Quantization and Contrastive Adversarial Learning", CVPR 2022), in a
data-poisoning or the paper's training-controlled mode: the trigger is colour-depth reduction.

Each channel of a poisoned image is quantised to ``squeeze_num`` evenly spaced levels of 0..255,

    x' = round(round(x · (m − 1) / 255) · 255 / (m − 1)),   m = squeeze_num,

so an 8-bit image becomes a 3-bit one at the default m = 8. With ``dither=True`` the quantisation
error is spread to the neighbouring pixels by Floyd–Steinberg error diffusion (7/16 right,
3/16 down-left, 5/16 down, 1/16 down-right, rows scanned top to bottom, left to right), which
keeps the local mean close to the original and makes the trigger harder to see; the output still
takes only the m levels. Dirty label: poisoned samples are relabelled to the target.

Defaults: ``squeeze_num = 8`` and ``dither = False``, as in BackdoorBench's
``config/attack/bpp/default.yaml`` (``squeeze_num: 8``, ``dithering: False``).

Two threat models (the ``mode`` setting; :mod:`eigenguard.attacks.training_mode`). In ``"data"``
mode (the default) the quantised images are fixed poisoned samples of the data set, like BadNets',
and the attack runs through the ordinary poisoning path. In ``"training"`` mode, the paper's, a
training hook quantises ``round(ratio · B)`` samples of every batch (after augmentation) and
relabels them, and adds ``round(neg_ratio · B)`` negative samples that keep their labels: an image
plus the quantisation residual Q(x_j) − x_j of another image of the batch, clipped (BackdoorBench
draws the residual from the whole training set, ``neg_ratio: 0.1``). They teach the network
that a perturbation with the statistics of the trigger but not its structure is not the trigger,
the contrastive part of the paper (its adversarial perturbation of the negatives is not
reproduced). :meth:`BppAttack.poison` then still returns the data mode's set, materialised for
defenses that inspect data (without negatives); the hook puts those samples back clean while the
victim trains on that set, so the dose is the paper's. ``settings()`` names ``mode`` and
``neg_ratio`` only in training mode (a ``neg_ratio`` other than its default is refused in data
mode, where it would do nothing), so data-mode configs and the keys of stored data-mode runs are
as they were before these settings existed.

Adaptation to 28×28 grey images: none in the code; the quantisation acts per pixel and per
channel, at any size. A grey image has a single channel, so it is left with m grey values in all
(m³ colours for RGB): the trigger is easier to see there than on colour images.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from ..data import ImageSet
from .base import Attack, PoisonedSet, check_images, is_real
from .registry import register_attack
from .training_mode import (BatchPoisoner, PoisonPlan, check_mode, other_rows, plan_for,
                            refuse_all_to_all, to_float, to_uint8)

#: BackdoorBench's share of negative samples per batch (``neg_ratio: 0.1``)
NEG_RATIO = 0.1


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
    mode: str = "data"
    neg_ratio: float = NEG_RATIO

    def __post_init__(self):
        check_mode("BppAttack", self.mode)
        if not is_real(self.neg_ratio) or not 0 <= self.neg_ratio <= 1:
            raise ValueError(f"BppAttack neg_ratio must be a fraction in [0, 1] (negative samples "
                             f"per training batch), got {self.neg_ratio!r}")
        if self.mode == "data" and self.neg_ratio != NEG_RATIO:
            raise ValueError(f"BppAttack neg_ratio must be left at {NEG_RATIO} in mode 'data' "
                             f"(negative samples exist only in training mode), got "
                             f"{self.neg_ratio!r}")
        if (not isinstance(self.squeeze_num, numbers.Integral) or isinstance(self.squeeze_num, bool)
                or not 2 <= self.squeeze_num <= 255):
            raise ValueError(f"BppAttack squeeze_num must be an integer in 2..255 (levels per "
                             f"channel; 256 would leave 8-bit images unchanged), got "
                             f"{self.squeeze_num!r}")
        if not isinstance(self.dither, bool):
            raise ValueError(f"BppAttack dither must be True or False, got {self.dither!r}")
        self.squeeze_num, self.neg_ratio = int(self.squeeze_num), float(self.neg_ratio)
        self._plan = None

    def settings(self) -> dict:
        """The settings; ``mode`` and ``neg_ratio`` only in training mode (data-mode keys stay
        unchanged)."""
        settings = super().settings()
        if self.mode == "data":
            del settings["mode"], settings["neg_ratio"]
        return settings

    def check_label_mode_supported(self, label_mode: str) -> None:
        super().check_label_mode_supported(label_mode)
        refuse_all_to_all("BppAttack", self.mode, label_mode)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        values = images.double()
        if self.dither:
            quantised = floyd_steinberg(values, self.squeeze_num)
        else:
            quantised = _quantise(values, self.squeeze_num)
        return quantised.round().clamp(0, 255).to(torch.uint8)

    # -- training mode -------------------------------------------------------------------------

    def poison(self, train: ImageSet, ratio: float, target: int, seed: int, pool: str = "all",
               label_mode: str = "all-to-one") -> PoisonedSet:
        """Poison as the base class does; in training mode the hooks also learn the ratio and the
        materialised set from here."""
        poisoned = super().poison(train, ratio, target, seed, pool, label_mode=label_mode)
        if self.mode == "training":
            self._plan = PoisonPlan.of(poisoned, train, ratio, pool)
        return poisoned

    def training_hooks(self, target: int, seed: int, ratio: float | None = None) -> list:
        """Data mode: none. Training mode: a hook that quantises a fresh share of every batch and
        adds negatives (``ratio``: the share, by default the one :meth:`poison` was given)."""
        if self.mode == "data":
            return []
        return [BppBatches(self, target, seed, plan_for("BppAttack", self._plan, ratio))]

    def residual(self, images: torch.Tensor) -> torch.Tensor:
        """Q(x) − x of a uint8 batch, as int16 (the trigger's own perturbation)."""
        return self.apply(images).to(torch.int16) - images.to(torch.int16)


class BppBatches(BatchPoisoner):
    """BppAttack's training-controlled mode: quantised samples relabelled to the target, and
    ``neg_ratio`` · B negatives (another image's quantisation residual, labels kept)."""

    stream = "bpp-batches"

    def extra_count(self, batch_size: int, poisoned: int) -> int:
        return int(round(self.attack.neg_ratio * batch_size))

    def edit(self, state, batch, poisoned, extra):
        images = self.trigger_rows(batch, poisoned)
        if len(extra):
            donors = other_rows(extra, len(batch), self.draw).to(images.device)
            rows = extra.to(images.device)
            residual = self.attack.residual(to_uint8(batch.images[donors]))
            negative = (to_uint8(images[rows]).to(torch.int16) + residual).clamp(0, 255)
            images[rows] = to_float(negative.to(torch.uint8), images)
        return images
