"""Neural Cleanse (Wang et al., IEEE S&P 2019): reverse-engineer, for every class, the smallest
trigger that sends clean images to it; a class whose trigger is abnormally small is a backdoor
target; unlearn that trigger by fine-tuning on the clean reserve.

1. Reversal. For class c a trigger is a mask m (H × W, in [0, 1], shared by the channels) and a
   pattern p (C × H × W, in [0, 1]); a stamped image is x' = (1 − m) x + m p, in pixel space before
   normalisation. m and p are tanh-parametrised and optimised with Adam on the clean reserve to
   minimise CE(model(x'), c) + cost · |m|₁. The cost adapts as in the paper: it starts at
   ``init_cost`` and, after every pass over the reserve, counts the passes whose attack success
   (share of stamped images classified as c) reached ``success_threshold``: ``patience`` passes
   in a row above multiply it by ``cost_multiplier``, ``patience`` below divide it by
   ``cost_multiplier ** 1.5``. The trigger kept is the one with the smallest |m|₁ among the
   passes that reached the success threshold (the last one if none did; ``extra`` says which).
2. Detection. With n_c = |m_c|₁, the anomaly index of class c is
   |n_c − median(n)| / (1.4826 · MAD(n)) (MAD = median absolute deviation; 1.4826 makes it a
   consistent estimator of the standard deviation for normal data). A class whose mask norm is
   below the median and whose index exceeds ``anomaly_threshold`` (2, the paper's) is flagged.
3. Unlearning. If a class is flagged, the model is fine-tuned on the reserve with the shared
   loop, a :class:`StampReversedTrigger` hook stamping the reversed trigger of a flagged class
   on a share (``unlearn_share`` 20%, the paper's) of every batch while the images keep their
   true labels. If none is flagged, the model is returned unchanged and ``extra`` says so.

The model is reversed in evaluation mode with its parameters frozen; reversal never changes it.
After ``defend`` the reversed triggers stay on the defense as ``triggers_`` (one per class).

Defaults, and why:

- ``init_cost = 1e-3``, Adam ``lr = 0.1`` with betas (0.5, 0.9), ``success_threshold = 0.99``,
  ``cost_multiplier = 1.5``, ``anomaly_threshold = 2``, ``unlearn_share = 0.2``: the paper's.
- ``epochs = 20`` passes over the reserve per class, in batches of ``batch_size = 128``: the
  paper's code runs up to 1,000 passes per class (with early stopping). On a 2-core CPU a
  forward and backward pass of a width-16 PreAct-ResNet18 on a batch of 128 takes about 1.1 s,
  so 20 passes over a 600-image reserve (about 100 steps per class) cost about 2 min per class;
  on a GPU raise it. ``patience = 2`` (the paper's 5) so that the cost can adapt several times
  within these few passes; there is no early stopping for the same reason.
- ``unlearn_epochs = 10`` at ``unlearn_lr = 0.01``: the paper fine-tunes one epoch on 10% of
  the training set; the reserve is 5% (about 600 images at the benchmark's budget, five steps
  per epoch), so ten epochs give the unlearning a comparable number of steps, at the learning
  rate BackdoorBench's fine-tuning defenses use.
"""
from __future__ import annotations

from typing import ClassVar

import math
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data import ImageSet, normalize
from ..seeding import generator
from ..train import Batch, TrainHook, TrainState
from .anp import frozen, unfreeze
from .base import DefenseContext, DefenseResult
from .checks import check_fraction, check_integer, check_number
from .features import evaluation
from .registry import register_defense
from .repair import Repair, fine_tune

#: makes the median absolute deviation a consistent estimator of a normal standard deviation
MAD_CONSISTENCY = 1.4826


