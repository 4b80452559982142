"""No defense: train on the poisoned set as given (the undefended baseline)."""
from __future__ import annotations

from dataclasses import dataclass

from .base import Defense, DefenseContext, DefenseResult
from .registry import register_defense


@register_defense("none")
@dataclass
class NoDefense(Defense):
    def defend(self, context: DefenseContext) -> DefenseResult:
        model = context.build_model()
        context.train_model(model, context.train_set)
        return DefenseResult(model)
