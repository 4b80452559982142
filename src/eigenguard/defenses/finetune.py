"""Fine-tuning (FT): train the backdoored model a little longer on clean data.

The simplest repair and the baseline every other one is measured against. Training on clean
images alone gives the trigger no reason to keep its meaning, and the drift of the weights under a
fresh learning-rate schedule wears the backdoor down, more for some attacks than for others.

Defaults, from BackdoorBench's FT on CIFAR-10 (5% of the training set as clean data, SGD at lr
0.01, momentum and weight decay as in victim training, a cosine schedule), with the epochs scaled:
BackdoorBench fine-tunes for 100 epochs; here 10. On the benchmark's 12,000-image budget the
reserve holds about 600 images, so 10 epochs are some 6,000 sample passes, an eighth of the
four-epoch victim training, where 100 epochs would cost more than training the victim did on a
2-core CPU. The learning rate stays 0.01: high enough to move the weights (the victim's one-cycle
schedule ends near zero), low enough that 600 images do not make the model forget the task. Batch
size, momentum, weight decay and augmentation are the run's own (``context.train_model``), and so
are its seeded random streams: FT draws no randomness of its own.
"""
from __future__ import annotations

from typing import ClassVar

import time
from dataclasses import dataclass

from .base import DefenseContext, DefenseResult
from .checks import check_integer, check_number
from .registry import register_defense
from .repair import Repair, fine_tune


def final_record(history: list[dict]) -> dict:
    """The last epoch's loss and training accuracy, for ``DefenseResult.extra``."""
    if not history:
        return {}
    last = history[-1]
    return dict(final_loss=float(last["loss"]), final_train_acc=float(last["train_acc"]))


@register_defense("ft")
@dataclass
class FineTune(Repair):
    """Fine-tune the backdoored model on the clean reserve (``epochs`` at ``lr``, cosine)."""

    #: BackdoorBench's fine-tuning epochs (:mod:`eigenguard.budgets`: the report marks runs below them)
    paper_budget: ClassVar[dict] = {"epochs": 100}
    epochs: int = 10
    lr: float = 0.01

    def __post_init__(self):
        check_integer("epochs", self.epochs)
        check_number("lr", self.lr, low=0)

    def defend(self, context: DefenseContext) -> DefenseResult:
        reserve = context.clean_reserve  # the threat model is checked before any work
        model = context.backdoored_model()
        clock = time.monotonic()
        history = fine_tune(context, model, reserve, epochs=self.epochs, lr=self.lr)
        return DefenseResult(model, extra=dict(
            reserve_size=len(reserve), epochs=self.epochs,
            seconds_fine_tune=time.monotonic() - clock, **final_record(history)))
