"""The attack interface and the poisoned training set every attack returns.

Three kinds of attack fit behind it (docs/EXTENDING.md shows one of each):

- *static*: the trigger is a function of the settings (BadNets); only :meth:`Attack.apply`;
- *fitted*: :meth:`Attack.fit` learns something from the training set (a sampled pattern, a
  helper model, an optimised trigger) and keeps it in attributes ending in ``_`` (the
  scikit-learn convention). :meth:`Attack.fitted_state` returns them as tensors; the run saves
  them beside its checkpoint and :meth:`Attack.load_fitted_state` restores them, so evaluation
  always applies the fitted attack the model was poisoned with;
- *training-controlled*: the attack also edits each training batch through the trainer's hooks
  (:meth:`Attack.training_hooks`), as WaNet, Input-aware and BppAttack do in their papers.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

import torch

from ..budgets import reduced_budget
from ..data import ImageSet
from ..errors import EigenGuardError

#: where dirty-label attacks draw their samples: BackdoorBench draws from the whole training set,
#: so about 1/C of them already carry the target label; "non-target" draws from the other classes
POISON_POOLS = ("all", "non-target")
#: how poisoned samples are relabelled: "all-to-one" sets every one to the target class
#: (BackdoorBench's default); "all-to-all" sets a sample of class y to (y + 1) mod C
LABEL_MODES = ("all-to-one", "all-to-all")


def check_label_mode(label_mode: str) -> None:
    if label_mode not in LABEL_MODES:
        raise ValueError(f"label_mode must be one of {LABEL_MODES} (all-to-one: every poisoned "
                         f"sample relabelled to the target; all-to-all: class y to (y + 1) mod "
                         f"C), got {label_mode!r}")


def all_to_all_targets(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The all-to-all attack's target of each true label: (y + 1) mod C."""
    return (labels + 1) % num_classes


class NotFittedError(EigenGuardError, RuntimeError):
    """An attack that learns its trigger was used before :meth:`Attack.fit`."""


@dataclass(frozen=True, eq=False)
class PoisonedSet:
    """A training set after poisoning, with what is needed to audit it (the harness's ground
    truth: a defense never receives this object, only ``data``)."""

    data: ImageSet
    poison_indices: torch.Tensor  # int64, sorted
    original_labels: torch.Tensor  # int64, labels before poisoning (all samples)
    target: int  # the target class (all-to-one); in all-to-all mode each label y goes to y + 1

    @property
    def is_poisoned(self) -> torch.Tensor:
        mask = torch.zeros(len(self.data), dtype=torch.bool)
        mask[self.poison_indices] = True
        return mask

    @property
    def flipped_labels(self) -> int:
        """How many poisoned samples had their label changed (all-to-one: dirty-label samples
        drawn from the target class keep theirs; all-to-all: every one changes)."""
        idx = self.poison_indices
        return int((self.original_labels[idx] != self.data.labels[idx]).sum())


def check_poison_args(train: ImageSet, ratio: float, target: int) -> None:
    if not 0 <= ratio <= 1:
        raise ValueError(f"poison ratio must be in [0, 1], got {ratio}")
    if not 0 <= target < train.num_classes:
        raise ValueError(f"target class {target} is out of range for {train.name} "
                         f"({train.num_classes} classes)")


