"""Data sets by name, and the facts about them a model or trainer needs before loading."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

from ..errors import UnknownNameError
from .cifar import load_cifar
from .gtsrb import load_gtsrb
from .idx import FASHION_MNIST_ROOT, load_idx
from .imageset import ImageSet

__all__ = ["DatasetInfo", "dataset_info", "list_datasets", "load_dataset"]


@dataclass(frozen=True)
class DatasetInfo:
    """Shape and augmentation facts, known without reading any files.

    ``flip`` is False where a mirrored image means something else (digits,
    traffic signs); ``crop_padding`` is the random-crop padding in pixels.
    """

    name: str
    in_channels: int
    image_size: tuple[int, int]
    num_classes: int
    flip: bool
    crop_padding: int
    default_root: Path | None


Loader = Callable[..., ImageSet]

_REGISTRY: dict[str, tuple[DatasetInfo, Loader]] = {
    "fashion-mnist": (
        DatasetInfo("fashion-mnist", 1, (28, 28), 10, True, 2, FASHION_MNIST_ROOT),
        partial(load_idx, dataset="fashion-mnist"),
    ),
    "mnist": (
        DatasetInfo("mnist", 1, (28, 28), 10, False, 2, None),
        partial(load_idx, dataset="mnist"),
    ),
    "cifar10": (
        DatasetInfo("cifar10", 3, (32, 32), 10, True, 4, None),
        partial(load_cifar, dataset="cifar10"),
    ),
    "cifar100": (
        DatasetInfo("cifar100", 3, (32, 32), 100, True, 4, None),
        partial(load_cifar, dataset="cifar100"),
    ),
    "gtsrb": (
        DatasetInfo("gtsrb", 3, (32, 32), 43, False, 4, None),
        load_gtsrb,
    ),
}


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`."""
    return sorted(_REGISTRY)


def _lookup(name: str) -> tuple[DatasetInfo, Loader]:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownNameError(
            f"unknown data set {name!r}; known: {', '.join(list_datasets())}"
        ) from None


def dataset_info(name: str) -> DatasetInfo:
    """Facts about ``name`` without touching the disk."""
    return _lookup(name)[0]


def load_dataset(
    name: str, split: str = "train", root: str | os.PathLike[str] | None = None
) -> ImageSet:
    """Load split ``split`` of data set ``name`` from ``root`` (or its default location)."""
    return _lookup(name)[1](root, split)
