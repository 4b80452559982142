"""LF, the low-frequency attack (Zeng, Park, Mao & Jia, "Rethinking the Backdoor Attacks'
Triggers: A Frequency Perspective", ICCV 2021; BackdoorBench's ``lf``): the trigger is a smooth
targeted universal adversarial perturbation of a clean helper model, added to the image. Dirty
label: poisoned samples are relabelled to the target.

Fitting (:meth:`LF.fit`). A clean helper model is trained inside the project
(:func:`eigenguard.attacks.helpers.train_clean_helper`: ``helper_model`` of ``helper_width``,
``helper_epochs`` epochs on at most ``helper_train_size`` training images drawn with the seed).
Then, from v = 0, for ``steps`` iterations, on a batch of ``batch_size`` training images whose
label is not the target (drawn without replacement within a step, from the seed's "lf-batches"
stream; all images if the set has no other class):

1. g = ∇_v of the mean cross-entropy of helper(clip(x + v, 0, 255)) towards the target class;
2. step: v ← v − step_size · LP(g) / max|LP(g)|  (a normalised descent step, step_size on the
   0..255 scale);
3. low-pass filter: v ← LP(v);
4. L∞ bound: v ← v · min(1, eps / max|v|).

LP is an ideal low-pass filter in the 2-D discrete Fourier domain: every frequency (f_y, f_x),
in cycles per image (integers, |f| at most half the size), with f_y² + f_x² > cutoff² is set to
zero, per channel. It is a linear orthogonal projection (LP(LP(v)) = LP(v)), so step 3 keeps v
exactly in the low-frequency subspace, and step 4 projects onto the L∞ ball by scaling rather
than clipping, which keeps the spectrum's shape: the fitted pattern has no energy above the
cut-off (up to floating-point error). Zeng et al. smooth with a Gaussian after each step and
rescale the pattern's range instead of clipping it (their code normalises it to [0, 0.2]); an
ideal filter is used here because it makes "low frequency" a checkable property of the pattern
(zero energy above ``cutoff``) rather than a decay. The paper searches the perturbation with
DeepFool-based UAP updates, one image at a time; here it is normalised gradient descent on the
targeted loss over batches, with the same filter-after-each-step structure.

Measured (defaults, seed 0, target 0, a helper trained on a 5,000-image subset of
Fashion-MNIST): the helper classifies 17.7% of the non-target training images as the target once
triggered (``fooling_rate_``; Zeng et al. tune their trigger to lure about 20%). The pattern is a
smooth frame, brighter at the border and darker in the middle, of L-inf 51.

The trigger: x' = clip(round(x + v), 0, 255). Rounding moves a value by at most 0.5 and
clipping only shortens a change, so |x' − x| ≤ eps + 0.5 everywhere.

Defaults and where they come from:

- eps = 51 (on 0..255): 0.2 of the pixel range, REFERENCE.md §2's "≤ 0.2 amplitude" for
  BackdoorBench's LF; Zeng et al.'s code rescales its smooth trigger into [0, 0.2] (on 0..1).
  Their pattern is one-signed with range 0.2; ours is bounded by 0.2 in L∞ on both sides.
- cutoff = 3 cycles per image: Zeng et al.'s Gaussian (std 6 pixels on 32×32 CIFAR images,
  applied twice per step) passes half the amplitude at 1 cycle per image and 0.2% at 3, so
  their trigger lives in the lowest 2–3 cycles per image; measured in cycles per image, the
  cut-off means the same smoothness at 28×28 as at 32×32 (the adaptation to Fashion-MNIST is
  only that).
- steps = 300 ("a few hundred"), batch_size = 32, step_size = 4 (eps is reached in about a
  dozen steps; the rest refines the direction): 9,600 image gradients, where Zeng et al. make a
  few DeepFool passes over 100 images.
- the helper: small_cnn of width 16, 4 epochs on at most 30,000 images (936 SGD steps). A fit
  on the full Fashion-MNIST training split takes about 70 s on the 2-core development machine
  (estimated from a subset: 0.5 ms per image and epoch on one thread with a training job
  running beside it, so about 65 s for the helper's 120,000 image-epochs, plus about 4 s for
  the 300 steps at 15 ms each). These settings are part of the run's config, so the helper that
  made the trigger is recorded.

The target. :meth:`fit` is not told the run's target, so the ``target`` setting says which class
the perturbation aims at: None (default) means the run's target. Then :meth:`fit` aims at class
0 (BackdoorBench's default target), and :meth:`poison`, which is given the target, recomputes the
perturbation for it with the same helper when it differs (the fitted state then holds that
pattern and ``target_``). An integer fixes the class whatever the run's target. A restored
attack (:meth:`load_fitted_state`) has no helper, so it cannot be re-aimed: poisoning it for
another target than ``target_`` is an error. In all-to-all mode the pattern aims at the run's
nominal target; it is then simply a fixed smooth trigger.

The iteration runs with one CPU thread (:func:`eigenguard.attacks.helpers.single_thread`: as
fast on small batches, much faster on a busy machine, and independent of the thread count).

In-process caches (:mod:`eigenguard.attacks.helpers`): the helper is shared with every attack
fitted with the same seed and helper settings on the same data, and the perturbation is cached
under the helper's key, the target and every setting, so fitting the same LF twice in one
process computes it once.

Fitted state: ``pattern_`` (float64, (C, H, W), the perturbation v on the 0..255 scale),
``target_`` (the class it aims at) and ``fooling_rate_`` (a diagnostic: the fraction of up to
1,024 non-target training images that the helper classifies as the target once triggered).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data import ImageSet
from ..seeding import generator
from .aimed import TargetedFit
from .base import check_images, is_real
from .helpers import cached_fit, check_helper_settings, helper_input, single_thread
from .registry import register_attack

#: images used to measure the fooling rate on the helper
FOOLING_SAMPLE = 1024
#: images triggered per chunk in apply (bounds the float64 working memory)
CHUNK = 4096


def frequency_radius(height: int, width: int, device=None) -> torch.Tensor:
    """(H, W) float64: the radius sqrt(f_y² + f_x²) of each DFT coefficient of an H × W image,
    in cycles per image (torch.fft.fft2's layout)."""
    fy = torch.fft.fftfreq(height, d=1 / height, dtype=torch.float64, device=device)
    fx = torch.fft.fftfreq(width, d=1 / width, dtype=torch.float64, device=device)
    return torch.sqrt(fy.view(-1, 1) ** 2 + fx.view(1, -1) ** 2)


def low_pass(x: torch.Tensor, cutoff: float) -> torch.Tensor:
    """The ideal low-pass filter: keep the DFT coefficients of each (..., H, W) plane whose
    frequency radius (cycles per image) is at most ``cutoff``, zero the rest; same dtype.

    The kept set is symmetric under f -> -f, so the result is real."""
    height, width = x.shape[-2:]
    keep = frequency_radius(height, width, x.device) <= cutoff + 1e-9
    spectrum = torch.fft.fft2(x.double())
    return torch.fft.ifft2(spectrum * keep).real.to(x.dtype)


def high_frequency_energy(x: torch.Tensor, cutoff: float) -> float:
    """The fraction of the energy of (..., H, W) planes above the frequency radius ``cutoff``."""
    height, width = x.shape[-2:]
    power = torch.fft.fft2(x.double()).abs() ** 2
    above = frequency_radius(height, width, x.device) > cutoff + 1e-9
    total = float(power.sum())
    return float((power * above).sum()) / total if total > 0 else 0.0


def add_pattern(images: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """clip(round(x + pattern), 0, 255) for a uint8 batch, in float64; a new uint8 tensor."""
    pattern = pattern.to(images.device, torch.float64)
    out = torch.empty_like(images)
    for start in range(0, len(images), CHUNK):
        stop = start + CHUNK
        out[start:stop] = (images[start:stop].double() + pattern).round().clamp(0, 255).to(
            torch.uint8)
    return out


@register_attack("lf")
@dataclass
class LF(TargetedFit):
    """x' = clip(round(x + v), 0, 255), v a low-pass targeted universal perturbation of a clean
    helper model with |v| ≤ eps; dirty label."""

    eps: float = 51.0
    cutoff: float = 3.0
    steps: int = 300
    step_size: float = 4.0
    batch_size: int = 32
    target: int | None = None
    helper_model: str = "small_cnn"
    helper_width: int = 16
    helper_epochs: int = 4
    helper_train_size: int = 30000

    def __post_init__(self):
        if not is_real(self.eps) or not 0 < self.eps <= 255:
            raise ValueError(f"LF eps must be a number in (0, 255] (the L-inf bound of the "
                             f"perturbation on the 0..255 scale), got {self.eps!r}")
        if not is_real(self.cutoff) or self.cutoff < 0:
            raise ValueError(f"LF cutoff must be a number >= 0 (the low-pass radius in cycles "
                             f"per image; 0 keeps only the mean), got {self.cutoff!r}")
        self._check_gradient_steps("the largest change of one step on the 0..255 scale")
        self._init_target("the class the perturbation aims at")
        check_helper_settings("LF", self.helper_model, self.helper_width, self.helper_epochs,
                              self.helper_train_size)
        self.eps, self.cutoff = float(self.eps), float(self.cutoff)
        self.helper_width, self.helper_epochs = int(self.helper_width), int(self.helper_epochs)
        self.helper_train_size = int(self.helper_train_size)

    # -- fitting -------------------------------------------------------------------------------

    def _check_fit_data(self, train: ImageSet) -> None:
        if len(train) == 0:
            raise ValueError("LF learns its perturbation from the training set, which is empty")

    def _aim(self, target: int) -> None:
        """Compute the perturbation towards ``target`` with the fit's helper (cached
        in-process)."""
        train, seed, device, helper = self._fit_context

        def compute():
            pattern = self.universal_perturbation(helper, train, target, seed, device).cpu()
            pool = self._pool(train, target)[:FOOLING_SAMPLE]
            with torch.no_grad():
                triggered = add_pattern(train.images[pool], pattern).to(device)
                predicted = helper(helper_input(triggered, train)).argmax(1).cpu()
            return {"pattern_": pattern,
                    "fooling_rate_": (predicted == target).double().mean().view(1)}

        key = ("lf", helper.cache_key, seed, target, self.eps, self.cutoff, self.steps,
               self.step_size, self.batch_size)
        with single_thread():
            state = cached_fit(key, compute)
        self.pattern_ = state["pattern_"]
        self.target_ = torch.tensor([int(target)])
        self.fooling_rate_ = state["fooling_rate_"]

    @staticmethod
    def _pool(train: ImageSet, target: int) -> torch.Tensor:
        others = (train.labels != target).nonzero().flatten()
        return others if len(others) else torch.arange(len(train))

    def universal_perturbation(self, helper, train: ImageSet, target: int, seed: int,
                               device: str | torch.device = "cpu") -> torch.Tensor:
        """The low-pass targeted universal perturbation (C, H, W), float64 on 0..255 (see the
        module docstring for the iteration)."""
        pool = self._pool(train, target)
        draw = generator(seed, "lf-batches")
        batch = min(self.batch_size, len(pool))
        v = torch.zeros(train.images.shape[1:], dtype=torch.float32, device=device)
        labels = torch.full((batch,), target, dtype=torch.int64, device=device)
        for _ in range(self.steps):
            chosen = pool[torch.randperm(len(pool), generator=draw)[:batch]]
            x = train.images[chosen].to(device).float()
            v.requires_grad_(True)
            logits = helper(helper_input((x + v).clamp(0, 255), train))
            loss = F.cross_entropy(logits, labels)
            (grad,) = torch.autograd.grad(loss, v)
            v = v.detach()
            grad = low_pass(grad, self.cutoff)
            scale = grad.abs().max()
            if scale > 0:
                v = v - self.step_size * grad / scale
            v = low_pass(v, self.cutoff)
            v = v * min(1.0, self.eps / max(float(v.abs().max()), 1e-12))
        # once more in float64, so the stored pattern is low-pass and within eps to float64
        # precision
        pattern = low_pass(v.double(), self.cutoff)
        largest = float(pattern.abs().max())
        if largest > self.eps:
            pattern = pattern * (self.eps / largest)
        return pattern

    # -- the trigger ---------------------------------------------------------------------------

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        self.check_fitted()
        if tuple(images.shape[1:]) != tuple(self.pattern_.shape):
            raise ValueError(f"LF was fitted on images of shape {tuple(self.pattern_.shape)} "
                             f"(C, H, W) and cannot add its perturbation to images of shape "
                             f"{tuple(images.shape[1:])}: fit it on images of that shape")
        return add_pattern(images, self.pattern_)