class Attack:
    """Base class: constructors take keyword settings and do no work (scikit-learn style).

    Subclasses implement :meth:`apply`; attacks that learn their trigger override :meth:`fit`
    and set ``needs_fit = True``. Dirty-label attacks poison samples drawn from the whole training
    set (``pool="all"``) or from the non-target classes, and relabel them to the target;
    clean-label attacks (``clean_label = True``) draw only from the target class. In all-to-all
    mode a dirty-label attack draws from every class and relabels class y to (y + 1) mod C.
    """

    clean_label = False
    needs_fit = False

    def settings(self) -> dict:
        """The constructor settings, for configs and reports."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def reduced_settings(self) -> dict[str, tuple]:
        """{setting: (this value, the paper's)} for every setting below the paper's budget
        (``paper_budget``, :mod:`eigenguard.budgets`); the report marks such runs."""
        return reduced_budget(self)

    def fit(self, train: ImageSet, *, seed: int = 0, device: str | torch.device = "cpu") -> "Attack":
        """Learn what the trigger needs from the (clean) training set; returns self."""
        return self

    # -- fitted state --------------------------------------------------------------------------

    def fitted_state(self) -> dict[str, torch.Tensor]:
        """What :meth:`fit` learned: every tensor attribute whose name ends in ``_``.

        Attacks holding a helper ``nn.Module`` override this (and :meth:`load_fitted_state`),
        for example with ``{"generator." + k: v for k, v in self.generator_.state_dict().items()}``.
        """
        return {name: value for name, value in vars(self).items()
                if name.endswith("_") and not name.startswith("_")
                and isinstance(value, torch.Tensor)}

    def load_fitted_state(self, state: dict[str, torch.Tensor]) -> "Attack":
        """Restore what :meth:`fit` learned (from :meth:`fitted_state`); returns self."""
        for name, value in state.items():
            if not name.endswith("_"):
                raise ValueError(f"{type(self).__name__}: unexpected fitted-state entry {name!r}")
            setattr(self, name, value)
        return self

    @property
    def is_fitted(self) -> bool:
        return not self.needs_fit or bool(self.fitted_state())

    def check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(f"{type(self).__name__} learns its trigger: call fit(train) "
                                 "first, or load_fitted_state() with the state saved by the run")

    # -- the trigger ---------------------------------------------------------------------------

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """Add the trigger to a uint8 batch (N, C, H, W); returns a new uint8 tensor."""
        raise NotImplementedError

    def training_hooks(self, target: int, seed: int) -> list:
        """Hooks (eigenguard.train.TrainHook) that edit the victim's training batches, for
        attacks that control training; none for data-poisoning attacks."""
        return []

    # -- poisoning -----------------------------------------------------------------------------

    def eligible(self, train: ImageSet, target: int, pool: str = "all",
                 label_mode: str = "all-to-one") -> torch.Tensor:
        """Indices the attack may poison."""
        if pool not in POISON_POOLS:
            raise ValueError(f"poison pool must be one of {POISON_POOLS}, got {pool!r}")
        check_label_mode(label_mode)
        if label_mode == "all-to-all":
            self.check_label_mode_supported(label_mode)
            return torch.arange(len(train))  # every sample changes label: any class, any pool
        if self.clean_label:
            return (train.labels == target).nonzero().flatten()
        if pool == "non-target":
            return (train.labels != target).nonzero().flatten()
        return torch.arange(len(train))

    def check_label_mode_supported(self, label_mode: str) -> None:
        """A clean-label attack keeps its samples' labels, so it has no all-to-all mode."""
        check_label_mode(label_mode)
        if label_mode == "all-to-all" and self.clean_label:
            raise ValueError(f"{type(self).__name__} is a clean-label attack (its poisoned "
                             "samples keep their labels), so it cannot relabel them all-to-all; "
                             "use label_mode all-to-one")

    def poison(self, train: ImageSet, ratio: float, target: int, seed: int,
               pool: str = "all", label_mode: str = "all-to-one") -> PoisonedSet:
        """Poison ``round(ratio · len(train))`` samples drawn with ``seed`` from the eligible
        pool: the trigger is added and the label set to ``target`` (all-to-one), or to
        (y + 1) mod C for a sample of class y drawn from any class (all-to-all; ``pool`` is then
        ignored)."""
        check_poison_args(train, ratio, target)
        self.check_label_mode_supported(label_mode)
        self.check_fitted()
        eligible = self.eligible(train, target, pool, label_mode)
        count = int(round(ratio * len(train)))
        if count > len(eligible):
            largest = len(eligible) / max(len(train), 1)
            what = ("target-class samples (a clean-label attack poisons the target class only)"
                    if self.clean_label else f"eligible samples (pool {pool!r})")
            raise ValueError(f"cannot poison {count} samples ({ratio:g} of {len(train)}): only "
                             f"{len(eligible)} {what}; the largest possible poison ratio here is "
                             f"{largest:.4f}")
        generator = torch.Generator().manual_seed(seed)
        chosen = eligible[torch.randperm(len(eligible), generator=generator)[:count]].sort().values
        images = train.images.clone()
        labels = train.labels.clone()
        if count:
            images[chosen] = self.apply(images[chosen])
            labels[chosen] = (target if label_mode == "all-to-one"
                              else all_to_all_targets(labels[chosen], train.num_classes))
        return PoisonedSet(train.with_images_labels(images, labels), chosen, train.labels.clone(),
                           target)


def check_images(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"attacks take uint8 image batches (N, C, H, W), got "
                         f"{images.dtype} of shape {tuple(images.shape)}")


def is_integer(value) -> bool:
    """An int (numpy's too); a bool or a float such as 1.5 is a mistake, not a count to round."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A finite int or float; a bool is a mistake, not a number."""
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(value))