@dataclass
class ReversedTrigger:
    """A mask (1 × 1 × H × W) and a pattern (1 × C × H × W), both in [0, 1], on the CPU."""

    mask: torch.Tensor
    pattern: torch.Tensor

    def stamp(self, images: torch.Tensor) -> torch.Tensor:
        """x' = (1 − m) x + m p for float images in [0, 1]."""
        mask, pattern = self.mask.to(images.device), self.pattern.to(images.device)
        return (1 - mask) * images + mask * pattern

    @property
    def norm(self) -> float:
        return float(self.mask.abs().sum())


def anomaly_indices(norms: list[float]) -> list[float]:
    """|n − median| / (1.4826 · MAD) per class; a zero MAD counts every deviation as huge."""
    median = statistics.median(norms)
    mad = statistics.median(abs(n - median) for n in norms)
    scale = MAD_CONSISTENCY * mad
    if scale == 0:
        return [0.0 if n == median else 1e12 for n in norms]
    return [abs(n - median) / scale for n in norms]


def flag_targets(norms: list[float], indices: list[float], threshold: float) -> list[int]:
    """Classes with a small trigger (norm below the median) and an anomaly index > threshold."""
    median = statistics.median(norms)
    return [c for c, (n, a) in enumerate(zip(norms, indices)) if n < median and a > threshold]


def to_unit(param: torch.Tensor) -> torch.Tensor:
    return torch.tanh(param) / 2 + 0.5


def from_unit(value: torch.Tensor) -> torch.Tensor:
    """The tanh parameter of a value in [0, 1] (kept off the asymptotes)."""
    return torch.atanh((value - 0.5) * (2 - 1e-4))


class StampReversedTrigger(TrainHook):
    """Unlearning: stamp reversed triggers on the first ``share`` of each (shuffled) batch and
    keep the true labels, so the model learns to ignore them. With several flagged classes the
    stamped rows take their triggers in turn."""

    def __init__(self, triggers: list[ReversedTrigger], share: float):
        self.triggers = triggers
        self.share = share

    def on_batch(self, state: TrainState, batch: Batch) -> Batch:
        count = int(math.ceil(self.share * len(batch)))
        images = batch.images.clone()
        for turn, trigger in enumerate(self.triggers):
            rows = slice(turn, count, len(self.triggers))
            images[rows] = trigger.stamp(images[rows])
        return Batch(images, batch.labels, batch.indices)


