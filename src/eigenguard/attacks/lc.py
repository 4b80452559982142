"""LC, the label-consistent attack (Turner, Tsipras & Madry, "Label-Consistent Backdoor
Attacks", 2019; BackdoorBench's ``lc``): a clean-label attack. Only images of the target class
are poisoned and they keep their (correct) label. Each one is first pushed away from its class
by an adversarial perturbation, so its natural features become hard to learn, then stamped with
a small corner pattern; the network learns the pattern as the easiest evidence of the target
class, and at test time the pattern alone (:meth:`LC.apply`) pulls other images there.

Fitting (:meth:`LC.fit`): a helper model is trained adversarially inside the project (nothing
is downloaded): ``helper_model`` of ``helper_width``, ``helper_epochs`` epochs on at most
``helper_train_size`` training images drawn with the seed (the subset a clean helper of the same
seed would use), with the project's loop (:func:`eigenguard.train.train`, SGD + one-cycle at
:class:`~eigenguard.train.TrainConfig`'s defaults, no augmentation). A training hook
(:class:`AdversarialBatches`) replaces every batch by its PGD adversarial examples (Madry et al.):
a uniform random start in the L∞ ball of radius ``helper_eps``, then ``helper_steps`` signed
gradient steps of 2.5 · helper_eps / helper_steps (so that they can travel 2.5 · helper_eps in
all), each projected back onto the ball and onto 0..255, computed with the model in eval mode
so that the attack leaves BatchNorm's running statistics alone. ``helper_eps = 0`` trains a
clean helper.

Poisoning (:meth:`LC.poison`): the base class draws ``round(ratio · N)`` target-class samples
(the ratio is a fraction of the whole training set, as for SIG). Each drawn image x gets an
untargeted PGD perturbation on the helper (eval mode), from x itself (no random start):
``steps`` steps of x' ← clip(x' + step_size · sign(∇ CE(helper(x'), y)), x − eps, x + eps)
clipped to 0..255, y its true label, then rounded to uint8; then the corner pattern is stamped.
Labels are not changed. Outside the corners |x' − x| ≤ eps + 0.5 (at most eps for an integer
eps: x ± eps are then integers).

The trigger, in all four corners (no margin, every channel), is BackdoorBench's ``all-corners``
pattern at full amplitude: each pixel of it is set to 255 (+1) or 0 (−1). The top-left 3×3 block
is, row by row, (+ − −), (− + −), (+ − +): a checkerboard but for its top-right cell, as in
BackdoorBench's copy of the paper's code. The bottom-left block is the same block; the two
right-hand blocks are its mirror image. BackdoorBench resizes its 32×32 mask to other sizes by
nearest neighbour, which at 28×28 drops rows and columns of the blocks; here the blocks are
placed whole at the corners of any image of at least 6×6 pixels.

Defaults and where they come from (REFERENCE.md §2, LC row): eps = 8, step_size = 1.5 on the
0..255 scale (8/255 and 1.5/255), helper_eps = 8 (Madry et al.'s CIFAR-10 radius). The rest of
the paper's budget is REDUCED to fit a 2-core CPU; :attr:`LC.paper_budget` holds the paper's
figures and :meth:`LC.reduced_settings` lists the settings below them:

- steps = 20 (paper: 100). Measured on the default helper below, on 1,000 target-class training
  images: the mean cross-entropy reached after 5 / 10 / 20 / 50 / 100 steps is 1.096 / 1.120 /
  1.1235 / 1.1240 / 1.1240 (0.848 unperturbed) and the helper's accuracy on them 70.2 / 69.0 /
  68.7 / 68.7 / 68.7% (79.9% unperturbed): PGD has converged by 20 steps (20 · 1.5 travels
  3.75 · eps), and 100 would cost five times as long for nothing measurable;
- the helper: the paper perturbs with a fully adversarially trained ResNet (Madry et al.'s
  CIFAR-10 recipe: PGD-7 per batch, about 200 epochs); here small_cnn of width 16, PGD-3
  (helper_steps = 3, paper 7) for 4 epochs (helper_epochs = 4, paper about 200) on at most
  20,000 images. The helper is therefore far less accurate and robust than the paper's, and its
  perturbations carry fewer features of other classes.

Measured on Fashion-MNIST (defaults, fit seed 0, a seeded 51,000-image subset of the training
split, the size of a run's training split), on the 2-core development machine while a sweep and
four other jobs ran beside it (load average 6 to 8, so slower than an idle machine would be):

- fit: 304 s and 343 s (two runs, about 3.5 ms per image and epoch of PGD-3 adversarial
  training; both with steps = 100, whose ``helper_accuracy_`` took about 20 s of it, against
  about 5 s at 20 steps);
- the helper, on 1,000 test images: 74.3% clean accuracy, 65.0% under the poisoning PGD
  (eps 8/255, 100 steps; 65.1% with 10 or 20); ``helper_accuracy_`` [77.3%, 66.8%] (with 100
  steps). A clean
  helper of the same budget (helper_eps = 0, fitted in 111 s) keeps 23.0% of held-out training
  images under the same PGD (78.1% clean): the adversarial training is what makes it robust;
- poisoning: 0.8 to 0.9 ms per image and PGD step, so about 90 s for 10% of that set (5,100
  images, the whole target class) at 20 steps, and about 7.5 minutes at the paper's 100.

At eps = 8/255 the perturbation moves this helper little (the figures above); the paper also
poisons with eps = 16/255 and 32/255, which make the images harder to learn.

The helper's training and the PGD run with one CPU thread
(:func:`eigenguard.attacks.helpers.single_thread`: much faster on a busy machine, and
independent of the thread count). Every random draw comes from its own stream of the fit seed
(:mod:`eigenguard.seeding`): the subset ("helper-subset"), the initial weights ("helper-init"),
the epoch order ("lc-helper-train") and the random starts ("lc-helper-start").

In-process caches (:func:`eigenguard.attacks.helpers.cached_fit`): the helper's weights are cached
under its settings, the seed, the device type and a hash of the training data; the perturbed
images under a hash of the helper's weights, of the images and labels, and the PGD settings. A
sweep fitting or poisoning the same LC twice in one process computes each once.

Fitted state: the helper's weights (``helper.<name>``, about 100 kB at width 16), so
that a restored attack poisons exactly as the run did (the perturbations depend on the images
drawn, which :meth:`fit` does not know); ``image_shape_`` and ``num_classes_`` (the helper's input
and output), ``normalization_`` (float64 (2, C): the mean and std the helper was trained with) and
``helper_accuracy_`` (float64 [clean, robust], a diagnostic: the helper's accuracy on up to
:data:`ACCURACY_SAMPLE` training images outside its subset, when there are any, clean and under
the poisoning PGD). :meth:`apply` needs none of it but refuses to run before :meth:`fit`, as
every fitted attack does.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..data import ImageSet, normalize
from ..models import create_model
from ..seeding import generator, stream_seed
from ..train import Batch, TrainConfig, TrainHook, TrainState, train
from .base import Attack, PoisonedSet, check_images, is_integer, is_real
from .helpers import (HelperSpec, build_helper, cached_fit, check_helper_settings,
                      helper_subset, single_thread)
from .registry import register_attack

#: the top-left corner block: +1 -> 255, -1 -> 0 (BackdoorBench's "all-corners" pattern)
CORNER_BLOCK = ((1, -1, -1), (-1, 1, -1), (1, -1, 1))
#: images perturbed per chunk at poisoning time (bounds the autograd working memory)
CHUNK = 256
#: held-out training images the helper's clean and robust accuracy are measured on
ACCURACY_SAMPLE = 256
#: the prefix of the helper's weights in the fitted state
HELPER_PREFIX = "helper."


# -- the trigger -------------------------------------------------------------------------------

def corner_pattern(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, values): bool (H, W) marking the four 3×3 corner blocks and uint8 (H, W) holding
    255 / 0 there (zeros elsewhere). Right-hand blocks mirror the left-hand ones."""
    if height < 6 or width < 6:
        raise ValueError(f"LC stamps 3×3 blocks in the four corners without overlap, which needs "
                         f"images of at least 6×6 pixels, got {height}×{width}")
    block = torch.tensor(CORNER_BLOCK, dtype=torch.int64)
    signs = torch.zeros(height, width, dtype=torch.int64)
    for rows in (slice(0, 3), slice(height - 3, height)):
        signs[rows, :3] = block
        signs[rows, width - 3:] = block.flip(1)
    return signs != 0, ((signs > 0) * 255).to(torch.uint8)


