"""WaNet (Nguyen & Tran, "WaNet – Imperceptible Warping-based Backdoor Attack", ICLR 2021), in a
data-poisoning or the paper's training-controlled mode: the trigger is a small, fixed, smooth
warp of the whole image.

The warping field. A k × k control grid of offsets (x and y) is drawn uniform in [−1, 1] and
divided by its mean absolute value, upsampled bicubically (align_corners=True) to the image size
H × W, and scaled by s / size: the x offsets by s / W, the y offsets by s / H, in the normalised
coordinates of ``torch.nn.functional.grid_sample`` (−1 and 1 are the centres of the first and
last pixels). The sampling grid is the identity plus that offset, clamped to [−1, 1], and the
image is resampled bilinearly on it (align_corners=True), then rounded to uint8.

Every pixel therefore moves by at most s · M · (W − 1) / (2W) < s · M / 2 pixels horizontally
(and s · M · (H − 1) / (2H) vertically; clamping only shortens a move), where M is the largest
absolute value of the upsampled field. Bicubic interpolation (PyTorch's Keys kernel, a = −0.75)
overshoots by at most its Lebesgue constant, 1.375 per axis, so M ≤ 1.375² · max|control|. At the
defaults (s = 0.5, max|control| ≤ 1 / mean|offset| ≈ 2) that is a move of about one pixel at most:
the warp is hard to see, which is WaNet's point.

Noise mode. Besides the poisoned samples (warped with the field and relabelled to the target),
``cross_ratio`` times as many other samples are warped with the field plus a per-sample random
perturbation of the grid, uniform in [−1, 1] / size (at most half a pixel more), and KEEP their
labels. They teach the network that a warp that is merely close to the trigger is not the
trigger. :meth:`WaNet.poison` draws them from the samples that are not poisoned (any class, even
with ``pool="non-target"``), and returns a :class:`WaNetPoisonedSet` that lists them in
``noise_indices``. Noise samples are modified but NOT poisoned: they are not in
``poison_indices``, ``is_poisoned`` is False for them, and a detector that flags them counts
false positives. The conformance check "samples outside the poison set are unchanged" holds for
every sample outside ``poison_indices`` and ``noise_indices``.

Defaults: k = 4, s = 0.5, cross_ratio = 2, as in BackdoorBench's
``config/attack/wanet/default.yaml`` (``k: 4``, ``s: 0.5``, ``cross_ratio: 2``; its
``grid_rescale: 1`` is fixed at 1 here).

Two threat models (the ``mode`` setting; :mod:`eigenguard.attacks.training_mode`). In ``"data"``
mode (the default) the poisoned and noise samples are drawn once, like BadNets' poisoned samples,
and the attack runs through the ordinary poisoning path. In ``"training"`` mode, the paper's and
BackdoorBench's, a training hook warps a fresh share of every training batch after augmentation:
``round(ratio · B)`` samples with the field, relabelled to the target, and ``round(cross_ratio ·
that)`` others with the field plus their own perturbation, labels kept. :meth:`WaNet.poison` then
still returns the data mode's set, materialised for defenses that inspect data; the hook puts
those samples back clean while the victim trains on that set, so the dose is the paper's.
``settings()`` names ``mode`` only when it is ``"training"``, so data-mode configs (and the keys
of stored data-mode runs) are as they were before the setting existed.

Why the field is fitted state rather than a ``grid_seed`` setting: :meth:`WaNet.fit` draws it
from the seed it is given (the run's own "attack-fit" stream) and keeps it in ``control_`` (the
k × k control offsets) and ``grid_`` (the H × W sampling grid), which the run saves beside its
checkpoint. (1) As in the paper and BackdoorBench, the trigger is a random draw per run, so the
spread over seeds includes the spread over warping fields rather than one arbitrary field for
every seed. (2) Evaluation applies the very grid the model was poisoned with, bit for bit: a
field recomputed from a seed at evaluation time (another device, another torch version's bicubic
kernel) could move pixels that sit on a rounding boundary. (3) ``fit`` sees the training set, so
the field is built once, at the training images' size; applying it to images of another size is
an error. To hold the field fixed across runs, fit with a fixed seed.

Adaptation to 28×28 grey images: the field is upsampled to the image size and scaled by s / size,
so the largest move stays below s · M / 2 pixels at any size (the same pixel-scale warp at 28×28
as at 32×32); a grey image is warped like a single colour channel. The per-sample noise is scaled
by 1 / size likewise.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..data import ImageSet
from ..seeding import generator as stream_generator
from .base import Attack, PoisonedSet, check_images, is_real
from .registry import register_attack
from .training_mode import (BatchPoisoner, PoisonPlan, check_mode, plan_for, refuse_all_to_all,
                            to_float, to_uint8)

#: images warped per grid_sample call (bounds the float64 working memory, not a per-image loop)
CHUNK = 4096


@dataclass(frozen=True, eq=False)
class WaNetPoisonedSet(PoisonedSet):
    """A PoisonedSet that also lists WaNet's noise-mode samples: warped with a perturbed field,
    labels kept, not poisoned (they are not in ``poison_indices``)."""

    noise_indices: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))


def identity_grid(height: int, width: int) -> torch.Tensor:
    """grid_sample's identity grid (H, W, 2) in float64: [..., 0] is x (column), [..., 1] is y."""
    ys = torch.linspace(-1, 1, height, dtype=torch.float64)
    xs = torch.linspace(-1, 1, width, dtype=torch.float64)
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((x, y), dim=-1)


