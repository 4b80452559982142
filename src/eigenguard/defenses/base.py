"""The defense interface: one entry point, ``defend(context) -> model``."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from torch import nn

from ..attacks import PoisonedSet
from ..data import ImageSet


@dataclass
class DefenseContext:
    """What the threat model lets a defense use.

    ``clean_subset`` is given only to defenses that may hold clean data (FT, NAD, ANP, ...);
    training-time defenses such as EigenGuard see the poisoned training set only.
    """

    poisoned: PoisonedSet
    build_model: Callable[[], nn.Module]
    train_model: Callable[[nn.Module, ImageSet], list]
    clean_subset: ImageSet | None = None


class Defense:
    """Base class: keyword settings in the constructor (a dataclass), the work in ``defend``."""

    uses_clean_data = False

    def settings(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Architecture changes the defense makes (used again to reload a checkpoint)."""
        return model

    def defend(self, context: DefenseContext) -> nn.Module:
        raise NotImplementedError
