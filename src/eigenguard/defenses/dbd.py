"""Backdoor Defense via Decoupling (Huang et al., ICLR 2022): learn the features without the
labels, so the poisoned labels cannot tie the trigger to the target class.

A backdoor forms when supervised training groups the triggered images with the target class in
feature space. DBD decouples the network's training into four stages, all through the shared
loop:

1. **Self-supervised backbone** (``ssl_epochs``): SimCLR on the training images alone. The stage
   receives an image-only copy of the training set (:func:`unlabelled`, every label 0) and its
   hook replaces every label again before anything reads it; the loss is the NT-Xent loss of two
   augmented views of each image (``temperature``) through a projection head that stands in for
   the classifier during the stage. Triggered images then lie with the images they resemble,
   not with the target class.
2. **Linear head** (``head_epochs``) on the frozen backbone, with the symmetric cross-entropy
   (``sce_alpha`` · CE + ``sce_beta`` · reverse CE) on the poisoned labels. The reverse term is
   bounded, so mislabelled samples pull the head less than the plain cross-entropy lets them.
3. **Split**: the ``labelled_fraction`` of samples with the lowest loss under that head keep their
   labels; the rest, where a poisoned label disagrees with the features, lose them. The per-sample
   SCE is an increasing function of the per-sample cross-entropy, so ranking by
   :func:`~eigenguard.defenses.features.per_sample_losses` is ranking by SCE.
4. **Semi-supervised fine-tuning** (``semi_epochs``) of the whole network, MixMatch-style: for
   each unlabelled sample of a batch, the model's predictions on ``guesses`` augmentations are
   averaged and sharpened (``sharpen_temperature``) into a soft label; labelled samples keep their
   one-hot label; the whole batch is mixed up with ``lambda = max(l, 1 - l)``,
   ``l ~ Beta(mixup_alpha, mixup_alpha)``; the loss is the soft cross-entropy on the labelled part
   plus ``lambda_u`` (ramped up linearly over the stage) times the squared error on the
   unlabelled part.

What the semi-supervised stage keeps from DBD's MixMatch and what it drops: it keeps the guesses,
sharpening, mixup over labelled and unlabelled samples together, the two losses and the ramp of
``lambda_u``. It drops the separate labelled and unlabelled loaders with a fixed 1,024 iterations
per epoch (here each epoch passes once over the training set in the run's batches, labelled and
unlabelled samples mixed in the proportion of the split), the interleaving of BatchNorm batches
(the mixed batch goes through the network in one pass), and Adam at 0.002 (the shared loop's SGD
with the run's settings and a fresh cosine schedule).

``flagged`` reports the unlabelled half: the samples whose labels DBD discards. It is a split, not
a removal (they still train, without labels), so the harness's detection rates say how many
poisoned samples lost their labels; a false positive costs a label, not a sample.

Defaults and how they compare with the paper's. The paper trains SimCLR 1,000 epochs (BackdoorBench
100, batch 512), the head 10 epochs, and MixMatch 190 epochs of 1,024 iterations; SimCLR's
temperature 0.5, SCE α 0.1, β 1, ε 0.5, K 2, T 0.5, mixup α 0.75 and λ_u 15 are kept here. This
benchmark's victim trains 8 epochs (about 165 s on this CPU), so SimCLR gets the victim's 8 epochs
(BackdoorBench gives it the victim's 100; each epoch costs about two victim epochs, one per view),
the head keeps the paper's 10 epochs (they only run the frozen backbone forward, about a third of
a victim epoch each; with 2 the head of a small test network stayed near 30% accuracy and its
split kept the poison share at the base rate, with 6 it reached 66% and the labelled half held 2%
poison instead of 10%), and the semi-supervised stage gets 4 epochs (each costs about two victim
epochs: the guesses and a batch half again as large). In all about 28 victim epochs, reduced about
10× (SimCLR) to 50× (MixMatch) from BackdoorBench's.

Augmentations for SimCLR are tensor ops on whole batches, for grey 28×28 and colour 32×32 images
alike: random resized crop (area 0.2 to 1, aspect 3/4 to 4/3, bilinear), horizontal flip where the
data set allows it (``flip``: by default what the data set's registry entry says, no flip for an
unknown set), brightness and contrast jitter (±0.4, with probability 0.8), and for colour images
saturation jitter (±0.4) and greyscale (probability 0.2). Hue jitter and blur are left out.

An attack that poisons batches through training hooks acts in the stages that train on the
poisoned set itself (head and semi-supervised), not in the self-supervised one, which trains on
an image-only copy; DBD is meant for data poisoning.
"""
from __future__ import annotations

