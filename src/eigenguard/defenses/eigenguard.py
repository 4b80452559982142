"""EigenGuard as a defense: insert the layer, then train end to end on the poisoned set as usual."""
from __future__ import annotations

from dataclasses import dataclass

from ..layer import EigenGuard, guard
from .base import Defense, DefenseContext
from .registry import register_defense


@register_defense("eigenguard")
@dataclass
class EigenGuardDefense(Defense):
    """Layer settings (see :class:`eigenguard.EigenGuard`) plus where the layer goes."""

    k: int = 32
    tail_scale: float = 1e-3
    scale: str = "kth"
    after: str = "layer1"
    grad: str = "detach"
    eval_mode: str = "running"
    track_running_stats: bool = True
    momentum: float = 0.1
    stats_every: int = 2
    sketch_rank: int | None = None
    method: str = "gram"

    def __post_init__(self):
        self.layer_settings()  # validate now, not after the data set has loaded

    def layer_settings(self) -> dict:
        settings = dict(k=self.k, tail_scale=self.tail_scale, scale=self.scale, grad=self.grad,
                        eval_mode=self.eval_mode, track_running_stats=self.track_running_stats,
                        momentum=self.momentum, stats_every=self.stats_every,
                        sketch_rank=self.sketch_rank, method=self.method)
        EigenGuard(**settings)
        return settings

    def prepare_model(self, model):
        guard(model, after=self.after, **self.layer_settings())
        return model

    def defend(self, context: DefenseContext):
        model = self.prepare_model(context.build_model())
        context.train_model(model, context.poisoned.data)
        return model