def upsample_field(control: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The control offsets (2, k, k) upsampled bicubically (align_corners=True) to (2, H, W)."""
    return F.interpolate(control[None].double(), size=(height, width), mode="bicubic",
                         align_corners=True)[0]


def warp_grid(control: torch.Tensor, height: int, width: int, s: float) -> torch.Tensor:
    """The sampling grid (H, W, 2): identity + s · field / size, clamped to [−1, 1]."""
    offsets = upsample_field(control, height, width)
    scale = torch.tensor([s / width, s / height], dtype=torch.float64)
    return (identity_grid(height, width) + offsets.permute(1, 2, 0) * scale).clamp(-1, 1)


@register_attack("wanet")
@dataclass
class WaNet(Attack):
    """A fixed smooth warp (k × k control grid, strength s), with ``cross_ratio`` × as many
    noise-mode samples that keep their labels."""

    needs_fit = True

    k: int = 4
    s: float = 0.5
    cross_ratio: float = 2.0
    mode: str = "data"

    def __post_init__(self):
        check_mode("WaNet", self.mode)
        if (not isinstance(self.k, numbers.Integral) or isinstance(self.k, bool)
                or self.k < 2):
            raise ValueError(f"WaNet k must be an integer >= 2 (control points per side of the "
                             f"warping grid), got {self.k!r}")
        if not is_real(self.s) or self.s <= 0:
            raise ValueError(f"WaNet s must be a number > 0 (the warping strength), got "
                             f"{self.s!r}")
        if not is_real(self.cross_ratio) or self.cross_ratio < 0:
            raise ValueError(f"WaNet cross_ratio must be a number >= 0 (noise-mode samples per "
                             f"poisoned sample), got {self.cross_ratio!r}")
        self.k, self.s, self.cross_ratio = int(self.k), float(self.s), float(self.cross_ratio)
        self._plan = None

    def settings(self) -> dict:
        """The settings; ``mode`` only when it is "training" (data-mode keys stay unchanged)."""
        settings = super().settings()
        if self.mode == "data":
            del settings["mode"]
        return settings

    def check_label_mode_supported(self, label_mode: str) -> None:
        super().check_label_mode_supported(label_mode)
        refuse_all_to_all("WaNet", self.mode, label_mode)

    # -- the field -----------------------------------------------------------------------------

    def fit(self, train: ImageSet, *, seed: int = 0, device: str | torch.device = "cpu") -> "WaNet":
        """Draw the k × k control offsets from ``seed`` and build the sampling grid at the
        training images' size (on the CPU, in float64; ``device`` is not needed)."""
        height, width = train.image_size
        if self.k > min(height, width):
            raise ValueError(f"WaNet k = {self.k} control points per side do not fit "
                             f"{height}×{width} images: k must be at most {min(height, width)}")
        draw = torch.Generator().manual_seed(seed)
        control = torch.rand(2, self.k, self.k, generator=draw, dtype=torch.float64) * 2 - 1
        self.control_ = control / control.abs().mean()
        self.grid_ = warp_grid(self.control_, height, width, self.s)
        return self

    def max_displacement(self) -> tuple[float, float]:
        """The bound on any pixel's move (x, y) in pixels: s · M · (size − 1) / (2 · size), M the
        largest absolute value of the upsampled field along that axis."""
        self.check_fitted()
        height, width = self.grid_.shape[:2]
        offsets = upsample_field(self.control_, height, width).abs().amax(dim=(1, 2))
        return (self.s * float(offsets[0]) * (width - 1) / (2 * width),
                self.s * float(offsets[1]) * (height - 1) / (2 * height))

    def _grid_for(self, images: torch.Tensor) -> torch.Tensor:
        self.check_fitted()
        height, width = images.shape[-2:]
        if tuple(self.grid_.shape[:2]) != (height, width):
            raise ValueError(f"WaNet was fitted on {self.grid_.shape[0]}×{self.grid_.shape[1]} "
                             f"images and cannot warp {height}×{width} ones: fit it on images "
                             f"of that size")
        return self.grid_.to(images.device, torch.float64)

    def _warp(self, images: torch.Tensor, noise: torch.Generator | None = None) -> torch.Tensor:
        """Warp a uint8 batch with the field; with a generator, each image's grid also gets its
        own perturbation, uniform in [−1, 1] / size, before the clamp."""
        check_images(images)
        base = self._grid_for(images)
        height, width = images.shape[-2:]
        scale = torch.tensor([1 / width, 1 / height], dtype=torch.float64)
        out = torch.empty_like(images)
        for start in range(0, len(images), CHUNK):
            batch = images[start:start + CHUNK]
            grid = base.expand(len(batch), -1, -1, -1)
            if noise is not None:
                offsets = torch.rand(grid.shape, generator=noise, dtype=torch.float64) * 2 - 1
                grid = (grid + (offsets * scale).to(grid.device)).clamp(-1, 1)
            # the grid lies in [-1, 1]: "border" only guards against a neighbour one rounding
            # error outside the image, which would otherwise be read as 0 with weight ~1e-16
            warped = F.grid_sample(batch.double(), grid, mode="bilinear", padding_mode="border",
                                   align_corners=True)
            out[start:start + len(batch)] = warped.round().clamp(0, 255).to(torch.uint8)
        return out

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        return self._warp(images)

    # -- poisoning with noise-mode samples -----------------------------------------------------

    def poison(self, train: ImageSet, ratio: float, target: int, seed: int,
               pool: str = "all", label_mode: str = "all-to-one") -> WaNetPoisonedSet:
        """Poison as the base class does, then warp ``round(cross_ratio · poisoned)`` other
        samples with a perturbed field, keeping their labels (listed in ``noise_indices``)."""
        poisoned = super().poison(train, ratio, target, seed, pool, label_mode=label_mode)
        count = len(poisoned.poison_indices)
        wanted = int(round(self.cross_ratio * count))
        rest = (~poisoned.is_poisoned).nonzero().flatten()
        if wanted > len(rest):
            raise ValueError(
                f"WaNet cannot add {wanted} noise-mode samples (cross_ratio {self.cross_ratio:g} "
                f"× {count} poisoned): only {len(rest)} of {len(train)} samples are not "
                f"poisoned; with cross_ratio {self.cross_ratio:g} the poison ratio can be at "
                f"most about 1 / (1 + cross_ratio) = {1 / (1 + self.cross_ratio):.4f}")
        draw = stream_generator(seed, "wanet-noise")
        chosen = rest[torch.randperm(len(rest), generator=draw)[:wanted]].sort().values
        images = poisoned.data.images.clone()
        if wanted:
            images[chosen] = self._warp(train.images[chosen], noise=draw)
        result = WaNetPoisonedSet(poisoned.data.with_images_labels(images, poisoned.data.labels),
                                  poisoned.poison_indices, poisoned.original_labels,
                                  poisoned.target, noise_indices=chosen)
        if self.mode == "training":
            self._plan = PoisonPlan.of(result, train, ratio, pool, extra=chosen)
        return result

    # -- training mode -------------------------------------------------------------------------

    def training_hooks(self, target: int, seed: int, ratio: float | None = None) -> list:
        """Data mode: none. Training mode: a hook that warps a fresh share of every batch
        (``ratio``: the share, by default the one :meth:`poison` was given)."""
        if self.mode == "data":
            return []
        self.check_fitted()
        return [WaNetBatches(self, target, seed, plan_for("WaNet", self._plan, ratio))]


class WaNetBatches(BatchPoisoner):
    """WaNet's training-controlled mode: warped samples relabelled to the target, and
    ``cross_ratio`` × as many noise-mode samples (perturbed field, labels kept)."""

    stream = "wanet-batches"

    def extra_count(self, batch_size: int, poisoned: int) -> int:
        return int(round(self.attack.cross_ratio * poisoned))

    def edit(self, state, batch, poisoned, extra):
        images = self.trigger_rows(batch, poisoned)
        if len(extra):
            rows = extra.to(images.device)
            noisy = self.attack._warp(to_uint8(images[rows]), noise=self.draw)
            images[rows] = to_float(noisy, images)
        return images