from typing import ClassVar

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy
import torch
import torch.nn.functional as F
from torch import nn

from ..data import ImageSet, augment_batch, dataset_info, list_datasets, normalize
from ..seeding import generator, stream_seed
from ..train import Batch, TrainHook, TrainState
from .base import Defense, DefenseContext, DefenseResult
from .checks import check_integer, check_number
from .features import classifier_layer, per_sample_losses
from .registry import register_defense

#: labels of the samples in the reverse cross-entropy are one-hot vectors clamped to this floor
REVERSE_CE_FLOOR = 1e-4


# -- stage 1: SimCLR ----------------------------------------------------------------------------

def unlabelled(data: ImageSet) -> ImageSet:
    """The training images without their labels (every label 0): what the self-supervised stage
    receives, so that it cannot read a label."""
    return data.with_images_labels(data.images, torch.zeros(len(data), dtype=torch.int64))


def _uniform(count: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(count, generator=gen)


def random_resized_crop(images: torch.Tensor, gen: torch.Generator, *, flip: bool,
                        scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """Crop a random window (area ``scale``, aspect ``ratio``) of each image and resize it back to
    the full size, mirrored at random when ``flip``: one affine resampling of the whole batch."""
    n = images.shape[0]
    area = _uniform(n, *scale, gen)
    aspect = torch.exp(_uniform(n, math.log(ratio[0]), math.log(ratio[1]), gen))
    width = torch.sqrt(area * aspect).clamp(max=1.0)  # fractions of the image side
    height = torch.sqrt(area / aspect).clamp(max=1.0)
    centre_x = (1 - width) * (2 * torch.rand(n, generator=gen) - 1)  # window inside the image
    centre_y = (1 - height) * (2 * torch.rand(n, generator=gen) - 1)
    mirror = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0) if flip else torch.ones(n)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = width * mirror, centre_x
    theta[:, 1, 1], theta[:, 1, 2] = height, centre_y
    grid = F.affine_grid(theta.to(images.device, images.dtype), list(images.shape),
                         align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border",
                         align_corners=False)


def colour_jitter(images: torch.Tensor, gen: torch.Generator, *, strength: float = 0.4,
                  p: float = 0.8, grey_p: float = 0.2) -> torch.Tensor:
    """Brightness and contrast jitter (and, on colour images, saturation jitter and greyscale),
    each image with probability ``p``; values stay in [0, 1]."""
    n, channels = images.shape[:2]
    device, shape = images.device, (n, 1, 1, 1)
    applied = (torch.rand(n, generator=gen) < p).float()

    def factor():
        drawn = _uniform(n, 1 - strength, 1 + strength, gen)
        return (1 + applied * (drawn - 1)).view(shape).to(device)

    out = images * factor()
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * factor() + mean
    if channels == 3:
        grey = (out * out.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        out = (out - grey) * factor() + grey
        to_grey = (torch.rand(n, generator=gen) < grey_p).view(shape).to(device)
        out = torch.where(to_grey, grey.expand_as(out), out)
    return out.clamp(0, 1)


def simclr_view(images: torch.Tensor, gen: torch.Generator, *, flip: bool) -> torch.Tensor:
    """One random view of a batch of [0, 1] images."""
    return colour_jitter(random_resized_crop(images, gen, flip=flip), gen)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss: each view must pick its partner among the other 2N - 1 views by cosine
    similarity / ``temperature``."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    similarity = z @ z.t() / temperature
    similarity.fill_diagonal_(float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(similarity, partner)


class StageLabel(TrainHook):
    """Marks the epoch records of a stage, so the run's history says which stage it was."""

    def __init__(self, name: str):
        self.name = name

    def on_epoch_end(self, state: TrainState, record: dict) -> None:
        record["stage"] = self.name


class SimCLRViews(StageLabel):
    """Turns a batch of N images into 2N views with no labels, and the loss into NT-Xent on the
    projections (the model's head is the projection head during this stage)."""

    def __init__(self, temperature: float, gen: torch.Generator, *, flip: bool):
        super().__init__("dbd-simclr")
        self.temperature, self.gen, self.flip = temperature, gen, flip

    def on_batch(self, state, batch):
        views = torch.cat([simclr_view(batch.images, self.gen, flip=self.flip),
                           simclr_view(batch.images, self.gen, flip=self.flip)])
        no_labels = torch.zeros(views.shape[0], dtype=torch.int64, device=views.device)
        return Batch(views, no_labels, torch.cat([batch.indices, batch.indices]))

    def loss(self, state, batch, logits, losses, loss):
        half = logits.shape[0] // 2
        return nt_xent(logits[:half], logits[half:], self.temperature)


def projection_head(features: int, dim: int) -> nn.Module:
    """SimCLR's two-layer projection, in place of the classifier while the backbone learns."""
    return nn.Sequential(nn.Linear(features, features), nn.ReLU(inplace=True),
                         nn.Linear(features, dim))


@contextmanager
def head_replaced(model: nn.Module, head: nn.Module):
    """``model.classifier`` is ``head`` inside the block and the original one again after it."""
    original = classifier_layer(model)
    model.classifier = head.to(next(original.parameters()).device)
    try:
        yield model
    finally:
        model.classifier = original


# -- stage 2: the linear head -------------------------------------------------------------------

def symmetric_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, alpha: float,
                            beta: float) -> torch.Tensor:
    """Per-sample ``alpha`` · CE + ``beta`` · reverse CE (the labels' one-hot clamped to 1e-4)."""
    ce = F.cross_entropy(logits, labels, reduction="none")
    p_label = logits.softmax(1).gather(1, labels[:, None]).squeeze(1)
    reverse = -math.log(REVERSE_CE_FLOOR) * (1 - p_label)
    return alpha * ce + beta * reverse


class FrozenBackboneSCE(StageLabel):
    """Keeps the backbone in evaluation mode (its BatchNorm statistics fixed) while the head
    trains with the symmetric cross-entropy."""

    def __init__(self, alpha: float, beta: float):
        super().__init__("dbd-head")
        self.alpha, self.beta = alpha, beta

    def on_epoch_start(self, state):
        state.model.eval()
        classifier_layer(state.model).train()

    def loss(self, state, batch, logits, losses, loss):
        return symmetric_cross_entropy(logits, batch.labels, alpha=self.alpha,
                                       beta=self.beta).mean()


@contextmanager
def only_head_trainable(model: nn.Module):
    """Every parameter but the classifier's frozen inside the block."""
    head = {id(p) for p in classifier_layer(model).parameters()}
    frozen = [p for p in model.parameters() if id(p) not in head and p.requires_grad]
    for parameter in frozen:
        parameter.requires_grad_(False)
    try:
        yield model
    finally:
        for parameter in frozen:
            parameter.requires_grad_(True)


# -- stage 3: the split -------------------------------------------------------------------------

def low_loss_split(losses: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean mask of the ``fraction`` of samples with the lowest loss (at least one, never
    all; ties broken by position)."""
    count = max(1, min(len(losses) - 1, int(round(fraction * len(losses)))))
    keep = torch.zeros(len(losses), dtype=torch.bool)
    keep[torch.sort(losses, stable=True).indices[:count]] = True
    return keep


# -- stage 4: MixMatch-style fine-tuning --------------------------------------------------------

def sharpen(probabilities: torch.Tensor, temperature: float) -> torch.Tensor:
    powered = probabilities ** (1 / temperature)
    return powered / powered.sum(1, keepdim=True)


class MixMatch(StageLabel):
    """Soft labels for the unlabelled samples of each batch, mixup of the whole batch, and the
    labelled + ramped unlabelled loss (see the module docstring)."""

    def __init__(self, labelled: torch.Tensor, num_classes: int, *, guesses: int,
                 temperature: float, mixup_alpha: float, lambda_u: float, flip: bool, seed: int):
        super().__init__("dbd-semi")
        self.labelled, self.num_classes = labelled, num_classes
        self.guesses, self.temperature = guesses, temperature
        self.mixup_alpha, self.lambda_u, self.flip = mixup_alpha, lambda_u, flip
        self.gen = generator(seed, "dbd-mixmatch")
        self.beta = numpy.random.default_rng(stream_seed(seed, "dbd-mixup"))
        self._targets: torch.Tensor | None = None
        self._labelled_count = 0

    def _augment(self, images: torch.Tensor) -> torch.Tensor:
        return augment_batch(images, crop_padding=max(1, images.shape[-1] // 8), flip=self.flip,
                             generator=self.gen)

    @torch.no_grad()
    def _guess(self, state: TrainState, views: list[torch.Tensor]) -> torch.Tensor:
        data = state.data
        mean = sum(state.model(normalize(v, data.mean, data.std)).softmax(1) for v in views)
        return sharpen(mean / len(views), self.temperature)

    def on_batch(self, state, batch):
        labelled = self.labelled[batch.indices].to(batch.images.device)
        x_l, x_u = batch.images[labelled], batch.images[~labelled]
        targets = [F.one_hot(batch.labels[labelled], self.num_classes).float()]
        views = [x_u] + [self._augment(x_u) for _ in range(self.guesses - 1)]
        if x_u.shape[0]:
            targets += [self._guess(state, views)] * len(views)
        inputs, targets = torch.cat([x_l, *views]), torch.cat(targets)
        indices = torch.cat([batch.indices[labelled.cpu()]]
                            + [batch.indices[~labelled.cpu()]] * len(views))
        lam = float(self.beta.beta(self.mixup_alpha, self.mixup_alpha))
        lam = max(lam, 1 - lam)
        perm = torch.randperm(inputs.shape[0], generator=self.gen).to(inputs.device)
        mixed = lam * inputs + (1 - lam) * inputs[perm]
        self._targets = lam * targets + (1 - lam) * targets[perm]
        self._labelled_count = x_l.shape[0]
        return Batch(mixed, self._targets.argmax(1), indices)

    def unlabelled_weight(self, state: TrainState) -> float:
        """``lambda_u`` ramped up linearly over the stage's steps."""
        total = state.config.epochs * state.steps_per_epoch
        return self.lambda_u * min(1.0, state.step / max(1, total))

    def loss(self, state, batch, logits, losses, loss):
        n, targets = self._labelled_count, self._targets
        total = logits.new_zeros(())
        if n:
            total = total - (logits[:n].log_softmax(1) * targets[:n]).sum(1).mean()
        if n < logits.shape[0]:
            squared = (logits[n:].softmax(1) - targets[n:]).pow(2).mean()
            total = total + self.unlabelled_weight(state) * squared
        return total


# -- the defense --------------------------------------------------------------------------------

def dataset_allows_flip(data: ImageSet) -> bool:
    """What the data set's registry entry says about mirroring; no flip for an unknown set."""
    return data.name in list_datasets() and dataset_info(data.name).flip


@register_defense("dbd")
@dataclass
class DecouplingDefense(Defense):
    """SimCLR backbone, SCE head, low-loss split, MixMatch-style fine-tuning (see the module
    docstring for the stages and the defaults)."""

    #: BackdoorBench's SimCLR epochs and the paper's MixMatch epochs (of 1,024 iterations each) (:mod:`eigenguard.budgets`: the report marks runs below them)
    paper_budget: ClassVar[dict] = {"ssl_epochs": 100, "semi_epochs": 190}
    ssl_epochs: int = 8
    temperature: float = 0.5
    projection_dim: int = 128
    ssl_lr: float | None = None
    head_epochs: int = 10
    sce_alpha: float = 0.1
    sce_beta: float = 1.0
    labelled_fraction: float = 0.5
    semi_epochs: int = 4
    guesses: int = 2
    sharpen_temperature: float = 0.5
    mixup_alpha: float = 0.75
    lambda_u: float = 15.0
    flip: bool | None = None

    clean_data = False
    starts_from = "scratch"

    def __post_init__(self):
        check_integer("ssl_epochs", self.ssl_epochs)
        check_number("temperature", self.temperature, low=0)
        check_integer("projection_dim", self.projection_dim)
        check_number("ssl_lr", self.ssl_lr, low=0, optional=True,
                     meaning="None: the run's learning rate")
        check_integer("head_epochs", self.head_epochs)
        check_number("sce_alpha", self.sce_alpha, low=0, open_low=False)
        check_number("sce_beta", self.sce_beta, low=0, open_low=False)
        if self.sce_alpha == 0 and self.sce_beta == 0:
            raise ValueError("sce_alpha and sce_beta are both 0: the head would have no loss; "
                             "give at least one a positive weight")
        check_number("labelled_fraction", self.labelled_fraction, low=0.0, high=1.0,
                     meaning="1.0 would keep every label and leave nothing unlabelled")
        check_integer("semi_epochs", self.semi_epochs)
        check_integer("guesses", self.guesses)
        check_number("sharpen_temperature", self.sharpen_temperature, low=0)
        check_number("mixup_alpha", self.mixup_alpha, low=0)
        check_number("lambda_u", self.lambda_u, low=0, open_low=False)
        if self.flip is not None and not isinstance(self.flip, bool):
            raise ValueError(f"flip must be True, False or None (the data set's default), "
                             f"got {self.flip!r}")

    def uses_flip(self, data: ImageSet) -> bool:
        return dataset_allows_flip(data) if self.flip is None else self.flip

    def learn_backbone(self, context: DefenseContext, model: nn.Module, images: ImageSet,
                       *, flip: bool) -> list[dict]:
        """Stage 1: SimCLR on ``images`` (an image-only set: see :func:`unlabelled`)."""
        head = projection_head(classifier_layer(model).in_features, self.projection_dim)
        hook = SimCLRViews(self.temperature, generator(context.seed, "dbd-simclr-views"),
                           flip=flip)
        overrides = dict(epochs=self.ssl_epochs, schedule="cosine", augment=False)
        if self.ssl_lr is not None:
            overrides["lr"] = self.ssl_lr
        with head_replaced(model, head):
            return context.train_model(model, images, hooks=[hook], **overrides)

    def train_head(self, context: DefenseContext, model: nn.Module) -> list[dict]:
        """Stage 2: the linear classifier on the frozen backbone, with the SCE loss."""
        with only_head_trainable(model):
            return context.train_model(model, context.train_set,
                                       hooks=[FrozenBackboneSCE(self.sce_alpha, self.sce_beta)],
                                       epochs=self.head_epochs, schedule="cosine")

    def split(self, context: DefenseContext, model: nn.Module) -> tuple[torch.Tensor,
                                                                        torch.Tensor]:
        """Stage 3: (labelled mask, per-sample losses) under the trained head."""
        losses = per_sample_losses(model, context.train_set, device=context.device)
        return low_loss_split(losses, self.labelled_fraction), losses

    def fine_tune(self, context: DefenseContext, model: nn.Module, labelled: torch.Tensor,
                  *, flip: bool) -> list[dict]:
        """Stage 4: MixMatch-style training of the whole network."""
        hook = MixMatch(labelled, context.train_set.num_classes, guesses=self.guesses,
                        temperature=self.sharpen_temperature, mixup_alpha=self.mixup_alpha,
                        lambda_u=self.lambda_u, flip=flip, seed=context.seed)
        return context.train_model(model, context.train_set, hooks=[hook],
                                   epochs=self.semi_epochs, schedule="cosine")

    def defend(self, context: DefenseContext) -> DefenseResult:
        data, seconds = context.train_set, {}
        flip = self.uses_flip(data)
        model = context.build_model()
        clock = time.monotonic()
        ssl_history = self.learn_backbone(context, model, unlabelled(data), flip=flip)
        seconds["simclr"] = time.monotonic() - clock
        clock = time.monotonic()
        self.train_head(context, model)
        seconds["head"] = time.monotonic() - clock
        clock = time.monotonic()
        labelled, losses = self.split(context, model)
        seconds["split"] = time.monotonic() - clock
        clock = time.monotonic()
        self.fine_tune(context, model, labelled, flip=flip)
        seconds["semi"] = time.monotonic() - clock
        threshold = float(losses[labelled].max())
        return DefenseResult(model, flagged=(~labelled).nonzero().flatten(), extra=dict(
            flagged_means="labels dropped for semi-supervised training, samples kept",
            labelled=int(labelled.sum()), unlabelled=int((~labelled).sum()),
            split_ce_threshold=threshold,
            split_sce_threshold=float(self.sce_alpha * threshold - self.sce_beta
                                      * math.log(REVERSE_CE_FLOOR) * (1 - math.exp(-threshold))),
            simclr_final_loss=float(ssl_history[-1]["loss"]) if ssl_history else None,
            flip=flip, ssl_epochs=self.ssl_epochs, head_epochs=self.head_epochs,
            semi_epochs=self.semi_epochs, seconds=seconds))
