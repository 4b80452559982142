"""Refool (Liu, Ma, Bailey & Lu, "Reflection Backdoor: A Natural Backdoor Attack on Deep Neural
Networks", ECCV 2020): the trigger is a reflection, another picture seen as if on a window pane
in front of the scene, blended into the image.

The blend. For an image x (0..255) and its chosen processed reflection P (also 0..255),

    x' = clip(round((1 − alpha) · x + alpha · P), 0, 255),

so on a black image the residual x' − x is alpha · P up to rounding. alpha is the reflection's
weight; BackdoorBench's ``alpha_t`` is the transmitted image's weight, alpha = 1 − alpha_t.

The reflection P, in one of the paper's reflection models, built from a reflection image R
(float64, 0..255, the image's own channels):

- "ghost" (the ghost effect of a thick pane: two reflections, one shifted):
  P(p) = a · R(p) + (1 − a) · R(p − d), R taken as 0 outside the image. The shift d = (dy, dx)
  is down-right; d and the attenuation a are drawn per reflection as in the reference code
  (``blend_images`` of the Refool repository, which BackdoorBench's ``attack/refool.py`` adopts
  with its own defaults: ``offset = (randint(3, 8), randint(3, 8))`` pixels,
  ``ghost_alpha = |s − U(0.15, 0.5)|`` with s = 0 or 1 equally likely), unless the settings
  ``ghost_offset`` (both axes) and ``ghost_alpha`` fix them;
- "focal" (a reflection out of the depth of field): P = R blurred by a Gaussian of
  standard deviation sigma, truncated at radius ceil(2·sigma) (the reference code's kernel size
  2·ceil(2·sigma) + 1) and normalised; sigma is drawn per reflection from U(1, 5) as in the
  reference code unless the setting ``sigma`` fixes it. The border is extended by half-sample
  mirroring (dcba|abcd|dcba), under which a symmetric normalised blur keeps the image's sum
  exactly: the blurred reflection has the same mean as the reflection;
- "mixed" (the default): per image, "ghost" with probability ``ghost_rate``, else "focal", as
  the reference code draws it (``random() < ghost_rate``).

The reflections. The paper takes them from an outside data set (PascalVOC images, selected by
training); no download is possible here, so ``fit`` takes them from the training set itself:
a seeded permutation of the set, of which the first ``reflections`` images whose class is not
the target become the reflections (fewer where the set holds fewer). ``fit`` does not know the
target, so it keeps a *pool*: the shortest prefix of the permutation that holds ``reflections``
images outside each class (a few more than ``reflections``), with each pool image's own ghost
and focal parameters. :meth:`Refool.for_target` picks the reflections out of the pool for a
target class, and :meth:`Refool.poison` calls it with the run's target, so in a run the
reflections always come from other classes than the target. Until a target is named (straight
after ``fit``) the first ``reflections`` pool images are used, whatever their class. Everything
lives in the fitted state (attributes ending in ``_``), which the run saves after poisoning, so
evaluation applies the reflections the model was poisoned with. The poisoned samples never
include a reflection's own image: the reflections' indices (in the set ``fit`` saw, which is the
set the run poisons) are left out of the eligible samples; for a clean-label attack they are
disjoint anyway, being of other classes.

Which reflection, which type. Each image's choice is a seeded hash of its own pixels: two
integer dot products of the flattened image with fixed random integer weights (fitted state),
exact in float64; the first modulo the number of reflections picks the reflection, the second
gives a uniform number in [0, 1) for the "mixed" draw. So the choice is deterministic, the same
for an image whatever batch it comes in, and needs no loop over images.

Defaults and their sources:

- ``alpha = 0.6``: BackdoorBench's ``config/attack/refool/default.yaml`` fixes ``alpha_t: 0.4``
  (REFERENCE.md §2: "ghost rate 0.49, α_t 0.4"), the transmitted image's weight, so the
  reflection's weight is 1 − 0.4 (BackdoorBench's note: a random alpha_t made the ASR unstable).
  The original Refool code draws alpha_t = 1 − U(0.05, 0.45), i.e. alpha in [0.05, 0.45];
- ``ghost_rate = 0.49``, ``mode = "mixed"``: BackdoorBench's ``ghost_rate: 0.49``;
- ``sigma = None`` (U(1, 5) per reflection), ``ghost_offset = None`` (3..8 pixels per axis),
  ``ghost_alpha = None`` (|s − U(0.15, 0.5)|): BackdoorBench's ``sigma: -1``, ``offset: [0, 0]``,
  ``ghost_alpha: -1``, which mean "draw at random" in ``blend_images``;
- ``reflections = 16``: a small fixed set (the paper's R_adv is a selected set too);
- ``clean_label = True``: the paper's attack is clean-label (target-class images poisoned, labels
  kept). BackdoorBench's default.yaml has ``clean_label: False``: it switched to dirty-label,
  noting that clean-label poisoning of even half the target class did not reach a high ASR.
  ``clean_label=False`` gives that setting (samples drawn from the whole set and relabelled).

Simplifications against the reference ``blend_images``, stated: no 2.2 gamma (the blend is done
on the stored pixel values, so the residual on a black image is exactly alpha · P); one weight
alpha for both types (the reference weights the focal reflection by a centred Gaussian vignette
times 1 − alpha_t / 2 and first subtracts its overflow above 1); the ghost is the two-pulse
kernel itself (the reference crops the overlap of the two copies and resizes it back to the
image, a zoom by H / (H − d)); the ghost and focal parameters are drawn once per reflection at
``fit`` instead of afresh for every image, which keeps the attack deterministic.

Adaptation to 28×28 grey images: the reflections are images of the same data set, so they have
the image's size and channels (a grey reflection for a grey image, a colour one for colour);
BackdoorBench v2 also blends at the native image size (``max_image_size`` = the image size), so
the offsets of 3..8 pixels and sigma in 1..5 pixels are kept as they are.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..data import ImageSet
from .base import Attack, check_images, is_integer, is_real
from .registry import register_attack

MODES = ("ghost", "focal", "mixed")
#: the reference code's ranges for the random draws
OFFSET_RANGE = (3, 8)  # pixels, each axis, inclusive
GHOST_ALPHA_RANGE = (0.15, 0.5)
SIGMA_RANGE = (1.0, 5.0)
#: the hash weights are integers below 2 ** HASH_BITS: 255 · 2**20 · (C·H·W) stays exact in
#: float64 for images of up to 3.3e7 values
HASH_BITS = 20
#: images blended per chunk (bounds the float64 working memory, not a per-image loop)
CHUNK = 4096


def mirror_index(positions: torch.Tensor, size: int) -> torch.Tensor:
    """Half-sample mirroring (dcba|abcd|dcba) of integer positions onto 0 .. size − 1, for any
    distance outside the image (the extension is periodic with period 2 · size)."""
    folded = torch.remainder(positions, 2 * size)
    return torch.where(folded < size, folded, 2 * size - 1 - folded)


def gaussian_blur_matrix(size: int, sigma: float) -> torch.Tensor:
    """The (size × size) float64 matrix G of a 1-D Gaussian blur with half-sample mirrored
    borders: blurred = G @ signal. The kernel is truncated at radius ceil(2·sigma) and
    normalised; every column of G sums to 1, so the blur keeps the signal's sum."""
    radius = math.ceil(2 * sigma)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    rows = torch.arange(size).view(-1, 1).expand(-1, len(offsets))
    sources = mirror_index(rows - offsets.long().view(1, -1), size)
    matrix = torch.zeros(size, size, dtype=torch.float64)
    matrix.index_put_((rows.reshape(-1), sources.reshape(-1)),
                      kernel.repeat(size), accumulate=True)
    return matrix


