"""Small helpers the loaders share: argument checks and path handling."""

from __future__ import annotations

import os
from pathlib import Path

SPLITS = ("train", "test")


def check_split(split: str) -> str:
    """Reject anything but "train"/"test" before touching the disk."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def as_path(root: str | os.PathLike[str]) -> Path:
    """Accept str/PathLike and expand ``~`` so messages show the real location."""
    return Path(os.fspath(root)).expanduser()
