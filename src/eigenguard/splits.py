"""The data of one run: what was loaded (and its fingerprint) and how the training set is split.

Every split is a seeded fraction of the original training set, defined once here:

- the **validation split** (default 10%): the project's development set. Every default and
  threshold the project chooses is chosen on it, with its clean and triggered views; a defense
  never sees it at run time;
- the **clean reserve** (default 5%): set aside in every setup, so the backdoored model is the
  same whether or not a post-training defense follows; handed only to defenses with clean-data
  rights;
- the **victim's training set** (the rest), which the attack poisons; the poison ratio is a
  fraction of it.

The test set stays whole (or a seeded subset for quick runs) and is used for reporting only.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from .data import ImageSet, load_dataset
from .seeding import generator


@dataclass(frozen=True, eq=False)
class LoadedData:
    """A data set's train and test splits as loaded, and a fingerprint of their content."""

    train: ImageSet
    test: ImageSet
    fingerprint: str


@dataclass(frozen=True, eq=False)
class Splits:
    train: ImageSet  # the victim's training set, before poisoning
    validation: ImageSet
    reserve: ImageSet
    test: ImageSet


def fingerprint(*sets: ImageSet) -> str:
    """A hash of the images, labels and class names: the same content gives the same value
    wherever it was read from, and a changed file gives another."""
    digest = hashlib.sha256()
    for data in sets:
        digest.update(repr((tuple(data.images.shape), data.classes)).encode())
        digest.update(data.images.contiguous().numpy().tobytes())
        digest.update(data.labels.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def load_data(dataset: str, data_root=None) -> LoadedData:
    train = load_dataset(dataset, "train", root=data_root)
    test = load_dataset(dataset, "test", root=data_root)
    return LoadedData(train, test, fingerprint(train, test))


def check_fractions(validation: float, reserve: float) -> None:
    for name, value in (("validation_fraction", validation), ("reserve_fraction", reserve)):
        if not (isinstance(value, (int, float)) and 0 <= value < 1):
            raise ValueError(f"{name} must be a fraction in [0, 1), got {value!r}")
    if validation + reserve >= 0.9:
        raise ValueError(f"validation_fraction + reserve_fraction = {validation + reserve:g} "
                         "leaves the victim less than 10% of the training set; lower them")


def _random_subset(data: ImageSet, size: int | None, seed: int, stream: str) -> ImageSet:
    if size is None or size >= len(data):
        return data
    order = torch.randperm(len(data), generator=generator(seed, stream))
    return data.subset(order[:size].sort().values)


def make_splits(loaded: LoadedData, *, seed: int, validation_fraction: float = 0.1,
                reserve_fraction: float = 0.05, train_size: int | None = None,
                test_size: int | None = None) -> Splits:
    """Split the (optionally subsampled) training set into validation, reserve and the victim's
    set, each drawn with its own random stream of ``seed``; indices keep their original order."""
    check_fractions(validation_fraction, reserve_fraction)
    full = _random_subset(loaded.train, train_size, seed, "train-subset")
    test = _random_subset(loaded.test, test_size, seed, "test-subset")
    order = torch.randperm(len(full), generator=generator(seed, "split"))
    n_validation = int(round(validation_fraction * len(full)))
    n_reserve = int(round(reserve_fraction * len(full)))
    validation = order[:n_validation].sort().values
    reserve = order[n_validation:n_validation + n_reserve].sort().values
    victim = order[n_validation + n_reserve:].sort().values
    if len(victim) == 0:
        raise ValueError(f"no training images left for the victim after the validation split "
                         f"and the clean reserve ({len(full)} images in all): use a larger "
                         "--train-size")
    return Splits(full.subset(victim), full.subset(validation), full.subset(reserve), test)
