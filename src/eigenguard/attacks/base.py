"""The attack interface and the poisoned training set every attack returns."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..data import ImageSet


@dataclass(frozen=True, eq=False)
class PoisonedSet:
    """A training set after poisoning, with what is needed to audit it."""

    data: ImageSet
    poison_indices: torch.Tensor  # int64, sorted
    original_labels: torch.Tensor  # int64, labels before poisoning (all samples)
    target: int

    @property
    def is_poisoned(self) -> torch.Tensor:
        mask = torch.zeros(len(self.data), dtype=torch.bool)
        mask[self.poison_indices] = True
        return mask


def check_poison_args(train: ImageSet, ratio: float, target: int) -> None:
    if not 0 <= ratio <= 1:
        raise ValueError(f"poison ratio must be in [0, 1], got {ratio}")
    if not 0 <= target < train.num_classes:
        raise ValueError(f"target class {target} is out of range for {train.name} "
                         f"({train.num_classes} classes)")


class Attack:
    """Base class: constructors take keyword settings and do no work (scikit-learn style).

    Subclasses implement :meth:`apply`; attacks that need a helper model override :meth:`fit`.
    Dirty-label attacks poison samples drawn from the whole training set and relabel them to the
    target; clean-label attacks (``clean_label = True``) draw only from the target class.
    """

    clean_label = False

    def settings(self) -> dict:
        """The constructor settings, for configs and reports."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def fit(self, train: ImageSet, **kwargs) -> "Attack":
        return self

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """Add the trigger to a uint8 batch (N, C, H, W); returns a new uint8 tensor."""
        raise NotImplementedError

    def poison(self, train: ImageSet, ratio: float, target: int, seed: int) -> PoisonedSet:
        check_poison_args(train, ratio, target)
        pool = (train.labels == target).nonzero().flatten() if self.clean_label \
            else torch.arange(len(train))
        count = int(round(ratio * len(train)))
        if count > len(pool):
            raise ValueError(f"cannot poison {count} samples: only {len(pool)} are eligible")
        generator = torch.Generator().manual_seed(seed)
        chosen = pool[torch.randperm(len(pool), generator=generator)[:count]].sort().values
        images = train.images.clone()
        labels = train.labels.clone()
        if count:
            images[chosen] = self.apply(images[chosen])
            labels[chosen] = target
        return PoisonedSet(train.with_images_labels(images, labels), chosen, train.labels.clone(),
                           target)


def check_images(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"attacks take uint8 image batches (N, C, H, W), got "
                         f"{images.dtype} of shape {tuple(images.shape)}")
