"""Post-training repairs: start from the backdoored model of the same setup and repair it with
the clean reserve (FT, FP, NAD, ANP, NC). Their threat model grants the clean reserve, and
``clean_data = True`` is how they claim it."""
from __future__ import annotations

from torch import nn

from ..data import ImageSet
from .base import Defense, DefenseContext


class Repair(Defense):
    """Base class of the repairs: clean-data rights, start from the backdoored model."""

    clean_data = True
    starts_from = "backdoored"


def fine_tune(context: DefenseContext, model: nn.Module, data: ImageSet, *, epochs: int,
              lr: float, hooks=(), schedule: str = "cosine") -> list[dict]:
    """Train ``model`` on ``data`` with the shared loop: the run's batch size, momentum, weight
    decay and augmentation, a fresh cosine schedule from ``lr`` over ``epochs``."""
    return context.train_model(model, data, hooks=hooks, epochs=epochs, lr=lr,
                               schedule=schedule)