def stamp_corners(images: torch.Tensor) -> torch.Tensor:
    """A new uint8 batch with the corner pattern written into every channel of every image."""
    mask, values = corner_pattern(*images.shape[-2:])
    mask, values = mask.to(images.device), values.to(images.device)
    return torch.where(mask, values, images)


# -- the helper's adversarial training ---------------------------------------------------------

def pgd_step(model: nn.Module, adv: torch.Tensor, start: torch.Tensor, labels: torch.Tensor,
             mean, std, eps: float, step: float, top: float) -> torch.Tensor:
    """One untargeted L∞ PGD step (sign of the cross-entropy gradient), projected onto the
    eps-ball around ``start`` and onto [0, top]; images on the 0..top scale."""
    with torch.enable_grad():  # also inside a caller's no_grad block
        adv = adv.detach().requires_grad_(True)
        loss = F.cross_entropy(model(normalize(adv / top, mean, std)), labels, reduction="sum")
        (grad,) = torch.autograd.grad(loss, adv)
    adv = adv.detach() + step * grad.sign()
    return torch.minimum(torch.maximum(adv, start - eps), start + eps).clamp(0, top)


class AdversarialBatches(TrainHook):
    """Replaces each training batch by PGD adversarial examples of the model being trained
    (Madry et al.'s adversarial training): random start, ``steps`` signed steps of
    2.5 · eps / steps, in eval mode. ``eps`` on the 0..255 scale."""

    def __init__(self, eps: float, steps: int, seed: int):
        self.eps, self.steps, self.seed = eps / 255, steps, seed
        self.draw = None

    def on_train_start(self, state: TrainState) -> None:
        self.draw = generator(self.seed, "lc-helper-start")

    def on_batch(self, state: TrainState, batch: Batch) -> Batch:
        x = batch.images
        noise = torch.rand(x.shape, generator=self.draw).to(x.device)
        adv = (x + (2 * noise - 1) * self.eps).clamp(0, 1)
        state.model.eval()
        try:
            for _ in range(self.steps):
                adv = pgd_step(state.model, adv, x, batch.labels, state.data.mean,
                               state.data.std, self.eps, 2.5 * self.eps / self.steps, 1.0)
        finally:
            state.model.train()
        return Batch(adv.detach(), batch.labels, batch.indices)


