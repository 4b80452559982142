"""Attacks fitted on a helper model and aimed at one target class (LF, Input-aware,
adaptive-whitebox).

:meth:`~eigenguard.attacks.base.Attack.fit` is not told the run's target, yet what these attacks
learn depends on it. So they share one way of handling it, kept here so that it behaves (and
fails) the same in each: a ``target`` setting says which class to aim at, None (the default)
meaning the run's target. :meth:`TargetedFit.fit` then aims at class 0 and keeps the training
set, seed, device and helper model, and :meth:`TargetedFit.poison`, which is given the run's
target, aims again with that helper when it differs. A restored attack
(:meth:`~eigenguard.attacks.base.Attack.load_fitted_state`) has no helper, so it cannot be
re-aimed: asking for another class than its ``target_`` is an error.
"""
from __future__ import annotations

import torch

from ..data import ImageSet
from .base import Attack, is_integer, is_real
from .helpers import train_clean_helper


class TargetedFit(Attack):
    """Base of the attacks whose fit aims at a target class through a helper model.

    A subclass declares the dataclass field ``target: int | None = None`` (where it belongs in its
    settings), calls :meth:`_init_target` from ``__post_init__``, and implements
    :meth:`_check_fit_data` (what it needs of the training set) and :meth:`_aim` (learn the
    trigger for a class from ``self._fit_context``, setting ``target_``). :meth:`helper` trains
    the clean helper of the ``helper_*`` settings unless overridden.
    """

    needs_fit = True
    #: whether an all-to-all :meth:`poison` also aims at the run's (nominal) target first
    aim_all_to_all = True

    def _check_gradient_steps(self, step_size: str) -> None:
        """Check and normalise the ``steps``, ``step_size`` and ``batch_size`` settings of an
        optimised trigger (``step_size``: what the step size is, for the message)."""
        owner = type(self).__name__
        if not is_integer(self.steps) or self.steps < 1:
            raise ValueError(f"{owner} steps must be an integer >= 1 (gradient steps of the "
                             f"trigger), got {self.steps!r}")
        if not is_real(self.step_size) or self.step_size <= 0:
            raise ValueError(f"{owner} step_size must be a number > 0 ({step_size}), got "
                             f"{self.step_size!r}")
        if not is_integer(self.batch_size) or self.batch_size < 1:
            raise ValueError(f"{owner} batch_size must be an integer >= 1 (images per step), "
                             f"got {self.batch_size!r}")
        self.steps, self.step_size = int(self.steps), float(self.step_size)
        self.batch_size = int(self.batch_size)

    def _init_target(self, aims: str) -> None:
        """Check and normalise the ``target`` setting (``aims``: what aims at it, for the
        message); no fit yet."""
        if self.target is not None and (not is_integer(self.target) or self.target < 0):
            raise ValueError(f"{type(self).__name__} target must be an integer >= 0 ({aims}) or "
                             f"None for the run's target, got {self.target!r}")
        self.target = None if self.target is None else int(self.target)
        self._fit_context = None

    def _check_target(self, target: int, train: ImageSet) -> None:
        if not 0 <= target < train.num_classes:
            raise ValueError(f"{type(self).__name__} target {target} is out of range for "
                             f"{train.name} ({train.num_classes} classes)")

    def _check_fit_data(self, train: ImageSet) -> None:
        """Refuse a training set the attack cannot learn from."""
        raise NotImplementedError

    def _aim(self, target: int) -> None:
        """Learn the trigger for ``target`` from ``self._fit_context`` (train, seed, device,
        helper) and set the fitted state, ``target_`` included."""
        raise NotImplementedError

    def helper(self, train: ImageSet, seed: int, device: str | torch.device = "cpu"):
        """The helper model the attack aims with: the clean helper of the ``helper_*`` settings
        (cached in-process)."""
        return train_clean_helper(train, seed=seed, model=self.helper_model,
                                  width=self.helper_width, epochs=self.helper_epochs,
                                  train_size=self.helper_train_size, device=device)

    def fit(self, train: ImageSet, *, seed: int = 0,
            device: str | torch.device = "cpu") -> "TargetedFit":
        """Get the helper (:meth:`helper`) and aim at ``target`` (class 0 while it is None, until
        :meth:`poison` names the run's target); returns self."""
        self._check_fit_data(train)
        aim = 0 if self.target is None else self.target
        self._check_target(aim, train)
        helper = self.helper(train, seed, device)
        self._fit_context = (train, seed, device, helper)
        self._aim(aim)
        return self

    def for_target(self, target: int) -> "TargetedFit":
        """Aim at ``target`` (again, with the fit's helper, when it differs from the class aimed
        at now; a ``target`` setting keeps its class); returns self. :meth:`poison` calls it with
        the run's target."""
        self.check_fitted()
        aimed = int(self.target_[0])
        if self.target is not None or aimed == target:
            return self
        if self._fit_context is None:
            raise ValueError(f"this {type(self).__name__} attack aims at class {aimed} and was "
                             f"restored from a saved state, which has no helper model to aim it "
                             f"at class {target}: use target {aimed}, or fit the attack again")
        self._check_target(target, self._fit_context[0])
        self._aim(target)
        return self

    def load_fitted_state(self, state: dict[str, torch.Tensor]) -> "TargetedFit":
        """Restore a saved state; the attack then has no helper to re-aim with."""
        self._fit_context = None
        return super().load_fitted_state(state)

    def poison(self, train: ImageSet, ratio: float, target: int, seed: int, pool: str = "all",
               label_mode: str = "all-to-one"):
        """Aim at ``target`` (:meth:`for_target`; in all-to-all mode at the run's nominal target,
        where ``aim_all_to_all``), then poison as the base class does (dirty label)."""
        self.check_fitted()
        if label_mode == "all-to-one" or self.aim_all_to_all:
            self.for_target(target)
        return super().poison(train, ratio, target, seed, pool, label_mode=label_mode)
