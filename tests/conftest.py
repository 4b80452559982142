"""Shared fixtures: a small synthetic data set written in the MNIST idx format."""
import gzip
import struct

import numpy as np
import pytest
import torch


def write_idx(path, array: np.ndarray, magic: int) -> None:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", n) for n in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def synthetic_images(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """28×28 grey images: uniform noise whose brightness level codes the class (18 per class)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, count)
    images = rng.integers(0, 40, (count, 28, 28)) + 18 * labels[:, None, None]
    return images.astype(np.uint8), labels.astype(np.uint8)


def write_synthetic_idx_dataset(root, n_train=1200, n_test=300, seed=0):
    root.mkdir(parents=True, exist_ok=True)
    for split, count, offset in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = synthetic_images(count, seed + offset)
        write_idx(root / f"{split}-images-idx3-ubyte.gz", images, 0x803)
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels, 0x801)
    return root


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A folder that loads as ``fashion-mnist`` with ``root=`` / ``--data-root``."""
    return write_synthetic_idx_dataset(tmp_path_factory.mktemp("synthetic-fashion"))


@pytest.fixture(autouse=True)
def _single_thread_free_seed():
    torch.manual_seed(0)
    yield