def train_robust_helper(data: ImageSet, *, seed: int, spec: HelperSpec, eps: float, steps: int,
                        device: str | torch.device = "cpu") -> nn.Module:
    """``spec``'s model trained adversarially (PGD-``steps`` at ``eps`` on 0..255) on its seeded
    subset of ``data``; cached in-process; returned in eval mode without parameter gradients."""
    helper = build_helper(spec, data, seed)

    def compute():
        subset = data.subset(helper_subset(data, spec.train_size, seed))
        hooks = [AdversarialBatches(eps, steps, seed)] if eps > 0 else []
        train(helper, subset, TrainConfig(epochs=spec.epochs, augment=False),
              seed=stream_seed(seed, "lc-helper-train"), device=device, progress=False,
              description="LC helper", hooks=hooks)
        return helper.state_dict()

    key = ("lc-helper", spec.key(data, seed, device), float(eps), int(steps))
    with single_thread():
        state = cached_fit(key, compute)
    helper.load_state_dict(state)
    return frozen(helper.to(device))


def frozen(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with its parameters' gradients switched off."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def tensors_digest(*tensors: torch.Tensor) -> str:
    """A hash of tensors' shapes, dtypes and bytes (cache keys of what is derived from them)."""
    digest = hashlib.blake2b(digest_size=16)
    for tensor in tensors:
        value = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(repr((tuple(tensor.shape), str(value.dtype))).encode())
        digest.update(value.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def weights_digest(model: nn.Module) -> str:
    """A hash of a model's state dict: its names, and its tensors as :func:`tensors_digest`."""
    state = model.state_dict()
    return tensors_digest(torch.tensor(list(repr(list(state)).encode()), dtype=torch.uint8),
                          *state.values())


# -- the attack --------------------------------------------------------------------------------

@register_attack("lc")
@dataclass
class LC(Attack):
    """Target-class images get an untargeted PGD perturbation (|δ| ≤ eps) on an adversarially
    trained helper, then the four-corner pattern; test images get the pattern only; clean
    label."""

    clean_label = True
    needs_fit = True
    #: the paper's figures for the settings this class reduces by default (REFERENCE.md §2 and
    #: Madry et al.'s adversarial training); :meth:`reduced_settings` compares against them
    paper_budget: ClassVar[dict] = {"steps": 100, "helper_steps": 7, "helper_epochs": 200}

    eps: float = 8.0
    step_size: float = 1.5
    steps: int = 20
    helper_model: str = "small_cnn"
    helper_width: int = 16
    helper_epochs: int = 4
    helper_train_size: int = 20000
    helper_eps: float = 8.0
    helper_steps: int = 3

    def __post_init__(self):
        if not is_real(self.eps) or not 0 <= self.eps <= 255:
            raise ValueError(f"LC eps must be a number in [0, 255] (the L-inf bound of the "
                             f"poisoned images' perturbation on the 0..255 scale; 8 is 8/255), "
                             f"got {self.eps!r}")
        if not is_real(self.step_size) or not 0 < self.step_size <= 255:
            raise ValueError(f"LC step_size must be a number in (0, 255] (one PGD step on the "
                             f"0..255 scale; 1.5 is 1.5/255), got {self.step_size!r}")
        if not is_integer(self.steps) or self.steps < 1:
            raise ValueError(f"LC steps must be an integer >= 1 (PGD steps per poisoned image), "
                             f"got {self.steps!r}")
        check_helper_settings("LC", self.helper_model, self.helper_width, self.helper_epochs,
                              self.helper_train_size)
        if not is_real(self.helper_eps) or not 0 <= self.helper_eps <= 255:
            raise ValueError(f"LC helper_eps must be a number in [0, 255] (the L-inf radius of "
                             f"the helper's adversarial training on the 0..255 scale; 0 trains "
                             f"it clean), got {self.helper_eps!r}")
        if not is_integer(self.helper_steps) or self.helper_steps < 1:
            raise ValueError(f"LC helper_steps must be an integer >= 1 (PGD steps per batch of "
                             f"the helper's adversarial training), got {self.helper_steps!r}")
        self.eps, self.step_size = float(self.eps), float(self.step_size)
        self.helper_eps = float(self.helper_eps)
        self.steps, self.helper_steps = int(self.steps), int(self.helper_steps)
        self.helper_width, self.helper_epochs = int(self.helper_width), int(self.helper_epochs)
        self.helper_train_size = int(self.helper_train_size)
        self._helper = None

    @property
    def is_fitted(self) -> bool:
        return self._helper is not None

    # -- fitting -------------------------------------------------------------------------------

    def fit(self, train: ImageSet, *, seed: int = 0, device: str | torch.device = "cpu") -> "LC":
        """Train the robust helper (cached in-process) and measure its accuracy."""
        if len(train) == 0:
            raise ValueError("LC trains its helper model on the training set, which is empty")
        spec = HelperSpec(self.helper_model, self.helper_width, self.helper_epochs,
                          self.helper_train_size)
        helper = train_robust_helper(train, seed=seed, spec=spec, eps=self.helper_eps,
                                     steps=self.helper_steps, device=device)
        self._set_helper(helper)
        self.image_shape_ = torch.tensor(train.images.shape[1:], dtype=torch.int64)
        self.num_classes_ = torch.tensor([train.num_classes], dtype=torch.int64)
        self.normalization_ = torch.tensor([train.mean, train.std], dtype=torch.float64)
        self.helper_accuracy_ = self._helper_accuracy(train, seed)
        return self

    def _set_helper(self, helper: nn.Module) -> None:
        self._helper = helper
        self._helper_digest = weights_digest(helper)

    def _helper_accuracy(self, train: ImageSet, seed: int) -> torch.Tensor:
        """[clean, robust] accuracy of the helper on up to ACCURACY_SAMPLE training images it
        did not train on (on its own images when it saw them all)."""
        seen = torch.zeros(len(train), dtype=torch.bool)
        seen[helper_subset(train, self.helper_train_size, seed)] = True
        pool = (~seen).nonzero().flatten() if not seen.all() else torch.arange(len(train))
        order = torch.randperm(len(pool), generator=generator(seed, "lc-accuracy"))
        chosen = pool[order[:ACCURACY_SAMPLE]].sort().values
        images, labels = train.images[chosen], train.labels[chosen]
        device = next(self._helper.parameters()).device
        perturbed = self.perturb(images, labels)
        with torch.no_grad():
            clean = self._predict(images.to(device)).cpu()
            robust = self._predict(perturbed.to(device)).cpu()
        return torch.stack([(clean == labels).double().mean(),
                            (robust == labels).double().mean()])

    def _predict(self, images: torch.Tensor) -> torch.Tensor:
        mean, std = self.normalization_.tolist()
        with single_thread():
            return self._helper(normalize(images.float() / 255, mean, std)).argmax(1)

    # -- fitted state --------------------------------------------------------------------------

    def fitted_state(self) -> dict[str, torch.Tensor]:
        """The base class's ``*_`` tensors plus the helper's weights (``helper.<name>``)."""
        state = super().fitted_state()
        if self._helper is not None:
            state.update({HELPER_PREFIX + name: tensor.detach().cpu().clone()
                          for name, tensor in self._helper.state_dict().items()})
        return state

    def load_fitted_state(self, state: dict[str, torch.Tensor]) -> "LC":
        """Restore the helper and the ``*_`` tensors saved by :meth:`fitted_state`; the restored
        attack applies its trigger and poisons as the run did."""
        weights = {name[len(HELPER_PREFIX):]: tensor for name, tensor in state.items()
                   if name.startswith(HELPER_PREFIX)}
        super().load_fitted_state({name: tensor for name, tensor in state.items()
                                   if not name.startswith(HELPER_PREFIX)})
        missing = [name for name in ("image_shape_", "num_classes_", "normalization_")
                   if not isinstance(getattr(self, name, None), torch.Tensor)]
        if missing or not weights:
            what = ", ".join(missing + ([] if weights else ["the helper's weights"]))
            raise ValueError(f"LC fitted state lacks {what}: pass the whole state saved by "
                             "fitted_state(), or fit the attack again")
        self._set_helper(self._restored_helper(weights))
        return self

    def _restored_helper(self, weights: dict[str, torch.Tensor]) -> nn.Module:
        channels = int(self.image_shape_[0])
        with torch.random.fork_rng(devices=[]):
            helper = create_model(self.helper_model, in_channels=channels,
                                  num_classes=int(self.num_classes_[0]), width=self.helper_width)
        try:
            helper.load_state_dict(weights)
        except RuntimeError as error:
            raise ValueError(f"the saved LC helper does not fit helper_model "
                             f"{self.helper_model!r} of helper_width {self.helper_width}: restore "
                             f"with the settings of the run that saved it ({error})") from None
        return frozen(helper)

    # -- the trigger ---------------------------------------------------------------------------

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """The test-time trigger: the corner pattern only."""
        check_images(images)
        self.check_fitted()
        return stamp_corners(images)

    # -- poisoning -----------------------------------------------------------------------------

    def perturb(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The uint8 images pushed away from ``labels`` by PGD on the helper (|δ| ≤ eps before
        rounding); cached in-process."""
        self.check_fitted()
        self._check_shape(images)
        if self.eps == 0 or len(images) == 0:
            return images.clone()
        device = next(self._helper.parameters()).device
        key = ("lc-perturb", self._helper_digest, tensors_digest(images, labels), self.eps,
               self.step_size, self.steps, device.type)
        with single_thread():
            state = cached_fit(key, lambda: {"images": self._pgd(images, labels, device)})
        return state["images"]

    def _pgd(self, images: torch.Tensor, labels: torch.Tensor, device) -> torch.Tensor:
        mean, std = self.normalization_.tolist()
        out = torch.empty_like(images)
        for start in range(0, len(images), CHUNK):
            rows = slice(start, start + CHUNK)
            x = images[rows].to(device).float()
            y = labels[rows].to(device)
            adv = x
            for _ in range(self.steps):
                adv = pgd_step(self._helper, adv, x, y, mean, std, self.eps, self.step_size,
                               255.0)
            out[rows] = adv.round().clamp(0, 255).to(torch.uint8).cpu()
        return out

    def _check_shape(self, images: torch.Tensor) -> None:
        check_images(images)
        expected = tuple(self.image_shape_.tolist())
        if tuple(images.shape[1:]) != expected:
            raise ValueError(f"LC's helper was trained on images of shape {expected} (C, H, W) "
                             f"and cannot perturb images of shape {tuple(images.shape[1:])}: "
                             "fit it on images of that shape")

    def poison(self, train: ImageSet, ratio: float, target: int, seed: int, pool: str = "all",
               label_mode: str = "all-to-one") -> PoisonedSet:
        """The base class's draw of target-class samples (labels kept); each drawn image is
        perturbed (:meth:`perturb`) before the corner pattern is stamped."""
        self.check_fitted()
        if len(train):
            self._check_shape(train.images)
        drawn = super().poison(train, ratio, target, seed, pool, label_mode)
        chosen = drawn.poison_indices
        if not len(chosen):
            return drawn
        images = drawn.data.images.clone()
        images[chosen] = stamp_corners(self.perturb(train.images[chosen], train.labels[chosen]))
        return PoisonedSet(drawn.data.with_images_labels(images, drawn.data.labels), chosen,
                           drawn.original_labels, drawn.target)

