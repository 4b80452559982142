"""The defense interface: one entry point, ``defend(context) -> DefenseResult``.

The threat model lives here, in what the context holds. Every defense gets the *poisoned*
training set as the victim would receive it (images and possibly wrong labels), without the
poison indices and without the original labels, plus a model factory and the shared trainer.
Only a defense that declares clean-data rights (``clean_data = True``: FT, FP, NAD, ANP, NC)
receives the clean reserve; any other defense that asks for it gets a ThreatModelError.
Post-training defenses (``starts_from = "backdoored"``) also get the already-trained undefended
model of the same setup. The harness keeps the ground truth and scores what a defense flags.
"""
from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..budgets import reduced_budget
from ..data import ImageSet
from ..errors import EigenGuardError
from ..settings import changed_settings

#: how a defense obtains its model: trains one from scratch, or repairs the backdoored one
STARTS_FROM = ("scratch", "backdoored")


class ThreatModelError(EigenGuardError, PermissionError):
    """A defense asked for something its threat model does not give it."""


@dataclass
class DefenseResult:
    """A defense's model and, for detectors, the training samples it flagged or removed."""

    model: nn.Module
    flagged: torch.Tensor | None = None  # indices into context.train_set
    extra: dict = field(default_factory=dict)  # numbers worth recording (thresholds, costs)


class DefenseContext:
    """What the threat model lets a defense use (see the module docstring)."""

    def __init__(self, train_set: ImageSet, build_model: Callable[[], nn.Module],
                 train_model: Callable[..., list], *, seed: int, device: str | torch.device,
                 clean_reserve: ImageSet | None = None, clean_rights: bool = False,
                 backdoored_model: Callable[[], nn.Module] | None = None):
        self.train_set = train_set
        self.build_model = build_model
        self.train_model = train_model
        self.seed = seed
        self.device = device
        self._clean_reserve = clean_reserve if clean_rights else None
        self._clean_rights = clean_rights
        self._backdoored_model = backdoored_model

    @property
    def clean_reserve(self) -> ImageSet:
        """Clean training images held apart from the poisoned set (defenses with the right)."""
        if not self._clean_rights:
            raise ThreatModelError(
                "this defense has no clean-data rights, so it cannot use the clean reserve: "
                "declare clean_data = True on the defense if its threat model grants clean data "
                "(FT, FP, NAD, ANP, NC do), otherwise work from context.train_set alone")
        if self._clean_reserve is None or len(self._clean_reserve) == 0:
            raise ThreatModelError("the run sets aside no clean reserve (reserve_fraction 0): "
                                   "give it a fraction > 0 for a defense that needs clean data")
        return self._clean_reserve

    def backdoored_model(self) -> nn.Module:
        """A fresh copy of the undefended model trained on the same setup."""
        if self._backdoored_model is None:
            raise ThreatModelError("only post-training defenses (starts_from = 'backdoored') "
                                   "receive the backdoored model")
        return self._backdoored_model()


class Defense:
    """Base class: keyword settings in the constructor (a dataclass), the work in ``defend``.

    Class attributes declare the defense's place in the benchmark:

    - ``clean_data``: whether its threat model grants the clean reserve;
    - ``starts_from``: ``"scratch"`` (training-time defenses, detectors that retrain) or
      ``"backdoored"`` (post-training repairs);
    - ``protocols``: the evaluation protocols that apply to its models (batch-dependent models
      need more than the standard ``triggered``; see :mod:`eigenguard.evaluate`).
    """

    clean_data = False
    starts_from = "scratch"
    protocols: tuple[str, ...] = ("triggered",)
    #: settings added after runs were stored, each with the value that does what those runs
    #: did: left out of the run's key while they hold it, so the stored runs keep their keys
    #: (any other value is spelled out and gets a key of its own)
    later_settings: dict = {}

    def settings(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def key_settings(self) -> dict:
        """The settings a run's key hashes: :meth:`settings` less the ``later_settings`` that
        hold their earlier value."""
        return {name: value for name, value in self.settings().items()
                if not (name in self.later_settings and self.later_settings[name] == value)}

    def reduced_settings(self) -> dict[str, tuple]:
        """{setting: (this value, the paper's)} for every setting below the paper's budget
        (``paper_budget``, :mod:`eigenguard.budgets`); the report marks such runs."""
        return reduced_budget(self)

    def label(self) -> str:
        """Short name for tables: the registered name and the settings that differ from the
        defaults."""
        name = getattr(type(self), "registered_name", type(self).__name__)
        changed = self.changed_settings()
        return f"{name}({', '.join(changed)})" if changed else name

    def changed_settings(self) -> list[str]:
        """``name=value`` for every setting that differs from its default."""
        return changed_settings(self)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Architecture changes the defense makes (used again to reload a checkpoint)."""
        return model

    def protocols_for(self, model: nn.Module) -> tuple[str, ...]:
        """The protocols a trained model of this defense is evaluated under."""
        return self.protocols

    def evaluation_mode(self, model: nn.Module, protocol: str):
        """A context manager that puts the model in the state a protocol evaluates."""
        return nullcontext()

    def batch_independent(self, model: nn.Module, protocol: str) -> bool:
        """Whether, in a protocol's state, each prediction is independent of its batch (so the
        protocol can be computed in any batch size); true unless the defense says otherwise."""
        return True

    def mixed_logits(self, model, test, triggered, *, seed, device, progress):
        """A faster exact computation of the mixed protocol, or None to use its definition."""
        return None

    def defend(self, context: DefenseContext) -> DefenseResult | nn.Module:
        raise NotImplementedError
