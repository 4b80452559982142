"""CIFAR-10 / CIFAR-100 loader for the official "python version" archives."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CorruptDataError, DatasetNotFoundError
from ._paths import as_path, check_split
from .imageset import ImageSet
from .safe_pickle import restricted_load

__all__ = ["load_cifar", "CIFAR_DATASETS"]

_HINT = (
    "download the python version from https://www.cs.toronto.edu/~kriz/cifar.html "
    "and unpack it there, or pass --data-root DIR (root= in Python) naming the folder that holds it"
)


@dataclass(frozen=True)
class _Spec:
    """Where one CIFAR variant keeps its files and which keys it uses."""

    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    names_key: str
    labels_key: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


CIFAR_DATASETS: dict[str, _Spec] = {
    "cifar10": _Spec(
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "batches.meta",
        "label_names",
        "labels",
        10,
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
    ),
    "cifar100": _Spec(
        "cifar-100-python",
        ("train",),
        ("test",),
        "meta",
        "fine_label_names",
        "fine_labels",
        100,
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
    ),
}


def _get(d: dict, key: str, source: Path) -> Any:
    """Look ``key`` up as str or bytes: Python 2 pickles have bytes keys."""
    for k in (key, key.encode()):
        if k in d:
            return d[k]
    raise CorruptDataError(f"{source} has no {key!r} entry; re-download and unpack it")


def _load_dict(path: Path) -> dict:
    if not path.is_file():
        raise DatasetNotFoundError(f"missing {path}; {_HINT}")
    obj = restricted_load(path.read_bytes(), str(path))
    if not isinstance(obj, dict):
        raise CorruptDataError(
            f"{path} holds a {type(obj).__name__}, not a CIFAR dict; re-download and unpack it"
        )
    return obj


def _resolve(root: Path, spec: _Spec) -> Path:
    """Accept the parent of the CIFAR folder or the folder itself."""
    for candidate in (root / spec.folder, root):
        if (candidate / spec.meta).is_file():
            return candidate
    raise DatasetNotFoundError(
        f"looked for {spec.folder}/{spec.meta} in {root / spec.folder} and {root}; {_HINT}"
    )


def _read_batch(path: Path, labels_key: str) -> tuple[np.ndarray, np.ndarray]:
    d = _load_dict(path)
    data = _get(d, "data", path)
    labels = np.asarray(_get(d, labels_key, path))
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.shape[1:] == (3072,)):
        raise CorruptDataError(
            f"{path}: 'data' should be an N×3072 uint8 array, got "
            f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}; "
            "re-download and unpack it"
        )
    if labels.shape != data.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
        raise CorruptDataError(
            f"{path}: {data.shape[0]} images but labels of shape {labels.shape} "
            f"({labels.dtype}); re-download and unpack it"
        )
    return data, labels


def load_cifar(
    root: str | os.PathLike[str] | None = None,
    split: str = "train",
    *,
    dataset: str = "cifar10",
) -> ImageSet:
    """Load ``dataset`` ("cifar10" or "cifar100") from the pickled python batches."""
    check_split(split)
    if dataset not in CIFAR_DATASETS:
        raise ValueError(f"load_cifar knows {sorted(CIFAR_DATASETS)}, not {dataset!r}")
    spec = CIFAR_DATASETS[dataset]
    if root is None:
        raise DatasetNotFoundError(f"{dataset} has no default location; {_HINT}")
    folder = _resolve(as_path(root), spec)

    meta_path = folder / spec.meta
    label_names = _get(_load_dict(meta_path), spec.names_key, meta_path)
    classes = tuple(n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in label_names)
    if len(classes) != spec.num_classes:
        raise CorruptDataError(
            f"{meta_path} lists {len(classes)} classes, {dataset} has {spec.num_classes}; "
            "re-download and unpack it"
        )

    names = spec.train if split == "train" else spec.test
    parts = [_read_batch(folder / name, spec.labels_key) for name in names]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise CorruptDataError(
            f"{folder}: labels outside 0..{spec.num_classes - 1}; re-download and unpack it"
        )
    # Each row is the R, G and B 32×32 planes in turn, row-major.
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32))
    return ImageSet(
        images=images,
        labels=torch.from_numpy(labels.astype(np.int64)),
        classes=classes,
        mean=spec.mean,
        std=spec.std,
        name=dataset,
    )
