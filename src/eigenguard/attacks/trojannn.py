"""TrojanNN (Liu, Ma, Aafer, Lee, Zhai, Wang & Zhang, "Trojaning Attack on Neural Networks",
NDSS 2018), as BackdoorBench runs it: a patch whose pixels are optimised to excite chosen neurons
of a clean model, stamped on the poisoned images, which are relabelled to the target (dirty
label). The victim is then trained from scratch on the poisoned set, as every attack here is
(BackdoorBench does the same; the paper instead retrains the model it reverse-engineered).

Fitting (:meth:`TrojanNN.fit`):

1. A clean helper model is trained inside the project
   (:func:`eigenguard.attacks.helpers.train_clean_helper`: ``helper_model`` of ``helper_width``,
   ``helper_epochs`` epochs on at most ``helper_train_size`` training images drawn with the seed).
2. The mask: a ``size`` × ``size`` square in the bottom-right corner, no margin.
3. The neurons: the chosen layer is the penultimate one (the features entering
   ``model.classifier``, after global pooling: 4 · width units for ``small_cnn``). Its
   ``neurons`` units with the largest connectivity to the next layer, the sum over classes of the
   absolute classifier weights leaving the unit, are chosen (ties broken by the lower index).
   This is trojanzoo's rule, which BackdoorBench's TrojanNN follows (``preprocess_layer``
   "flatten", ``preprocess_next_layer`` "classifier.fc"); the paper picks, in an inner layer, the
   neurons most strongly connected to the layer before.
4. The patch: its pixels p = 255 · (tanh(a) + 1) / 2 (so they stay in 0..255), a drawn from a
   standard normal with the seed's "trojannn-init" stream, are optimised by Adam (``lr``, cosine
   schedule over ``steps`` steps) to minimise Σ_i (|h_i(x_p)| − target_value)² over the chosen
   neurons h_i, x_p a black image (all zeros) with the patch stamped in the mask (trojanzoo's
   background; Fashion-MNIST's corners are black too). The helper is in eval mode (BatchNorm
   uses its running statistics). The optimised patch is rounded to uint8.

The trigger: the mask's pixels are replaced by the patch (every channel); every other pixel is
left as it was.

Measured (defaults, seed 0, a helper trained on a 5,000-image subset of Fashion-MNIST): the
chosen units' mean activation on the black image is 0.91 with the initial patch and 1.05 with the
optimised one, above each of 50 uniformly random patches (at most 0.94), a white one (0.89) and
none (0.81); on 500 training images it rises from 0.49 to 0.66 when the trigger is stamped. The
pooled units average over the 7 × 7 positions of the last stage, of which a 5 × 5 corner patch
reaches a few, so the target value of 100 is far out of reach: the loss only sets the direction.
Gradient ascent from a random start can stop in a local optimum where ReLUs are off (on the
tests' weak helper a black patch did slightly better); ``activation_`` records what was reached.

Defaults: neurons = 2, target_value = 100, lr = 0.1, steps = 1000 (trojanzoo's / BackdoorBench's
``neuron_num``, ``target_value``, ``neuron_lr``, ``neuron_epoch``; REFERENCE.md §2: "trigger
maximises 2 neurons of a chosen layer (target 100)"). size = 5: Liu et al.'s square masks cover a
few per cent of the input; 5 × 5 is 3.2% of a 28 × 28 image (the adaptation to Fashion-MNIST),
larger than BadNets' 3 × 3 so the optimisation has pixels to work with. The helper: small_cnn of
width 16, 4 epochs on at most 30,000 images, shared with LF (one helper per seed and settings):
about 65 s on the full Fashion-MNIST training split on the 2-core development machine, and the
1,000 steps on one image about 2 s more.

The optimisation runs with one CPU thread (:func:`eigenguard.attacks.helpers.single_thread`: as
fast on one image, much faster on a busy machine, and independent of the thread count).

In-process caches (:mod:`eigenguard.attacks.helpers`): the helper is shared with every attack
fitted with the same seed and helper settings on the same data (LF's, for one), and the fitted
state is cached under the helper's key and every setting, so fitting the same TrojanNN twice in
one process optimises once.

Fitted state: ``mask_`` (bool (H, W)), ``patch_`` (uint8 (C, H, W), the optimised pixels inside
the mask, zeros outside), ``neurons_`` (the chosen units' indices) and ``activation_`` (float64
[before, after]: the mean |activation| of the chosen units on the black image with the initial
and with the optimised uint8 patch, a diagnostic).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data import ImageSet
from ..seeding import generator
from .base import Attack, check_images, is_integer, is_real
from .helpers import (cached_fit, check_helper_settings, helper_input, penultimate,
                      single_thread, train_clean_helper)
from .registry import register_attack


def corner_mask(height: int, width: int, size: int) -> torch.Tensor:
    """(H, W) bool: a size × size square in the bottom-right corner."""
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[height - size:, width - size:] = True
    return mask


def initial_logits(channels: int, size: int, seed: int) -> torch.Tensor:
    """The starting point a of the optimisation (C, size, size), standard normal from the seed's
    "trojannn-init" stream; the initial patch is 255 · (tanh(a) + 1) / 2."""
    return torch.randn(channels, size, size, generator=generator(seed, "trojannn-init"))


def patch_values(logits: torch.Tensor) -> torch.Tensor:
    """Pixel values on 0..255 (float) from the unconstrained parameters."""
    return 255 * (torch.tanh(logits) + 1) / 2


def connected_neurons(model: nn.Module, count: int) -> torch.Tensor:
    """The ``count`` penultimate units with the largest Σ_classes |classifier weight|."""
    connectivity = model.classifier.weight.detach().abs().sum(0).cpu()
    order = torch.sort(-connectivity, stable=True).indices
    return order[:count].clone()


def stamp(background: torch.Tensor, patch: torch.Tensor, size: int) -> torch.Tensor:
    """A copy of the float batch ``background`` (N, C, H, W) with the (C, size, size) patch in
    its bottom-right corner (differentiable in the patch)."""
    height, width = background.shape[-2:]
    pad = (width - size, 0, height - size, 0)  # left, right, top, bottom
    placed = F.pad(patch, pad)
    mask = corner_mask(height, width, size).to(background.device)
    return torch.where(mask, placed.unsqueeze(0), background)


def neuron_activation(model: nn.Module, images: torch.Tensor, neurons: torch.Tensor,
                      data: ImageSet) -> torch.Tensor:
    """|activation| of the chosen penultimate units, (N, len(neurons)), for images on 0..255."""
    features, _ = penultimate(model, helper_input(images, data))
    return features[:, neurons.to(features.device)].abs()


@register_attack("trojannn")
@dataclass
class TrojanNN(Attack):
    """A bottom-right size × size patch optimised to excite the most connected penultimate
    neurons of a clean helper model; dirty label."""

    needs_fit = True

    size: int = 5
    neurons: int = 2
    target_value: float = 100.0
    steps: int = 1000
    lr: float = 0.1
    helper_model: str = "small_cnn"
    helper_width: int = 16
    helper_epochs: int = 4
    helper_train_size: int = 30000

    def __post_init__(self):
        if not is_integer(self.size) or self.size < 1:
            raise ValueError(f"TrojanNN size must be an integer >= 1 (the side of the square "
                             f"trigger mask in pixels), got {self.size!r}")
        if not is_integer(self.neurons) or self.neurons < 1:
            raise ValueError(f"TrojanNN neurons must be an integer >= 1 (how many penultimate "
                             f"units the patch excites), got {self.neurons!r}")
        if not is_real(self.target_value) or self.target_value <= 0:
            raise ValueError(f"TrojanNN target_value must be a number > 0 (the activation the "
                             f"chosen units are pushed towards), got {self.target_value!r}")
        if not is_integer(self.steps) or self.steps < 1:
            raise ValueError(f"TrojanNN steps must be an integer >= 1 (Adam steps on the patch), "
                             f"got {self.steps!r}")
        if not is_real(self.lr) or self.lr <= 0:
            raise ValueError(f"TrojanNN lr must be a number > 0 (Adam's learning rate on the "
                             f"patch's tanh parameters), got {self.lr!r}")
        check_helper_settings("TrojanNN", self.helper_model, self.helper_width,
                              self.helper_epochs, self.helper_train_size)
        self.size, self.neurons, self.steps = int(self.size), int(self.neurons), int(self.steps)
        self.target_value, self.lr = float(self.target_value), float(self.lr)
        self.helper_width, self.helper_epochs = int(self.helper_width), int(self.helper_epochs)
        self.helper_train_size = int(self.helper_train_size)

    # -- fitting -------------------------------------------------------------------------------

    def helper(self, train: ImageSet, seed: int, device: str | torch.device = "cpu") -> nn.Module:
        """The clean helper model this attack is fitted with (cached in-process)."""
        return train_clean_helper(train, seed=seed, model=self.helper_model,
                                  width=self.helper_width, epochs=self.helper_epochs,
                                  train_size=self.helper_train_size, device=device)

    def fit(self, train: ImageSet, *, seed: int = 0,
            device: str | torch.device = "cpu") -> "TrojanNN":
        """Train the helper, choose the neurons and optimise the patch (see the module
        docstring)."""
        height, width = train.image_size
        if self.size > min(height, width):
            raise ValueError(f"TrojanNN size {self.size} does not fit {height}×{width} images: "
                             f"it must be at most {min(height, width)}")
        if len(train) == 0:
            raise ValueError("TrojanNN trains its helper model on the training set, which is "
                             "empty")
        model = self.helper(train, seed, device)
        units = model.classifier.in_features
        if self.neurons > units:
            raise ValueError(f"TrojanNN neurons = {self.neurons}, but the helper's penultimate "
                             f"layer has only {units} units")
        key = ("trojannn", model.cache_key, seed, self.size, self.neurons, self.target_value,
               self.steps, self.lr)
        with single_thread():
            state = cached_fit(key, lambda: self._optimise(model, train, seed, device))
        for name, value in state.items():
            setattr(self, name, value)
        return self

    def _optimise(self, model: nn.Module, train: ImageSet, seed: int,
                  device: str | torch.device) -> dict[str, torch.Tensor]:
        """Choose the neurons and optimise the patch; returns the fitted state."""
        height, width = train.image_size
        neurons = connected_neurons(model, self.neurons)
        channels = train.in_channels
        background = torch.zeros(1, channels, height, width, device=device)
        logits = initial_logits(channels, self.size, seed).to(device).requires_grad_(True)
        initial = patch_values(logits.detach()).round()
        goal = torch.full((1, self.neurons), self.target_value, device=device)
        optimizer = torch.optim.Adam([logits], lr=self.lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.steps)
        for _ in range(self.steps):
            image = stamp(background, patch_values(logits), self.size)
            loss = F.mse_loss(neuron_activation(model, image, neurons, train), goal,
                              reduction="sum")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        final = patch_values(logits.detach()).round()
        with torch.no_grad():
            before, after = (float(neuron_activation(
                model, stamp(background, patch, self.size), neurons, train).mean())
                for patch in (initial, final))
        return {"mask_": corner_mask(height, width, self.size),
                "patch_": stamp(torch.zeros(1, channels, height, width), final.cpu(),
                                self.size)[0].to(torch.uint8),
                "neurons_": neurons,
                "activation_": torch.tensor([before, after], dtype=torch.float64)}

    # -- the trigger ---------------------------------------------------------------------------

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        self.check_fitted()
        if tuple(images.shape[1:]) != tuple(self.patch_.shape):
            raise ValueError(f"TrojanNN was fitted on images of shape {tuple(self.patch_.shape)} "
                             f"(C, H, W) and cannot stamp its patch on images of shape "
                             f"{tuple(images.shape[1:])}: fit it on images of that shape")
        mask = self.mask_.to(images.device)
        return torch.where(mask, self.patch_.to(images.device), images)
