"""Detect and retrain: score the poisoned training set with a model trained on it, remove the
samples flagged as poison, train a fresh model on the rest (Spectral Signatures, Activation
Clustering, SPECTRE).

The scoring model is the stored undefended model of the same setup: it is exactly the model such
a detector trains first on the poisoned set (same data, same loop, same seed), so reusing it costs
nothing and changes nothing. The detector never sees the poison indices; the harness scores its
flags (TPR, FPR). Retraining uses the shared loop on the kept samples; an attack that controls
training through hooks (``mode: training``) acts only on the full poisoned set, so these
detectors are meant for the data-poisoning threat model.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import Defense, DefenseContext, DefenseResult
from .checks import invalid


def removal_count(train_size: int, expected_poison_ratio: float, removal_factor: float) -> int:
    """How many samples to remove: ``removal_factor`` × the poison count the defender assumes
    (Tran et al. remove 1.5 × an assumed upper bound; the true ratio is never read)."""
    return min(train_size - 1, int(round(removal_factor * expected_poison_ratio * train_size)))


def check_class_share(name: str, factor: float, expected_poison_ratio: float) -> None:
    """Cross-setting check (after each setting's own): ``factor`` × ``expected_poison_ratio`` is
    the share of each class removed (or trimmed), so it must stay below 1."""
    if factor * expected_poison_ratio >= 1:
        raise invalid(name, factor, f"a number whose product with expected_poison_ratio "
                      f"({expected_poison_ratio}) is below 1", "a share of each class")


class DetectAndRetrain(Defense):
    """Base class: subclasses implement ``flag(model, context) -> indices``, and may leave
    numbers worth recording (thresholds, per-class scores) in ``self.detection_``, which join
    the result's ``extra``."""

    starts_from = "backdoored"

    def flag(self, model: nn.Module, context: DefenseContext) -> torch.Tensor:
        raise NotImplementedError

    def defend(self, context: DefenseContext) -> DefenseResult:
        scorer = context.backdoored_model()
        flagged = torch.as_tensor(self.flag(scorer, context), dtype=torch.long).unique()
        keep = torch.ones(len(context.train_set), dtype=torch.bool)
        keep[flagged] = False
        if not keep.any():
            raise ValueError(f"{type(self).__name__} flagged every training sample; nothing is "
                             "left to retrain on: lower its removal settings")
        model = context.build_model()
        context.train_model(model, context.train_set.subset(keep.nonzero().flatten()))
        return DefenseResult(model, flagged=flagged,
                             extra=dict(removed=int(flagged.numel()), kept=int(keep.sum()),
                                        **getattr(self, "detection_", {})))
