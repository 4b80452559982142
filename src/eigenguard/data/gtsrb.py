"""GTSRB loader for the official Final_Training / Final_Test layout.

Sign photos come in many sizes; they are resized to 32×32 at load time so
the set is one dense uint8 tensor like the others.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CorruptDataError, DatasetNotFoundError
from ._paths import as_path, check_split
from .imageset import ImageSet
from .ppm import read_ppm

__all__ = ["load_gtsrb", "resize_images", "GTSRB_SIZE", "GTSRB_CLASSES"]

GTSRB_SIZE = 32
GTSRB_CLASSES = tuple(str(i) for i in range(43))
GTSRB_MEAN = (0.3403, 0.3121, 0.3214)
GTSRB_STD = (0.2724, 0.2608, 0.2669)
TEST_ANNOTATIONS = "GT-final_test.csv"

_HINT = (
    "download GTSRB_Final_Training_Images.zip, GTSRB_Final_Test_Images.zip and "
    "GTSRB_Final_Test_GT.zip from "
    "https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/published-archive.html "
    "and unpack them there, or pass --data-root DIR (root= in Python) naming the folder that "
    "holds them"
)
_SUBDIR = {"train": Path("Final_Training", "Images"), "test": Path("Final_Test", "Images")}


def _resolve(root: Path, split: str) -> tuple[Path, Path]:
    """Return (GTSRB folder, split image folder); ``root`` may be GTSRB's parent or GTSRB itself."""
    tried = []
    for base in (root / "GTSRB", root):
        images = base / _SUBDIR[split]
        if images.is_dir():
            return base, images
        tried.append(str(images))
    raise DatasetNotFoundError(f"GTSRB {split} images: looked in {' and '.join(tried)}; {_HINT}")


def _read_annotations(path: Path) -> list[tuple[str, int]]:
    """(Filename, ClassId) rows of one ``;``-separated GTSRB CSV."""
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=";")
        fields = reader.fieldnames or []
        if "Filename" not in fields or "ClassId" not in fields:
            raise CorruptDataError(
                f"{path}: expected a ';'-separated header with Filename and ClassId, "
                f"got {fields}; re-download it"
            )
        rows = []
        for line, row in enumerate(reader, start=2):
            try:
                label = int(row["ClassId"])
            except (TypeError, ValueError):
                raise CorruptDataError(
                    f"{path} line {line}: ClassId {row['ClassId']!r} is not an integer; re-download it"
                ) from None
            if not 0 <= label < len(GTSRB_CLASSES):
                raise CorruptDataError(
                    f"{path} line {line}: ClassId {label} is outside 0..{len(GTSRB_CLASSES) - 1}"
                )
            rows.append((row["Filename"], label))
    return rows


def _train_entries(images_dir: Path) -> list[tuple[Path, int]]:
    class_dirs = sorted(d for d in images_dir.iterdir() if d.is_dir())
    if not class_dirs:
        raise DatasetNotFoundError(f"no class folders in {images_dir}; {_HINT}")
    entries = []
    for d in class_dirs:
        annotations = d / f"GT-{d.name}.csv"
        if not annotations.is_file():
            raise DatasetNotFoundError(f"missing {annotations}; {_HINT}")
        entries += [(d / name, label) for name, label in _read_annotations(annotations)]
    return entries


def _test_entries(root: Path, base: Path, images_dir: Path) -> list[tuple[Path, int]]:
    candidates = [images_dir / TEST_ANNOTATIONS, base / TEST_ANNOTATIONS, root / TEST_ANNOTATIONS]
    for annotations in candidates:
        if annotations.is_file():
            return [(images_dir / name, label) for name, label in _read_annotations(annotations)]
    raise DatasetNotFoundError(
        f"no test labels: looked for {', '.join(map(str, dict.fromkeys(candidates)))}; "
        f"they come in GTSRB_Final_Test_GT.zip; {_HINT}"
    )


def resize_images(images: list[np.ndarray], size: int = GTSRB_SIZE) -> torch.Tensor:
    """Resize H×W×3 uint8 arrays to one N×3×size×size uint8 tensor.

    Bilinear with antialiasing, so downscaled signs do not alias; images of the
    same size are resized together.
    """
    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8)
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, img in enumerate(images):
        groups[img.shape].append(i)
    for shape, indices in groups.items():
        batch = torch.from_numpy(np.stack([images[i] for i in indices])).permute(0, 3, 1, 2)
        if shape[:2] != (size, size):
            batch = F.interpolate(
                batch.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True
            )
            batch = batch.round_().clamp_(0, 255).to(torch.uint8)
        out[torch.tensor(indices)] = batch
    return out


def load_gtsrb(root: str | os.PathLike[str] | None = None, split: str = "train") -> ImageSet:
    """Load GTSRB's train or test split, every image resized to 32×32."""
    check_split(split)
    if root is None:
        raise DatasetNotFoundError(f"gtsrb has no default location; {_HINT}")
    root = as_path(root)
    base, images_dir = _resolve(root, split)
    entries = _train_entries(images_dir) if split == "train" else _test_entries(root, base, images_dir)

    pictures = []
    for path, _ in entries:
        if not path.is_file():
            raise CorruptDataError(f"the annotations list {path.name}, but {path} is missing; {_HINT}")
        pictures.append(read_ppm(path))
    return ImageSet(
        images=resize_images(pictures),
        labels=torch.tensor([label for _, label in entries], dtype=torch.int64),
        classes=GTSRB_CLASSES,
        mean=GTSRB_MEAN,
        std=GTSRB_STD,
        name="gtsrb",
    )
