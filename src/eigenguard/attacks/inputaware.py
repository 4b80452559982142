"""Input-aware dynamic backdoor (Nguyen & Tran, "Input-Aware Dynamic Backdoor Attack", NeurIPS
2020; BackdoorBench's ``inputaware``): every image gets its own trigger, made by a generator
network from the image itself. Dirty label: poisoned samples are relabelled to the target.

The trigger. Two encoder-decoder networks (:class:`EncoderDecoder`: two stride-2 convolutions
down, two nearest-neighbour upsamplings back to the input size, BatchNorm and ReLU after each
hidden convolution, as in the paper's networks) read the image x in [0, 1]: the generator G
gives a pattern G(x) in (0, 1) with the image's channels, the mask network M a one-channel mask
m(x) = tanh(20 · M(x) − 10) / 2 + 0.5, pushed towards 0 or 1. The triggered image is
x' = x + m(x) · (G(x) − x), rounded to uint8. :meth:`InputAware.apply` runs both networks in
evaluation mode (BatchNorm's running statistics), so an image's trigger does not depend on its
batch; while they train, BatchNorm normalises over the batch, which keeps the generator from
collapsing to one saturated pattern for every image (in a fit measured without it, the diversity
loss jumped to about 2,900 in the second joint epoch: identical patterns of two images leave it
only ε to divide by).

Training, as in the paper (losses with BackdoorBench's defaults λ_div = 1, λ_norm = 100, mask
density 0.032, ε = 1e-7; Adam lr 0.01, betas (0.5, 0.9) for both networks):

1. mask-only epochs: M alone minimises λ_norm · mean(relu(mean_pixels(m(x)) − density)) + λ_div
   · mean(‖x₁ − x₂‖ / (‖m(x₁) − m(x₂)‖ + ε)) over pairs of images of a batch (‖·‖ the root mean
   square): masks cover about 3.2% of the image, and different images get different masks. M is
   then frozen.
2. joint training: in every batch of a classifier's training, ``round(0.1 · B)`` samples get
   their own trigger and the target label, ``round(cross_ratio · that)`` others get the trigger
   of another image of the batch and keep their label (cross mode: a trigger only works on the
   image it was made for), and G minimises the classifier's cross-entropy plus λ_div times the
   diversity term on patterns, ‖x₁ − x₂‖ / (‖G(x₁) − G(x₂)‖ + ε), stepping its own optimiser
   after the classifier's (:class:`InputAwareBatches`, a training hook).

Two threat models (the ``mode`` setting; :mod:`eigenguard.attacks.training_mode`):

- ``"data"`` (default): :meth:`InputAware.fit` trains a clean helper classifier
  (:func:`eigenguard.attacks.helpers.train_clean_helper`, shared with LF and TrojanNN), then
  step 1, then step 2 with that helper as the classifier (it keeps learning, now with the
  backdoor, with the project's loop at ``TrainConfig``'s defaults, no augmentation), on at most
  ``train_size`` training images drawn with the seed. :meth:`InputAware.poison` materialises the
  poisoned set: the poisoned samples with their own trigger, and ``cross_ratio`` × as many
  others with the trigger of another training image, labels kept (listed in ``noise_indices``,
  not poisoned, as WaNet's noise-mode samples are).
- ``"training"`` (the paper's): the same fit, then the hooks run step 2 with the victim as the
  classifier, for the whole of its training, poisoning ``round(ratio · B)`` samples of every
  batch (the run's poison ratio, which :meth:`poison` passes on) and adding ``round(cross_ratio ·
  that)`` cross samples; the fitted state saved after training holds the generator evaluation
  applies. Training mode relabels to one target, so all-to-all is refused (data mode's
  all-to-all uses the generator of the fit, trained for ``target`` or class 0 when it is None,
  as a fixed trigger generator). The paper trains G from scratch with the victim; here it starts
  from the fit, so that the set :meth:`poison` materialises for defenses that inspect data (the
  data mode's set, made before training) carries a trained trigger, close to the final one. The
  hook puts those samples back clean while the victim trains on that set.

Reduced for the 2-core CPU, and said so in the settings: 2 mask-only epochs (paper and
BackdoorBench: 25) and 4 joint epochs in the fit, each on at most ``train_size`` = 20,000
images; networks of ``width`` 16 (channels 16-32-32). In the paper the generator trains with the
victim for all of its epochs; data mode's generator only sees the fit's.

Measured (defaults, the run's fit seed for seed 0, target 0, the 51,000-image Fashion-MNIST
training split, one CPU thread on the 2-core development machine with another training job
running beside it, so slower than on an idle machine): the fit took 253 s (the clean helper about
76 s, the mask-only epochs 59 s, the joint epochs 118 s), well inside the 10-minute budget;
materialising the poisoned set (5,100 poisoned and 5,100 cross samples) 20 s, and triggering
2,000 test images 3.2 s. The masks cover 0.0335 of the image on average (``density_``; asked
for: 0.032); a triggered test image differs from the original in 3.6% of its pixels (mean
absolute change 7.9 on 0..255), and its own trigger differs from another image's in 6.4% of the
pixels. The fit's classifier sends 92.3% of the triggered non-target images to the target
(``surrogate_asr_``). A victim (small_cnn of width 16, 4 epochs at ``TrainConfig``'s defaults,
10% poison, one seed) reached, in data mode, ACC 85.2% and ASR 94.6% (123 s of training); in
training mode, with the hooks training the generator on, ACC 85.3% and ASR 94.9% (258 s: the
generator's steps double the cost of a step). Triggers made from another image (cross mode)
sent only 12.8% and 12.2% to the target: the backdoor is input-specific. One seed, a small
victim: a calibration, not a benchmark result.

The target. :meth:`fit` is not told the run's target, so the ``target`` setting says which class
the generator is trained for: None (default) means the run's target: :meth:`fit` trains for class
0 (BackdoorBench's default target) and :meth:`poison` (or :meth:`training_hooks`), which are given
the target, retrain the generator for it with the same helper and mask when it differs (the mask
does not depend on the target and is cached). A restored attack has no helper, so it cannot be
re-aimed.

In-process caches (:mod:`eigenguard.attacks.helpers`): the helper, the mask network and the
generator are cached under the helper's key and every setting they depend on.

Fitted state: ``generator.*`` and ``mask.*`` (the two networks' weights), ``shape_`` ((C, H, W)
of the images they were built for), ``target_``, and two diagnostics of the fit: ``density_``
(the mean mask over up to 1,024 training images) and ``surrogate_asr_`` (the share of up to
1,024 non-target training images, triggered, that the fit's classifier assigns to the target).
"""
from __future__ import annotations