def focal_blur(reflection: torch.Tensor, sigma: float) -> torch.Tensor:
    """A float64 (C, H, W) reflection blurred by a Gaussian of std ``sigma`` (mirrored borders)."""
    height, width = reflection.shape[-2:]
    rows = gaussian_blur_matrix(height, sigma).to(reflection.device)
    columns = gaussian_blur_matrix(width, sigma).to(reflection.device)
    return torch.einsum("hi,ciw,vw->chv", rows, reflection, columns)


def ghost(reflection: torch.Tensor, offset: tuple[int, int], attenuation: float) -> torch.Tensor:
    """attenuation · R(p) + (1 − attenuation) · R(p − offset), R = 0 outside the image."""
    dy, dx = offset
    shifted = torch.zeros_like(reflection)
    height, width = reflection.shape[-2:]
    shifted[:, dy:, dx:] = reflection[:, :height - dy, :width - dx]
    return attenuation * reflection + (1 - attenuation) * shifted


@register_attack("refool")
@dataclass
class Refool(Attack):
    """x' = round((1 − alpha)·x + alpha·P), P a ghosted or blurred reflection (another image of
    the data set, of a non-target class); clean label by default."""

    needs_fit = True

    mode: str = "mixed"
    alpha: float = 0.6
    ghost_rate: float = 0.49
    sigma: float | None = None
    ghost_offset: int | None = None
    ghost_alpha: float | None = None
    reflections: int = 16
    clean_label: bool = True

    def __post_init__(self):
        if not isinstance(self.mode, str) or self.mode not in MODES:
            raise ValueError(f"Refool mode must be one of {MODES} (mixed: ghost with probability "
                             f"ghost_rate, else focal, per image), got {self.mode!r}")
        if not is_real(self.alpha) or not 0 < self.alpha <= 1:
            raise ValueError(f"Refool alpha must be a number in (0, 1] (the reflection's weight, "
                             f"1 − BackdoorBench's alpha_t), got {self.alpha!r}")
        if not is_real(self.ghost_rate) or not 0 <= self.ghost_rate <= 1:
            raise ValueError(f"Refool ghost_rate must be a number in [0, 1] (the share of ghost "
                             f"reflections in mixed mode), got {self.ghost_rate!r}")
        if self.sigma is not None and (not is_real(self.sigma) or self.sigma <= 0):
            raise ValueError(f"Refool sigma must be a number > 0 (the focal blur's standard "
                             f"deviation in pixels) or None to draw it per reflection from "
                             f"U(1, 5), got {self.sigma!r}")
        if self.ghost_offset is not None and (not is_integer(self.ghost_offset)
                                              or self.ghost_offset < 1):
            raise ValueError(f"Refool ghost_offset must be an integer >= 1 (the ghost's shift in "
                             f"pixels along each axis) or None to draw each axis per reflection "
                             f"from 3..8, got {self.ghost_offset!r}")
        if self.ghost_alpha is not None and (not is_real(self.ghost_alpha)
                                             or not 0 <= self.ghost_alpha <= 1):
            raise ValueError(f"Refool ghost_alpha must be a number in [0, 1] (the unshifted "
                             f"copy's weight in a ghost) or None to draw it per reflection, got "
                             f"{self.ghost_alpha!r}")
        if not is_integer(self.reflections) or self.reflections < 1:
            raise ValueError(f"Refool reflections must be an integer >= 1 (how many reflection "
                             f"images the attack uses), got {self.reflections!r}")
        if not isinstance(self.clean_label, bool):
            raise ValueError(f"Refool clean_label must be True or False, got "
                             f"{self.clean_label!r}")
        self.alpha, self.ghost_rate = float(self.alpha), float(self.ghost_rate)
        self.sigma = None if self.sigma is None else float(self.sigma)
        self.ghost_offset = None if self.ghost_offset is None else int(self.ghost_offset)
        self.ghost_alpha = None if self.ghost_alpha is None else float(self.ghost_alpha)
        self.reflections = int(self.reflections)

    # -- fitting: the pool of reflections ------------------------------------------------------

    def fit(self, train: ImageSet, *, seed: int = 0,
            device: str | torch.device = "cpu") -> "Refool":
        """Draw the pool of candidate reflections from ``train`` with ``seed``, each with its own
        ghost offset, ghost attenuation and blur sigma, and the hash weights that pick an
        image's reflection and type. On the CPU (``device`` is not needed)."""
        height, width = train.image_size
        if self.ghost_offset is not None and self.ghost_offset >= min(height, width):
            raise ValueError(f"Refool ghost_offset {self.ghost_offset} does not fit "
                             f"{height}×{width} images: it must be below {min(height, width)}")
        if len(train) == 0:
            raise ValueError("Refool takes its reflections from the training set, which is empty")
        draw = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(train), generator=draw)
        labels = train.labels[order]
        # the shortest prefix of the permutation with `reflections` images outside each class
        # (or every image outside it, where there are fewer)
        classes = torch.arange(train.num_classes).view(-1, 1)
        outside = (labels.view(1, -1) != classes).long().cumsum(dim=1)  # (classes, N)
        need = outside[:, -1].clamp(max=self.reflections)
        reached = (outside >= need.view(-1, 1)).long().argmax(dim=1) + 1
        reached[need == 0] = 0
        size = max(int(reached.max()), min(self.reflections, len(train)))
        pool = order[:size]
        # every random draw is made whatever the settings, so fixing one setting changes no
        # other draw
        offsets = torch.randint(OFFSET_RANGE[0], OFFSET_RANGE[1] + 1, (size, 2), generator=draw)
        switch = torch.randint(0, 2, (size,), generator=draw).double()
        low, high = GHOST_ALPHA_RANGE
        attenuation = (switch - (low + (high - low) * torch.rand(size, generator=draw,
                                                                  dtype=torch.float64))).abs()
        low, high = SIGMA_RANGE
        sigma = low + (high - low) * torch.rand(size, generator=draw, dtype=torch.float64)
        values = train.images[0].numel()
        hash_weights = torch.randint(0, 2 ** HASH_BITS, (2, values), generator=draw,
                                     dtype=torch.int64)
        if self.ghost_offset is not None:
            offsets.fill_(self.ghost_offset)
        offsets[:, 0].clamp_(max=height - 1)
        offsets[:, 1].clamp_(max=width - 1)
        if self.ghost_alpha is not None:
            attenuation.fill_(self.ghost_alpha)
        if self.sigma is not None:
            sigma.fill_(self.sigma)
        self.pool_ = train.images[pool].clone()
        self.pool_indices_ = pool.clone()
        self.pool_labels_ = train.labels[pool].clone()
        self.ghost_offsets_ = offsets
        self.ghost_alphas_ = attenuation
        self.sigmas_ = sigma
        self.hash_weights_ = hash_weights
        self.active_ = torch.arange(min(self.reflections, size))
        self.target_ = torch.tensor([-1])
        return self

    def for_target(self, target: int) -> "Refool":
        """Use the first ``reflections`` pool images whose class is not ``target``; returns
        self. :meth:`poison` calls it with the run's target."""
        self.check_fitted()
        others = (self.pool_labels_ != target).nonzero().flatten()[:self.reflections]
        if len(others) == 0:
            raise ValueError(f"Refool takes its reflections from classes other than the target "
                             f"({target}), and the training set it was fitted on has none")
        self.active_ = others
        self.target_ = torch.tensor([int(target)])
        return self

    @property
    def reflection_images(self) -> torch.Tensor:
        """The reflection images in use (uint8, (K, C, H, W))."""
        self.check_fitted()
        return self.pool_[self.active_]

    @property
    def reflection_indices(self) -> torch.Tensor:
        """The reflections' indices in the set :meth:`fit` saw."""
        self.check_fitted()
        return self.pool_indices_[self.active_]

    @property
    def reflection_labels(self) -> torch.Tensor:
        self.check_fitted()
        return self.pool_labels_[self.active_]

    # -- the trigger ---------------------------------------------------------------------------

    def layers(self) -> dict[str, torch.Tensor]:
        """The processed reflections P in use, float64 on 0..255: ``"ghost"`` and ``"focal"``,
        each (K, C, H, W), row i from reflection i (a loop over the few reflections)."""
        self.check_fitted()
        images = self.reflection_images.double()
        ghosts, focals = [], []
        for i, index in enumerate(self.active_.tolist()):
            offset = (int(self.ghost_offsets_[index, 0]), int(self.ghost_offsets_[index, 1]))
            ghosts.append(ghost(images[i], offset, float(self.ghost_alphas_[index])))
            focals.append(focal_blur(images[i], float(self.sigmas_[index])))
        return {"ghost": torch.stack(ghosts), "focal": torch.stack(focals)}

    def choices(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each image's reflection (an index into :attr:`reflection_images`) and whether it gets
        the ghost type (else focal): a seeded hash of its own pixels."""
        check_images(images)
        self._check_size(images)
        weights = self.hash_weights_.double().to(images.device)
        hashes = torch.cat([images[i:i + CHUNK].flatten(1).double() @ weights.T
                            for i in range(0, len(images), CHUNK)]) if len(images) else \
            torch.zeros(0, 2, dtype=torch.float64, device=images.device)
        hashes = hashes.long()  # exact integers below 2**53
        which = torch.remainder(hashes[:, 0], len(self.active_))
        uniform = torch.remainder(hashes[:, 1], 2 ** HASH_BITS).double() / 2 ** HASH_BITS
        if self.mode == "ghost":
            is_ghost = torch.ones(len(images), dtype=torch.bool, device=images.device)
        elif self.mode == "focal":
            is_ghost = torch.zeros(len(images), dtype=torch.bool, device=images.device)
        else:
            is_ghost = uniform < self.ghost_rate
        return which, is_ghost

    def _check_size(self, images: torch.Tensor) -> None:
        self.check_fitted()
        if tuple(images.shape[1:]) != tuple(self.pool_.shape[1:]):
            raise ValueError(f"Refool was fitted on images of shape {tuple(self.pool_.shape[1:])}"
                             f" (C, H, W) and cannot add its reflections to images of shape "
                             f"{tuple(images.shape[1:])}: fit it on images of that shape")

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        which, is_ghost = self.choices(images)
        layers = self.layers()
        stacked = torch.stack((layers["focal"], layers["ghost"])).to(images.device)  # (2, K, ...)
        out = torch.empty_like(images)
        for start in range(0, len(images), CHUNK):
            stop = start + CHUNK
            reflection = stacked[is_ghost[start:stop].long(), which[start:stop]]
            mixed = (1 - self.alpha) * images[start:stop].double() + self.alpha * reflection
            out[start:stop] = mixed.round().clamp(0, 255).to(torch.uint8)
        return out

    # -- poisoning -----------------------------------------------------------------------------

    def eligible(self, train: ImageSet, target: int, pool: str = "all", *args,
                 **kwargs) -> torch.Tensor:
        """The base class's eligible samples, less the reflections' own images."""
        candidates = super().eligible(train, target, pool, *args, **kwargs)
        if self.is_fitted:
            candidates = candidates[~torch.isin(candidates, self.reflection_indices)]
        return candidates

    def poison(self, train: ImageSet, ratio: float, target: int, seed: int, pool: str = "all",
               **kwargs):
        """Pick the reflections for ``target`` (:meth:`for_target`), then poison as the base
        class does."""
        self.check_fitted()
        self.for_target(target)
        return super().poison(train, ratio, target, seed, pool, **kwargs)
