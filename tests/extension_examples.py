"""One attack and one defense of each kind, each written as docs/EXTENDING.md describes.

Importing this module registers them; tests run them through `eigenguard run` unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from eigenguard.attacks import Attack, register_attack
from eigenguard.attacks.base import check_images
from eigenguard.defenses import Defense, DefenseContext, DefenseResult, register_defense
from eigenguard.train import TrainHook


# -- attacks ----------------------------------------------------------------------------------

@register_attack("example-static")
@dataclass
class CornerDot(Attack):
    """Static: the trigger is a function of the settings only (a bright top-left square)."""

    size: int = 3

    def apply(self, images):
        check_images(images)
        out = images.clone()
        out[..., :self.size, :self.size] = 255
        return out


@register_attack("example-fitted")
@dataclass
class RandomPatch(Attack):
    """Fitted: ``fit`` draws a random 4x4 patch (its state, ``patch_``) from the training set's
    shape; evaluation must use that very patch."""

    needs_fit = True
    size: int = 4

    def fit(self, train, *, seed=0, device="cpu"):
        generator = torch.Generator().manual_seed(seed)
        self.patch_ = torch.randint(0, 256, (train.in_channels, self.size, self.size),
                                    generator=generator, dtype=torch.int64).to(torch.uint8)
        return self

    def apply(self, images):
        check_images(images)
        self.check_fitted()
        out = images.clone()
        out[..., -self.size:, -self.size:] = self.patch_
        return out


class StampBatches(TrainHook):
    """Stamps the trigger on a share of every training batch and relabels those samples."""

    def __init__(self, attack, target, rate, seed):
        self.attack, self.target, self.rate = attack, target, rate
        self.generator = torch.Generator().manual_seed(seed)

    def on_batch(self, state, batch):
        chosen = torch.rand(len(batch), generator=self.generator) < self.rate
        if chosen.any():
            stamped = self.attack.apply((batch.images[chosen] * 255).round().to(torch.uint8))
            batch.images[chosen] = stamped.to(batch.images.dtype) / 255
            batch.labels[chosen] = self.target
        return batch


@register_attack("example-training")
@dataclass
class TrainingControlled(CornerDot):
    """Training-controlled: poisons each batch through a training hook (the run's poison ratio
    may be 0: the data set handed to defenses is then clean)."""

    rate: float = 0.1

    def training_hooks(self, target, seed):
        return [StampBatches(self, target, self.rate, seed)]


# -- defenses ---------------------------------------------------------------------------------

class Flooding(TrainHook):
    """The flooding loss |L - b| + b (ABL's isolation stage uses it)."""

    def __init__(self, level):
        self.level = level

    def loss(self, state, batch, logits, losses, loss):
        return (loss - self.level).abs() + self.level


@register_defense("example-training-time")
@dataclass
class FloodedTraining(Defense):
    """Training-time: trains from scratch on the poisoned set with a loss hook."""

    level: float = 0.1

    def defend(self, context: DefenseContext) -> DefenseResult:
        model = context.build_model()
        context.train_model(model, context.train_set, hooks=[Flooding(self.level)])
        return DefenseResult(model)


@register_defense("example-finetune")
@dataclass
class FineTune(Defense):
    """Post-training with clean data: fine-tunes the backdoored model on the clean reserve."""

    clean_data = True
    starts_from = "backdoored"
    epochs: int = 2
    lr: float = 0.01

    def defend(self, context: DefenseContext) -> DefenseResult:
        model = context.backdoored_model()
        context.train_model(model, context.clean_reserve, epochs=self.epochs, lr=self.lr)
        return DefenseResult(model)


@register_defense("example-detector")
@dataclass
class LossDetector(Defense):
    """Detector: flags the samples a one-epoch probe fits worst (highest loss: a flipped label
    disagrees with the image until the trigger is learned), drops them and retrains from
    scratch; the harness scores what it flags."""

    share: float = 0.15

    def defend(self, context: DefenseContext) -> DefenseResult:
        data = context.train_set
        probe = context.build_model()
        context.train_model(probe, data, epochs=1)
        probe.eval()
        with torch.no_grad():
            x = data.images.float().div(255)
            x = (x - torch.tensor(data.mean).view(-1, 1, 1)) / torch.tensor(data.std).view(-1, 1, 1)
            losses = F.cross_entropy(probe(x), data.labels, reduction="none")
        flagged = losses.argsort(descending=True)[:int(self.share * len(data))].sort().values
        keep = torch.ones(len(data), dtype=torch.bool)
        keep[flagged] = False
        model = context.build_model()
        context.train_model(model, data.subset(keep))
        return DefenseResult(model, flagged=flagged, extra={"threshold": float(losses[flagged].min())})


@dataclass
class Greedy(Defense):
    """Breaks its threat model: asks for clean data without the right (registered only inside
    the test that shows it fails)."""

    def defend(self, context: DefenseContext) -> DefenseResult:
        context.clean_reserve
        raise AssertionError("unreachable")
