"""Adaptive attacks against EigenGuard: the attacker knows the defense (the layer, where it goes
and its settings) but not the victim's weights, so it trains a helper model WITH the layer and
uses it. Both are dirty label: poisoned samples are relabelled to the target.

The guarded helper (:func:`train_guarded_helper`). ``helper_model`` of ``helper_width`` with an
EigenGuard layer inserted by :func:`eigenguard.guard` after ``guard_after`` (small_cnn's first
block by default), layer settings ``guard_k``, ``guard_tail_scale``, ``guard_scale`` (the others
at the layer's defaults; evaluation in its default ``"running"`` mode, each image filtered alone
with the subspace estimated in training, which is what a deployed model applies). It trains on
at most ``helper_train_size`` clean training images for ``helper_epochs`` epochs with the project's
loop, exactly as the clean helper of :mod:`eigenguard.attacks.helpers` does (same seed streams for
the subset, the initial weights and the epoch order; one CPU thread), and is cached in-process
with :func:`~eigenguard.attacks.helpers.cached_fit` (so :func:`clear_helper_cache` empties it
too). Both attacks fitted with the same seed and helper settings share one helper.

(b) ``adaptive-pgd`` (:class:`AdaptivePGD`), the source's second adaptive attack (REFERENCE.md §1,
"PGD-10 adversarial noise, from a model trained with EigenGuard, added to the poisoned images to
destroy their natural features, then BadNets on that data"). Each poisoned training image x of
true label y gets untargeted L∞ PGD against the guarded helper (running mode, so an image's noise
does not depend on which others share its batch): δ from a uniform random start in [−eps, eps]
(the seed's "adaptive-pgd-start" stream of the poison seed), ``steps`` times
δ ← clip(δ + step · sign(∇_δ CE(helper(x + δ), y)), −eps, eps), x + δ kept in 0..255;
then x' = round(x + δ) and the BadNets patch on top
(:class:`~eigenguard.attacks.badnets.BadNets`, ``patch``/``value``). Outside the patch
|x' − x| ≤ eps + 0.5. Test images (:meth:`apply`) get the patch only: the noise is a
training-time device that makes the model rely on the trigger for those samples, not part of
the trigger. Defaults: steps = 10 (PGD-10); step_size = None, the step then being eps / 4
(2/255 at 8/255, the usual PGD step); eps = 25.5, 0.1 of the pixel range, the customary L∞
budget on Fashion-MNIST, rather than CIFAR's 8/255: the guarded helper resists small
perturbations (its filter multiplies every direction outside the top k by 0.001; see the
universal patterns' fooling rates with and without the layer, below), and at 8/255
PGD-10 left it 62% accuracy on the poisoned images (77% without noise), which does not destroy
their natural features; at 25.5 it leaves 24%.

(c) ``adaptive-whitebox`` (:class:`AdaptiveWhitebox`), ours: a full-image additive pattern v,
|v| ≤ eps in L∞, optimised by gradient through the guarded helper in running mode to send
triggered images to the target class after the filter; then dirty-label poisoning with
x' = clip(round(x + v), 0, 255) (LF's :func:`~eigenguard.attacks.lf.add_pattern`), the same
pattern on training and test images. From v = 0, ``steps`` sign-gradient steps on the mean
targeted cross-entropy over ``batch_size`` non-target training images (drawn from the seed's
"adaptive-whitebox-batches" stream), step size ``step_size`` · (1 + cos(π t / steps)) / 2
(a cosine decay, so the last steps refine instead of oscillating by ±step_size), then a
projection onto [−eps, eps].

Why a full-image pattern rather than a patch: the running filter keeps the top-k directions of
the training features' second moment (scaled to one common value) and multiplies every other
direction by tail_scale = 0.001. In a model trained on natural images those directions spread
over the whole image, so a trigger survives only through its component inside them; a small
patch reaches the part of those directions that falls in a few pixels, a full-image pattern can
put all its energy there. The L∞ bound keeps the energy comparable to the other triggers:
eps = 24 is HighRank's RMS budget (close to BadNets', Blended's and SIG's residual RMS, 23.5 to
27 on Fashion-MNIST).

Why the helper learns from the clean set: what the attacker knows is the defense's architecture
and settings, not the victim's weights or its exact training data. The victim's running subspace
is estimated on its own training set, at least 90% clean at the usual poison ratios, so the clean
helper's subspace is the attacker's best estimate of it. Training a first helper on data poisoned
with a provisional trigger would double the fit's cost and aim at a subspace that depends on
that provisional trigger, which the final trigger replaces.

The target. As for LF, :meth:`fit` is not told the run's target: ``target`` = None aims at class
0 in :meth:`fit`, and :meth:`AdaptiveWhitebox.poison` re-optimises for the run's target with the
same helper when it differs; an integer fixes the class. A restored AdaptiveWhitebox has no
helper, so it poisons for its own ``target_`` only (another target is an error). A restored
AdaptivePGD poisons as the fitted one: its fitted state holds the helper's weights (the PGD
noise is computed at poisoning time).

Measured on Fashion-MNIST (the 51,000 training images of the default split, fit seed 0, poison
seed 1, target 0, defaults unless said; on the 2-core development machine with a training job
and other measurements running beside it, so the times are slower than on an idle machine: the
clean helper of LF and TrojanNN, about 65 s by their docstrings, took 253 s here):

- the guarded helper (small_cnn width 16, k = 16 after block1, 4 epochs on 30,000 images):
  189 s to train; test accuracy 77.5% in running mode (75.7% per batch of 128).
- adaptive-pgd: fit = the helper, 189 s; poisoning 10% (5,100 images, PGD-10) 71 s more. On
  1,000 of the poisoned images the helper's accuracy fell from 76.6% to 61.6% at eps 8, 42.3%
  at 16 and 24.4% at 25.5 (the default); at 16 on all 5,100, from 78.1% to 42.0% (RMS change
  outside the patch 14.1).
- adaptive-whitebox: fit = the helper plus 10 s of optimisation (300 steps of 32 images);
  re-aiming for another target in poison, 9 s. Fooling rates on 1,024 non-target training
  images (clean / triggered in running mode / triggered per batch of 128, all triggered):
  target 0, 2.6% / 5.7% / 5.9%; target 3, 3.3% / 15.4% / 3.3%. Five random ±24 sign patterns:
  1.1–1.5% in running mode (4.8–6.6% per batch: a batch of images that share any pattern
  shifts the per-batch filter). Target 0 with batches of 64, running / per batch: eps 16,
  4.1% / 4.9%; eps 24, 6.3% / 6.4%; eps 32, 9.6% / 8.4%; eps 64, 52.9% / 14.4%. At eps 24,
  Adam instead of sign steps, 1,000 steps or batches of 256 all reached 6.3–6.5%: the bound,
  not the optimiser, limits it. The same optimisation (batches of 64) on the clean helper (no
  layer) sends 82.5% to class 0 at eps 24 (2.7% clean): the layer makes the guarded helper
  hard to steer. A likely reason: the running filter damps every direction outside the top k
  by 0.001 and scales each kept one by c/σ_i, so a pattern moves the features only within the
  directions, and relative to the natural variation, of the training features. RMS of the
  uint8 residual: 19.9 (24 before clipping at black).

Fitted state. AdaptivePGD: ``shape_`` (C, H, W), ``num_classes_``, the helper's state dict under
``helper.<name>``, and once it has poisoned ``pgd_accuracy_`` (float64 [clean, after PGD]: the
helper's running-mode accuracy on the poisoned images before and after the noise, a
diagnostic). AdaptiveWhitebox: ``pattern_`` (float32 (C, H, W) on 0..255), ``target_`` and
``fooling_rate_`` (float64 [clean, running, batch]: the fraction of up to 1,024 non-target
training images the helper classifies as the target without the trigger, with it in running
mode, and with it in per-batch mode, batches of 128 images all triggered).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data import ImageSet
from ..layer import SCALES, check_k, guard, guards_in_mode
from ..models import create_model
from ..seeding import generator, stream_seed
from ..train import TrainConfig, train
from .aimed import TargetedFit
from .badnets import BadNets
from .base import Attack, PoisonedSet, check_images, is_integer, is_real
from .helpers import (cached_fit, check_helper_settings, data_fingerprint, helper_input,
                      helper_subset, single_thread)
from .lf import add_pattern
from .registry import register_attack

#: images per forward pass in PGD and in the diagnostics (bounds the working memory)
CHUNK = 256
#: images used to measure the fooling rate on the helper
FOOLING_SAMPLE = 1024
#: batch size of the per-batch fooling rate (the training loop's batch size)
EVAL_BATCH = 128


# -- the guarded helper ------------------------------------------------------------------------

@dataclass(frozen=True)
class GuardedHelperSpec:
    """A helper model with an EigenGuard layer: the architecture, its training budget and the
    layer's place and settings."""

    model: str = "small_cnn"
    width: int = 16
    epochs: int = 4
    train_size: int = 30000
    after: str = "block1"
    k: int = 16
    tail_scale: float = 1e-3
    scale: str = "kth"

    def build(self, in_channels: int, num_classes: int, seed: int) -> nn.Module:
        """The guarded architecture with the clean helper's seeded initial weights (the global
        RNG is untouched); the layer has no weights, so the draw is the clean helper's."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stream_seed(seed, "helper-init"))
            model = create_model(self.model, in_channels=in_channels, num_classes=num_classes,
                                 width=self.width)
        try:
            guard(model, after=self.after, k=self.k, tail_scale=self.tail_scale,
                  scale=self.scale)
        except ValueError as error:
            raise ValueError(f"guard_after {self.after!r} does not name a module of "
                             f"{self.model}: {error}") from None
        return model


def train_guarded_helper(data: ImageSet, spec: GuardedHelperSpec, *, seed: int,
                         device: str | torch.device = "cpu") -> nn.Module:
    """The helper of ``spec`` trained on at most ``spec.train_size`` images of ``data`` drawn with
    ``seed``, in eval mode (layer in running mode) on ``device``, parameters frozen; cached."""
    if len(data) == 0:
        raise ValueError(f"{data.name}: the guarded helper model needs training images, and "
                         "the set is empty")
    key = ("adaptive-guarded-helper", spec, int(seed), torch.device(device).type,
           data_fingerprint(data))

    def compute():
        model = spec.build(data.in_channels, data.num_classes, seed)
        subset = data.subset(helper_subset(data, spec.train_size, seed))
        train(model, subset, TrainConfig(epochs=spec.epochs, augment=False),
              seed=stream_seed(seed, "helper-train"), device=device, progress=False,
              description="guarded helper")
        return model.state_dict()

    with single_thread():
        state = cached_fit(key, compute)
    model = restore_helper(spec, data.in_channels, data.num_classes, state, device)
    model.cache_key = hashlib.blake2b(repr(key).encode(), digest_size=16).hexdigest()
    return model


def restore_helper(spec: GuardedHelperSpec, in_channels: int, num_classes: int,
                   state: dict[str, torch.Tensor], device: str | torch.device = "cpu") -> nn.Module:
    """A guarded helper with the weights and running statistics of ``state``, ready to use."""
    model = spec.build(in_channels, num_classes, seed=0)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"the saved helper does not match the helper settings ({spec}): "
                         f"{error}") from None
    model.to(device).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, data: ImageSet, mode: str = "running",
            batch: int = CHUNK) -> torch.Tensor:
    """The helper's predicted classes for images on 0..255, its layer in ``mode``, ``batch``
    images per forward pass (the batch matters in "batch" mode only); one CPU thread."""
    device = next(model.parameters()).device
    with guards_in_mode(model, mode), single_thread():
        return torch.cat([model(helper_input(images[start:start + batch].to(device), data))
                          .argmax(1).cpu() for start in range(0, len(images), batch)])


# -- settings shared by both attacks -----------------------------------------------------------

@dataclass
class GuardedHelperAttack(Attack):
    """The helper and layer settings of an attack fitted on a guarded helper."""

    needs_fit = True

    # the defaults are the guarded helper's own, written once in GuardedHelperSpec
    helper_model: str = GuardedHelperSpec.model
    helper_width: int = GuardedHelperSpec.width
    helper_epochs: int = GuardedHelperSpec.epochs
    helper_train_size: int = GuardedHelperSpec.train_size
    guard_after: str = GuardedHelperSpec.after
    guard_k: int = GuardedHelperSpec.k
    guard_tail_scale: float = GuardedHelperSpec.tail_scale
    guard_scale: str = GuardedHelperSpec.scale

    def _check_helper(self, owner: str) -> None:
        check_helper_settings(owner, self.helper_model, self.helper_width, self.helper_epochs,
                              self.helper_train_size)
        if not isinstance(self.guard_after, str) or not self.guard_after:
            raise ValueError(f"{owner} guard_after must be the name of the helper module the "
                             f"EigenGuard layer follows (small_cnn: block1), got "
                             f"{self.guard_after!r}")
        try:
            check_k(self.guard_k)
        except (TypeError, ValueError):
            raise ValueError(f"{owner} guard_k must be an integer >= 1 (the layer's k), got "
                             f"{self.guard_k!r}") from None
        if not is_real(self.guard_tail_scale) or self.guard_tail_scale < 0:
            raise ValueError(f"{owner} guard_tail_scale must be a number >= 0 (the layer's "
                             f"factor on the tail), got {self.guard_tail_scale!r}")
        if self.guard_scale not in SCALES:
            raise ValueError(f"{owner} guard_scale must be one of {SCALES}, got "
                             f"{self.guard_scale!r}")
        self.helper_width, self.helper_epochs = int(self.helper_width), int(self.helper_epochs)
        self.helper_train_size, self.guard_k = int(self.helper_train_size), int(self.guard_k)
        self.guard_tail_scale = float(self.guard_tail_scale)

    @property
    def helper_spec(self) -> GuardedHelperSpec:
        return GuardedHelperSpec(self.helper_model, self.helper_width, self.helper_epochs,
                                 self.helper_train_size, self.guard_after, self.guard_k,
                                 self.guard_tail_scale, self.guard_scale)

    def helper(self, train: ImageSet, seed: int, device: str | torch.device = "cpu") -> nn.Module:
        """The guarded helper this attack is fitted with (cached in-process)."""
        return train_guarded_helper(train, self.helper_spec, seed=seed, device=device)


def _check_eps(owner: str, eps) -> float:
    if not is_real(eps) or not 0 < eps <= 255:
        raise ValueError(f"{owner} eps must be a number in (0, 255] (the L-inf bound on the "
                         f"0..255 scale), got {eps!r}")
    return float(eps)


def _check_steps(owner: str, steps) -> int:
    if not is_integer(steps) or steps < 1:
        raise ValueError(f"{owner} steps must be an integer >= 1 (gradient steps), got {steps!r}")
    return int(steps)


def _check_shape(owner: str, fitted: tuple, images: torch.Tensor, what: str) -> None:
    if tuple(images.shape[1:]) != tuple(fitted):
        raise ValueError(f"{owner} was fitted on images of shape {tuple(fitted)} (C, H, W) and "
                         f"cannot {what} images of shape {tuple(images.shape[1:])}: fit it on "
                         f"images of that shape")


# -- (b) PGD noise from a guarded helper, then BadNets -----------------------------------------

def pgd_untargeted(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, data: ImageSet,
                   eps: float, steps: int, step_size: float, start: torch.Tensor) -> torch.Tensor:
    """Untargeted L∞ PGD on a uint8 batch from the offsets ``start`` (|start| ≤ eps): the
    float images x + δ on 0..255 that raise the cross-entropy of ``labels`` (module docstring)."""
    device = next(model.parameters()).device
    x, y = images.to(device).float(), labels.to(device)
    delta = ((x + start.to(device)).clamp(0, 255) - x).detach()
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(helper_input(x + delta, data)), y)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + step_size * grad.sign()).clamp(-eps, eps)
        delta = (x + delta).clamp(0, 255) - x
    return (x + delta).cpu()


@register_attack("adaptive-pgd")
@dataclass
class AdaptivePGD(GuardedHelperAttack):
    """Poisoned images: untargeted PGD noise (L∞ eps) from a helper trained with EigenGuard, then
    the BadNets patch; test images: the patch only; dirty label."""

    eps: float = 25.5
    steps: int = 10
    step_size: float | None = None
    patch: int | None = None
    value: int = 255

    def __post_init__(self):
        self.eps = _check_eps("AdaptivePGD", self.eps)
        self.steps = _check_steps("AdaptivePGD", self.steps)
        if self.step_size is not None and (not is_real(self.step_size) or self.step_size <= 0):
            raise ValueError(f"AdaptivePGD step_size must be a number > 0 (on the 0..255 scale) "
                             f"or None for eps / 4, got {self.step_size!r}")
        self.step_size = None if self.step_size is None else float(self.step_size)
        try:
            self._badnets = BadNets(patch=self.patch, value=self.value)
        except ValueError as error:
            raise ValueError(f"AdaptivePGD: {error}") from None
        self._check_helper("AdaptivePGD")
        self._helper = None

    @property
    def pgd_step(self) -> float:
        """The PGD step on the 0..255 scale: ``step_size``, or eps / 4 (2/255 at 8/255)."""
        return self.step_size if self.step_size is not None else self.eps / 4

    def fit(self, train: ImageSet, *, seed: int = 0,
            device: str | torch.device = "cpu") -> "AdaptivePGD":
        """Train the guarded helper (cached in-process); the noise is made by :meth:`poison`."""
        height, width = train.image_size
        size = self._badnets.patch_size(height)
        if size > min(height, width):
            raise ValueError(f"AdaptivePGD patch {size} does not fit {height}×{width} images: "
                             f"it must be at most {min(height, width)}")
        self._helper = self.helper(train, seed, device)
        self.shape_ = torch.tensor(train.images.shape[1:], dtype=torch.int64)
        self.num_classes_ = torch.tensor([train.num_classes])
        self.__dict__.pop("pgd_accuracy_", None)
        return self

    # -- fitted state: the helper travels with it --------------------------------------------

    def fitted_state(self) -> dict[str, torch.Tensor]:
        if self._helper is None:
            return {}
        state = {name: value.clone() for name, value in super().fitted_state().items()}
        state.update({f"helper.{name}": value.detach().cpu().clone()
                      for name, value in self._helper.state_dict().items()})
        return state

    def load_fitted_state(self, state: dict[str, torch.Tensor]) -> "AdaptivePGD":
        """Restore the helper (rebuilt from the settings) and the image shape."""
        weights = {name[len("helper."):]: value for name, value in state.items()
                   if name.startswith("helper.")}
        rest = {name: value for name, value in state.items() if not name.startswith("helper.")}
        if not weights or not {"shape_", "num_classes_"} <= set(rest):
            raise ValueError("AdaptivePGD: the fitted state needs shape_, num_classes_ and the "
                             "helper's weights (helper.*); pass the state saved by the run")
        super().load_fitted_state(rest)
        self._helper = restore_helper(self.helper_spec, int(self.shape_[0]),
                                      int(self.num_classes_[0]), weights)
        return self

    # -- the trigger ---------------------------------------------------------------------------

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """The BadNets patch only (test images; poisoned training images also get the noise)."""
        check_images(images)
        self.check_fitted()
        _check_shape("AdaptivePGD", self.shape_.tolist(), images, "add its patch to")
        return self._badnets.apply(images)

    def noisy(self, images: torch.Tensor, labels: torch.Tensor, data: ImageSet,
              seed: int) -> torch.Tensor:
        """uint8 images with the helper's untargeted PGD noise against ``labels`` (no patch);
        the random start comes from ``seed``'s "adaptive-pgd-start" stream, drawn for the whole
        batch at once, so the result does not depend on how it is chunked."""
        check_images(images)
        self.check_fitted()
        _check_shape("AdaptivePGD", self.shape_.tolist(), images, "perturb")
        start = (torch.rand(images.shape, generator=generator(seed, "adaptive-pgd-start"))
                 * 2 - 1) * self.eps
        out = torch.empty_like(images)
        with single_thread():
            for first in range(0, len(images), CHUNK):
                part = slice(first, first + CHUNK)
                moved = pgd_untargeted(self._helper, images[part], labels[part], data,
                                       self.eps, self.steps, self.pgd_step, start[part])
                out[part] = moved.round().clamp(0, 255).to(torch.uint8)
        return out

    def poison(self, train: ImageSet, ratio: float, target: int, seed: int, pool: str = "all",
               label_mode: str = "all-to-one"):
        """Draw and relabel as the base class does; the chosen images get the PGD noise against
        their true labels, then the patch."""
        self.check_fitted()
        poisoned = super().poison(train, ratio, target, seed, pool, label_mode=label_mode)
        idx = poisoned.poison_indices
        if len(idx) == 0:
            return poisoned
        originals, labels = train.images[idx], train.labels[idx]
        noisy = self.noisy(originals, labels, train, seed)
        images = poisoned.data.images.clone()
        images[idx] = self._badnets.apply(noisy)
        self.pgd_accuracy_ = torch.tensor(
            [float((predict(self._helper, batch, train) == labels).double().mean())
             for batch in (originals, noisy)], dtype=torch.float64)
        data = poisoned.data.with_images_labels(images, poisoned.data.labels)
        return PoisonedSet(data, idx, poisoned.original_labels, poisoned.target)


# -- (c) a trigger optimised through the guarded helper's running filter ----------------------

def cosine_step(step_size: float, step: int, steps: int) -> float:
    """The step size of step ``step`` (0-based) of ``steps``: a cosine decay from step_size."""
    return step_size * (1 + math.cos(math.pi * step / steps)) / 2


def non_target_pool(train: ImageSet, target: int) -> torch.Tensor:
    """Indices of the images whose label is not the target (all of them if none is)."""
    others = (train.labels != target).nonzero().flatten()
    return others if len(others) else torch.arange(len(train))


@register_attack("adaptive-whitebox")
@dataclass
class AdaptiveWhitebox(GuardedHelperAttack, TargetedFit):
    """x' = clip(round(x + v), 0, 255), v (|v| ≤ eps) optimised through a helper trained with
    EigenGuard, its layer in running mode, to reach the target after the filter; dirty label."""

    eps: float = 24.0
    steps: int = 300
    step_size: float = 2.0
    batch_size: int = 32
    target: int | None = None

    def __post_init__(self):
        self.eps = _check_eps("AdaptiveWhitebox", self.eps)
        self._check_gradient_steps("the first sign-gradient step on the 0..255 scale")
        self._init_target("the class the trigger aims at")
        self._check_helper("AdaptiveWhitebox")

    # -- fitting (fit, for_target and poison: TargetedFit, with the guarded helper) ------------

    def _check_fit_data(self, train: ImageSet) -> None:
        if len(train) == 0:
            raise ValueError("AdaptiveWhitebox learns its trigger from the training set, which "
                             "is empty")

    def _aim(self, target: int) -> None:
        """Optimise the pattern towards ``target`` through the fit's guarded helper (cached
        in-process)."""
        train, seed, _, helper = self._fit_context

        def compute():
            pattern = self.optimise(helper, train, target, seed)
            return {"pattern_": pattern,
                    "fooling_rate_": fooling_rates(helper, train, pattern, target)}

        key = ("adaptive-whitebox", helper.cache_key, seed, target, self.eps, self.steps,
               self.step_size, self.batch_size)
        with single_thread():
            state = cached_fit(key, compute)
        self.pattern_, self.fooling_rate_ = state["pattern_"], state["fooling_rate_"]
        self.target_ = torch.tensor([int(target)])

    def optimise(self, helper: nn.Module, train: ImageSet, target: int,
                 seed: int) -> torch.Tensor:
        """The pattern (C, H, W), float32 on 0..255, |v| ≤ eps (module docstring)."""
        device = next(helper.parameters()).device
        pool = non_target_pool(train, target)
        draw = generator(seed, "adaptive-whitebox-batches")
        batch = min(self.batch_size, len(pool))
        labels = torch.full((batch,), target, dtype=torch.int64, device=device)
        v = torch.zeros(train.images.shape[1:], device=device)
        with guards_in_mode(helper, "running"):
            for step in range(self.steps):
                chosen = pool[torch.randperm(len(pool), generator=draw)[:batch]]
                x = train.images[chosen].to(device).float()
                v.requires_grad_(True)
                logits = helper(helper_input((x + v).clamp(0, 255), train))
                (grad,) = torch.autograd.grad(F.cross_entropy(logits, labels), v)
                alpha = cosine_step(self.step_size, step, self.steps)
                v = (v.detach() - alpha * grad.sign()).clamp(-self.eps, self.eps)
        return v.cpu()

    # -- the trigger ---------------------------------------------------------------------------

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        self.check_fitted()
        _check_shape("AdaptiveWhitebox", self.pattern_.shape, images, "add its pattern to")
        return add_pattern(images, self.pattern_)


def fooling_rates(helper: nn.Module, train: ImageSet, pattern: torch.Tensor,
                  target: int) -> torch.Tensor:
    """float64 [clean, running, batch]: how often the helper predicts ``target`` for up to
    FOOLING_SAMPLE non-target training images, untriggered (running mode), triggered in running
    mode, and triggered in per-batch mode (batches of EVAL_BATCH images, all triggered)."""
    images = train.images[non_target_pool(train, target)[:FOOLING_SAMPLE]]
    triggered = add_pattern(images, pattern)
    rates = [predict(helper, images, train), predict(helper, triggered, train),
             predict(helper, triggered, train, mode="batch", batch=EVAL_BATCH)]
    return torch.tensor([float((labels == target).double().mean()) for labels in rates],
                        dtype=torch.float64)