from typing import ClassVar

import contextlib
import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..data import ImageSet
from ..seeding import generator, stream_seed
from ..train import Batch, TrainConfig, TrainState, train
from .aimed import TargetedFit
from .base import PoisonedSet, check_images, is_integer, is_real
from .helpers import (cached_fit, check_helper_settings, helper_input, helper_subset,
                      single_thread)
from .registry import register_attack
from .training_mode import (BatchPoisoner, PoisonPlan, check_mode, other_rows, plan_for,
                            refuse_all_to_all)

#: the paper's share of backdoor samples per batch while the fit trains the generator (p_attack)
FIT_RATIO = 0.1
#: keeps the diversity ratios finite
EPSILON = 1e-7
#: images triggered per forward pass in apply and diagnostics
CHUNK = 1024
#: images the fit's diagnostics look at
DIAGNOSTIC_SAMPLE = 1024
#: Adam's betas for both networks (the paper's)
BETAS = (0.5, 0.9)


@dataclass(frozen=True, eq=False)
class InputAwarePoisonedSet(PoisonedSet):
    """A PoisonedSet that also lists the cross-mode samples (another image's trigger, labels
    kept, not poisoned) under WaNet's name for such samples, ``noise_indices``."""

    noise_indices: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))


class EncoderDecoder(nn.Module):
    """Image in [0, 1] -> map in (0, 1) of ``out_channels`` at the input's size, any size."""

    def __init__(self, in_channels: int, out_channels: int, width: int):
        super().__init__()
        self.enc1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.enc2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.enc3 = nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1)
        self.dec2 = nn.Conv2d(2 * width, width, 3, padding=1)
        self.dec1 = nn.Conv2d(width, width, 3, padding=1)
        self.out = nn.Conv2d(width, out_channels, 3, padding=1)
        self.norms = nn.ModuleList(nn.BatchNorm2d(c) for c in (width, 2 * width, 2 * width,
                                                                width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n1, n2, n3, n4, n5 = self.norms
        h1 = F.relu(n1(self.enc1(x)))
        h2 = F.relu(n2(self.enc2(h1)))
        h3 = F.relu(n3(self.enc3(h2)))
        u2 = F.relu(n4(self.dec2(F.interpolate(h3, size=h2.shape[-2:], mode="nearest"))))
        u1 = F.relu(n5(self.dec1(F.interpolate(u2, size=h1.shape[-2:], mode="nearest"))))
        return torch.tanh(self.out(u1)) / 2 + 0.5


def threshold(raw: torch.Tensor) -> torch.Tensor:
    """The paper's soft step: values of the mask network far from 0.5 go to 0 or 1."""
    return torch.tanh(20 * raw - 10) / 2 + 0.5


def stamp(x: torch.Tensor, pattern: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x + mask * (pattern - x)


def rms_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample root mean square difference (plus ε² under the root: the gradient of the root
    at 0, where two saturated masks agree exactly, would be infinite and make the weights NaN)."""
    return ((a - b).pow(2).flatten(1).mean(1) + EPSILON ** 2).sqrt()


def diversity_loss(x1: torch.Tensor, x2: torch.Tensor, out1: torch.Tensor,
                   out2: torch.Tensor) -> torch.Tensor:
    """mean(‖x₁ − x₂‖ / (‖out₁ − out₂‖ + ε)): small when different images get different
    outputs."""
    return (rms_distance(x1, x2) / (rms_distance(out1, out2) + EPSILON)).mean()


def density_loss(masks: torch.Tensor, density: float) -> torch.Tensor:
    """mean(relu(mean mask − density)): masks may cover at most ``density`` of the image."""
    return F.relu(masks.flatten(1).mean(1) - density).mean()


def build_network(shape: tuple[int, int, int], out_channels: int, width: int,
                  seed: int, stream: str) -> EncoderDecoder:
    """A seeded network (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(seed, stream))
        return EncoderDecoder(shape[0], out_channels, width)


def module_state(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{name}": tensor.detach().cpu().clone()
            for name, tensor in module.state_dict().items()}


def prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {name[len(prefix) + 1:]: tensor for name, tensor in state.items()
            if name.startswith(prefix + ".")}


def freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


def train_mask(mask_net: EncoderDecoder, data: ImageSet, *, epochs: int, batch_size: int,
               lr: float, density: float, lambda_norm: float, lambda_div: float, seed: int,
               device) -> EncoderDecoder:
    """Step 1: the mask network alone, on pairs (each image and the next in a shuffled batch)."""
    mask_net.to(device).train()
    optimiser = torch.optim.Adam(mask_net.parameters(), lr=lr, betas=BETAS)
    order_draw = generator(seed, "inputaware-mask-order")
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=order_draw)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            if len(rows) < 2:
                continue
            x = data.images[rows].to(device).float() / 255
            masks = threshold(mask_net(x))
            loss = (lambda_norm * density_loss(masks, density)
                    + lambda_div * diversity_loss(x, x.roll(1, 0), masks, masks.roll(1, 0)))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
    return freeze(mask_net)


class InputAwareBatches(BatchPoisoner):
    """Step 2 as a training hook: poisons each batch with the generator's own triggers and cross
    samples, and trains the generator alongside the classifier being trained."""

    stream = "inputaware-batches"

    def __init__(self, attack: "InputAware", target: int, seed: int, plan: PoisonPlan):
        super().__init__(attack, target, seed, plan)
        self.optimiser = torch.optim.Adam(attack.generator_.parameters(), lr=attack.lr,
                                          betas=BETAS)
        self.diversity = None

    def extra_count(self, batch_size: int, poisoned: int) -> int:
        return int(round(self.attack.cross_ratio * poisoned))

    def on_train_start(self, state: TrainState) -> None:
        self.attack.generator_.to(state.device).train().requires_grad_(True)
        freeze(self.attack.mask_.to(state.device))

    def on_batch(self, state: TrainState, batch: Batch) -> Batch:
        self.optimiser.zero_grad(set_to_none=True)
        self.diversity = None
        return super().on_batch(state, batch)

    def edit(self, state, batch, poisoned, extra):
        """Poisoned rows get their own trigger, extra rows another image's; keeps the graph to
        the generator, and the diversity term for :meth:`loss`."""
        x = batch.images
        partners = other_rows(poisoned, len(batch), self.draw)
        sources = other_rows(extra, len(batch), self.draw)
        device = x.device
        own, friends, donors = (x[r.to(device)] for r in (poisoned, partners, sources))
        patterns = self.attack.generator_(torch.cat((own, friends, donors)))
        p_own, p_friends, p_donors = patterns.split([len(own), len(friends), len(donors)])
        with torch.no_grad():
            masks = threshold(self.attack.mask_(torch.cat((own, donors))))
        m_own, m_donors = masks.split([len(own), len(donors)])
        rows = torch.cat((poisoned, extra)).to(device)
        values = torch.cat((stamp(own, p_own, m_own),
                            stamp(x[extra.to(device)], p_donors, m_donors)))
        if len(own):
            self.diversity = diversity_loss(own, friends, p_own, p_friends)
        return x.index_put((rows,), values)

    def loss(self, state, batch, logits, losses, loss):
        if self.diversity is None:
            return loss
        return loss + self.attack.lambda_div * self.diversity

    def after_step(self, state: TrainState, batch: Batch) -> None:
        self.optimiser.step()
        self.diversity = None

    def on_train_end(self, state: TrainState) -> None:
        freeze(self.attack.generator_)


@register_attack("inputaware")
@dataclass
class InputAware(TargetedFit):
    """x' = x + m(x) · (G(x) − x): an input-specific pattern G(x) through a sparse input-specific
    mask m(x); dirty label, with cross-mode samples."""

    #: all-to-all poisons with the generator as it is
    aim_all_to_all = False

    mode: str = "data"
    target: int | None = None
    cross_ratio: float = 1.0
    mask_density: float = 0.032
    lambda_div: float = 1.0
    lambda_norm: float = 100.0
    #: the paper's mask-only epochs (:mod:`eigenguard.budgets`: the report marks runs below them)
    paper_budget: ClassVar[dict] = {"mask_epochs": 25}
    mask_epochs: int = 2  # reduced for the CPU: the paper's 25
    epochs: int = 4  # reduced for the CPU: joint epochs of the fit
    train_size: int = 20000  # reduced for the CPU: most images the fit trains on
    batch_size: int = 128
    lr: float = 0.01
    width: int = 16
    helper_model: str = "small_cnn"
    helper_width: int = 16
    helper_epochs: int = 4
    helper_train_size: int = 30000

    def __post_init__(self):
        check_mode("InputAware", self.mode)
        self._check_settings()
        self._init_target("the class the generator is trained for")
        check_helper_settings("InputAware", self.helper_model, self.helper_width,
                              self.helper_epochs, self.helper_train_size)
        for name in ("cross_ratio", "mask_density", "lambda_div", "lambda_norm", "lr"):
            setattr(self, name, float(getattr(self, name)))
        for name in ("mask_epochs", "epochs", "train_size", "batch_size", "width",
                     "helper_width", "helper_epochs", "helper_train_size"):
            setattr(self, name, int(getattr(self, name)))
        self.generator_ = self.mask_ = None
        self._plan = None

    def _check_settings(self) -> None:
        reals = (("cross_ratio", 0, "cross-mode samples per poisoned sample"),
                 ("lambda_div", 0, "weight of the diversity losses"),
                 ("lambda_norm", 0, "weight of the mask-density loss"))
        for name, low, what in reals:
            value = getattr(self, name)
            if not is_real(value) or value < low:
                raise ValueError(f"InputAware {name} must be a number >= {low} ({what}), got "
                                 f"{value!r}")
        if not is_real(self.mask_density) or not 0 < self.mask_density <= 1:
            raise ValueError(f"InputAware mask_density must be a fraction in (0, 1] (the share "
                             f"of the image a mask may cover), got {self.mask_density!r}")
        if not is_real(self.lr) or self.lr <= 0:
            raise ValueError(f"InputAware lr must be a number > 0 (Adam's step for the two "
                             f"networks), got {self.lr!r}")
        counts = (("mask_epochs", 1, "epochs of mask-only training"),
                  ("epochs", 1, "joint epochs of the fit"),
                  ("train_size", 2, "most images the fit trains on"),
                  ("batch_size", 2, "images per step; pairs need two"),
                  ("width", 1, "channels of the networks' first layer"))
        for name, low, what in counts:
            value = getattr(self, name)
            if not is_integer(value) or value < low:
                raise ValueError(f"InputAware {name} must be an integer >= {low} ({what}), got "
                                 f"{value!r}")

    def check_label_mode_supported(self, label_mode: str) -> None:
        super().check_label_mode_supported(label_mode)
        refuse_all_to_all("InputAware", self.mode, label_mode)

    # -- fitting (fit and for_target: TargetedFit) ---------------------------------------------

    def _check_fit_data(self, train: ImageSet) -> None:
        if len(train) < 2:
            raise ValueError("InputAware learns its networks from the training set, which needs "
                             f"at least 2 images (pairs for the diversity loss), got {len(train)}")

    def _mask_settings(self) -> tuple:
        return (self.mask_density, self.lambda_div, self.lambda_norm, self.mask_epochs,
                self.train_size, self.batch_size, self.lr, self.width)

    def _aim(self, target: int) -> None:
        """The mask network, then the generator trained jointly with a copy of the fit's clean
        helper for ``target`` (both cached in-process)."""
        train, seed, device, helper = self._fit_context
        subset = train.subset(helper_subset(train, self.train_size, seed))
        shape = tuple(train.images.shape[1:])
        with single_thread():
            masks = cached_fit(("inputaware-mask", helper.cache_key, seed, self._mask_settings()),
                               lambda: self._fit_mask(subset, shape, seed, device))
            key = ("inputaware", helper.cache_key, seed, target, self.cross_ratio, self.epochs,
                   self._mask_settings())
            state = cached_fit(key, lambda: self._fit_generator(
                subset, shape, seed, device, masks, copy.deepcopy(helper), target))
        self.load_fitted_state(state)

    def _fit_mask(self, subset, shape, seed, device) -> dict[str, torch.Tensor]:
        mask_net = build_network(shape, 1, self.width, seed, "inputaware-mask-init")
        train_mask(mask_net, subset, epochs=self.mask_epochs, batch_size=self.batch_size,
                   lr=self.lr, density=self.mask_density, lambda_norm=self.lambda_norm,
                   lambda_div=self.lambda_div, seed=seed, device=device)
        return module_state("mask", mask_net)

    def _fit_generator(self, subset, shape, seed, device, masks, classifier,
                       target) -> dict[str, torch.Tensor]:
        """Step 2 with a copy of the helper as the classifier (the helper itself is kept clean
        for a later re-aim)."""
        self.mask_ = build_network(shape, 1, self.width, seed, "inputaware-mask-init")
        self.mask_.load_state_dict(prefixed(masks, "mask"))
        self.generator_ = build_network(shape, shape[0], self.width, seed,
                                        "inputaware-generator-init")
        classifier.requires_grad_(True)
        hook = InputAwareBatches(self, target, stream_seed(seed, "inputaware-fit"),
                                 PoisonPlan(FIT_RATIO, "all"))
        train(classifier, subset, TrainConfig(epochs=self.epochs, batch_size=self.batch_size,
                                              augment=False),
              seed=stream_seed(seed, "inputaware-train"), device=device, progress=False,
              description="inputaware", hooks=[hook])
        freeze(classifier)
        state = {**module_state("generator", self.generator_), **masks,
                 "shape_": torch.tensor(shape), "target_": torch.tensor([int(target)])}
        state.update(self._diagnostics(subset, classifier, target, device))
        return state

    def _diagnostics(self, data: ImageSet, classifier, target: int,
                     device) -> dict[str, torch.Tensor]:
        """The mean mask, and the share of non-target images the classifier sends to the target
        once triggered."""
        sample = data.images[:DIAGNOSTIC_SAMPLE]
        with torch.no_grad():
            density = threshold(self.mask_(sample.to(device).float() / 255)).mean()
            others = data.images[data.labels != target][:DIAGNOSTIC_SAMPLE]
            triggered = self._trigger(others.to(device), others.to(device))
            hits = (classifier(helper_input(triggered, data)).argmax(1) == target).double()
        rate = hits.mean().view(1).cpu() if len(others) else torch.zeros(1, dtype=torch.float64)
        return {"density_": density.double().view(1).cpu(), "surrogate_asr_": rate}

    # -- fitted state --------------------------------------------------------------------------

    def fitted_state(self) -> dict[str, torch.Tensor]:
        if self.generator_ is None:
            return {}
        return {**module_state("generator", self.generator_), **module_state("mask", self.mask_),
                "shape_": self.shape_.clone(), "target_": self.target_.clone(),
                "density_": self.density_.clone(), "surrogate_asr_": self.surrogate_asr_.clone()}

    def load_fitted_state(self, state: dict[str, torch.Tensor]) -> "InputAware":
        """Rebuild both networks from their saved weights (built for ``shape_``). :meth:`_aim`
        loads its result through here too, so the fit's helper is kept."""
        known = {"shape_", "target_", "density_", "surrogate_asr_"}
        unknown = [name for name in state if name not in known
                   and not name.startswith(("generator.", "mask."))]
        if unknown or not known <= set(state):
            raise ValueError(f"InputAware: unexpected fitted state (unknown entries "
                             f"{sorted(unknown)}, missing {sorted(known - set(state))})")
        shape = tuple(int(v) for v in state["shape_"])
        generator_net = EncoderDecoder(shape[0], shape[0], self.width)
        mask_net = EncoderDecoder(shape[0], 1, self.width)
        generator_net.load_state_dict(prefixed(state, "generator"))
        mask_net.load_state_dict(prefixed(state, "mask"))
        self.generator_, self.mask_ = freeze(generator_net), freeze(mask_net)
        for name in known:
            setattr(self, name, state[name].clone())
        return self

    # -- the trigger ---------------------------------------------------------------------------

    def _check_shape(self, images: torch.Tensor) -> None:
        check_images(images)
        self.check_fitted()
        shape = tuple(int(v) for v in self.shape_)
        if tuple(images.shape[1:]) != shape:
            raise ValueError(f"InputAware was fitted on images of shape {shape} (C, H, W) and "
                             f"cannot trigger images of shape {tuple(images.shape[1:])}: fit it "
                             f"on images of that shape")

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """Each image with its own trigger."""
        return self.apply_from(images, images)

    def apply_from(self, images: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
        """Each image with the trigger made from the matching image of ``sources`` (itself:
        :meth:`apply`; another image: a cross-mode sample)."""
        self._check_shape(images)
        self._check_shape(sources)
        return self._trigger(images, sources)

    def _trigger(self, images: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
        """The triggers, on the images' device; one CPU thread on the CPU, where the two small
        networks gain little from more and lose much on a busy machine (as the helper's training
        does, :func:`eigenguard.attacks.helpers.single_thread`)."""
        device = images.device
        self.generator_.to(device)
        self.mask_.to(device)
        out = torch.empty_like(images)
        threads = single_thread() if device.type == "cpu" else contextlib.nullcontext()
        with torch.no_grad(), threads:
            for start in range(0, len(images), CHUNK):
                x = images[start:start + CHUNK].float() / 255
                s = sources[start:start + CHUNK].to(device).float() / 255
                mixed = stamp(x, self.generator_(s), threshold(self.mask_(s)))
                out[start:start + CHUNK] = (mixed * 255).round().clamp(0, 255).to(torch.uint8)
        return out

    # -- poisoning -----------------------------------------------------------------------------

    def poison(self, train: ImageSet, ratio: float, target: int, seed: int, pool: str = "all",
               label_mode: str = "all-to-one") -> InputAwarePoisonedSet:
        """Train the generator for ``target`` if needed (:meth:`for_target`, all-to-one only),
        poison as the base class does, then give ``round(cross_ratio · poisoned)`` other samples
        the trigger of another training image, keeping their labels (``noise_indices``)."""
        self.check_label_mode_supported(label_mode)
        poisoned = super().poison(train, ratio, target, seed, pool, label_mode=label_mode)
        cross = self._cross_rows(poisoned, seed)
        images = poisoned.data.images.clone()
        if len(cross):
            draw = generator(seed, "inputaware-cross-sources")
            sources = other_rows(cross, len(train), draw)
            images[cross] = self.apply_from(train.images[cross], train.images[sources])
        result = InputAwarePoisonedSet(poisoned.data.with_images_labels(images,
                                                                        poisoned.data.labels),
                                       poisoned.poison_indices, poisoned.original_labels,
                                       poisoned.target, noise_indices=cross)
        if self.mode == "training":
            self._plan = PoisonPlan.of(result, train, ratio, pool, extra=cross)
        return result

    def _cross_rows(self, poisoned: PoisonedSet, seed: int) -> torch.Tensor:
        count = len(poisoned.poison_indices)
        wanted = int(round(self.cross_ratio * count))
        rest = (~poisoned.is_poisoned).nonzero().flatten()
        if wanted > len(rest):
            raise ValueError(
                f"InputAware cannot add {wanted} cross-mode samples (cross_ratio "
                f"{self.cross_ratio:g} × {count} poisoned): only {len(rest)} samples are not "
                f"poisoned; the poison ratio can be at most about 1 / (1 + cross_ratio) = "
                f"{1 / (1 + self.cross_ratio):.4f}")
        draw = generator(seed, "inputaware-cross")
        return rest[torch.randperm(len(rest), generator=draw)[:wanted]].sort().values

    # -- training mode -------------------------------------------------------------------------

    def training_hooks(self, target: int, seed: int, ratio: float | None = None) -> list:
        """Data mode: none. Training mode: the hook that poisons every batch and trains the
        generator alongside the victim (``ratio``: the share, by default :meth:`poison`'s)."""
        if self.mode == "data":
            return []
        self.check_fitted()
        self.for_target(target)
        return [InputAwareBatches(self, target, seed, plan_for("InputAware", self._plan, ratio))]