@register_defense("nc")
@dataclass
class NeuralCleanse(Repair):
    """Neural Cleanse; settings in the module docstring."""

    #: the reference code's passes per class and early-stopping patience (:mod:`eigenguard.budgets`: the report marks runs below them)
    paper_budget: ClassVar[dict] = {"epochs": 1000, "patience": 5}
    epochs: int = 20
    batch_size: int = 128
    lr: float = 0.1
    init_cost: float = 1e-3
    cost_multiplier: float = 1.5
    patience: int = 2
    success_threshold: float = 0.99
    anomaly_threshold: float = 2.0
    unlearn_share: float = 0.2
    unlearn_epochs: int = 10
    unlearn_lr: float = 0.01

    def __post_init__(self):
        for name in ("epochs", "batch_size", "patience", "unlearn_epochs"):
            check_integer(f"NC {name}", getattr(self, name))
        for name in ("lr", "init_cost", "anomaly_threshold", "unlearn_lr"):
            check_number(f"NC {name}", getattr(self, name), low=0)
        check_number("NC cost_multiplier", self.cost_multiplier, low=1,
                     meaning="the factor the mask cost moves by")
        check_fraction("NC success_threshold", self.success_threshold)
        check_fraction("NC unlearn_share", self.unlearn_share)

    def reverse_trigger(self, model: nn.Module, reserve: ImageSet, target: int,
                        context: DefenseContext) -> tuple[ReversedTrigger, dict]:
        """The smallest-mask trigger found that sends the reserve to ``target``."""
        device = torch.device(context.device)
        channels, (height, width) = reserve.in_channels, reserve.image_size
        start = generator(context.seed, f"nc-init-{target}")
        mask_param = from_unit(torch.rand(1, 1, height, width, generator=start)).to(device)
        pattern_param = from_unit(torch.rand(1, channels, height, width,
                                             generator=start)).to(device)
        mask_param.requires_grad_(True)
        pattern_param.requires_grad_(True)
        optimiser = torch.optim.Adam([mask_param, pattern_param], lr=self.lr, betas=(0.5, 0.9))
        order_random = generator(context.seed, f"nc-batches-{target}")
        cost, above, below = self.init_cost, 0, 0
        best, best_norm, last_success = None, float("inf"), 0.0
        for _ in range(self.epochs):
            order = torch.randperm(len(reserve), generator=order_random)
            hits = seen = 0
            for rows in order.split(self.batch_size):
                x = reserve.images[rows].to(device).float().div_(255)
                mask, pattern = to_unit(mask_param), to_unit(pattern_param)
                stamped = (1 - mask) * x + mask * pattern
                logits = model(normalize(stamped, reserve.mean, reserve.std))
                goal = torch.full((len(rows),), target, dtype=torch.long, device=device)
                loss = F.cross_entropy(logits, goal) + cost * mask.abs().sum()
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                hits += int((logits.argmax(1) == target).sum())
                seen += len(rows)
            last_success = hits / seen
            with torch.no_grad():
                mask, pattern = to_unit(mask_param), to_unit(pattern_param)
            if last_success >= self.success_threshold and float(mask.sum()) < best_norm:
                best = ReversedTrigger(mask.detach().cpu(), pattern.detach().cpu())
                best_norm = best.norm
            above, below = (above + 1, 0) if last_success >= self.success_threshold else (0,
                                                                                          below + 1)
            if above >= self.patience:
                cost, above = cost * self.cost_multiplier, 0
            elif below >= self.patience:
                cost, below = cost / self.cost_multiplier ** 1.5, 0
        reached = best is not None
        if not reached:
            best = ReversedTrigger(mask.detach().cpu(), pattern.detach().cpu())
        return best, dict(reached=reached, final_cost=cost, last_success=last_success)

    def reverse_all(self, model: nn.Module, reserve: ImageSet, context: DefenseContext,
                    classes=None):
        """One reversed trigger per class (or per class of ``classes``), with the model frozen
        in evaluation mode."""
        classes = range(reserve.num_classes) if classes is None else classes
        flags = frozen(model)
        try:
            with evaluation(model):
                found = [self.reverse_trigger(model, reserve, c, context) for c in classes]
        finally:
            unfreeze(model, flags)
        return [trigger for trigger, _ in found], [info for _, info in found]

    def defend(self, context: DefenseContext) -> DefenseResult:
        reserve = context.clean_reserve
        model = context.backdoored_model().to(context.device)
        clock = time.monotonic()
        triggers, infos = self.reverse_all(model, reserve, context)
        self.triggers_ = triggers  # learned state, for inspection (not a setting)
        seconds_reverse = time.monotonic() - clock
        norms = [trigger.norm for trigger in triggers]
        indices = anomaly_indices(norms)
        flagged = flag_targets(norms, indices, self.anomaly_threshold)
        extra = dict(mask_norms=norms, anomaly_indices=indices, flagged_classes=flagged,
                     reversal_reached=[info["reached"] for info in infos],
                     reversal_success=[info["last_success"] for info in infos],
                     final_costs=[info["final_cost"] for info in infos],
                     reversal_epochs=self.epochs, seconds_reverse=seconds_reverse)
        if not flagged:
            extra.update(unlearned=False, unlearn_epochs=0,
                         note="no class flagged: the model is returned unchanged")
            return DefenseResult(model, extra=extra)
        clock = time.monotonic()
        hook = StampReversedTrigger([triggers[c] for c in flagged], self.unlearn_share)
        fine_tune(context, model, reserve, epochs=self.unlearn_epochs, lr=self.unlearn_lr,
                  hooks=[hook])
        extra.update(unlearned=True, unlearn_epochs=self.unlearn_epochs,
                     seconds_unlearn=time.monotonic() - clock)
        return DefenseResult(model, extra=extra)
