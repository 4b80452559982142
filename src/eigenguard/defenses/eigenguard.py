"""EigenGuard as a defense: insert the layer, then train end to end on the poisoned set as usual.

Its models depend on the composition of their test batches, so it declares every evaluation
protocol (triggered, mixed, single, and running once the layer has running statistics) and says
which layer mode each protocol evaluates.
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import guarded_eval
from ..layer import EigenGuard, guard
from .base import Defense, DefenseContext, DefenseResult
from .registry import register_defense


@register_defense("eigenguard")
@dataclass
class EigenGuardDefense(Defense):
    """Layer settings (see :class:`eigenguard.EigenGuard`) plus where the layer goes."""

    k: int = 16
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

    protocols = tuple(guarded_eval.PROTOCOL_MODES)

    def __post_init__(self):
        self.layer_settings()  # validate now, not after the data set has loaded

    def layer_settings(self) -> dict:
        settings = dict(k=self.k, tail_scale=self.tail_scale, scale=self.scale, grad=self.grad,
                        eval_mode=self.eval_mode, track_running_stats=self.track_running_stats,
                        momentum=self.momentum, stats_every=self.stats_every,
                        sketch_rank=self.sketch_rank, method=self.method)
        EigenGuard(**settings)
        return settings

    def label(self) -> str:
        """k always (the setting the tables compare most), then the settings that differ from
        the defaults: ``eigenguard(k=16)``, ``eigenguard(k=16, scale=zero)``."""
        rest = [part for part in self.changed_settings() if not part.startswith("k=")]
        return f"eigenguard({', '.join([f'k={self.k}', *rest])})"

    def prepare_model(self, model):
        guard(model, after=self.after, **self.layer_settings())
        return model

    def protocols_for(self, model):
        return guarded_eval.protocols_for(model)

    def evaluation_mode(self, model, protocol):
        return guarded_eval.guards_in_mode(model, guarded_eval.PROTOCOL_MODES[protocol])

    def batch_independent(self, model, protocol):
        return guarded_eval.PROTOCOL_MODES[protocol] != "batch"

    def mixed_logits(self, model, test, triggered, *, seed, device, progress):
        return guarded_eval.mixed_logits(model, test, triggered, seed=seed, device=device,
                                         progress=progress)

    def defend(self, context: DefenseContext) -> DefenseResult:
        model = self.prepare_model(context.build_model())
        context.train_model(model, context.train_set)
        return DefenseResult(model)
