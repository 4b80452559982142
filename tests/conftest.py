"""Shared fixtures: a small synthetic data set written in the MNIST idx format; and checks shared by
the fitted attacks' tests."""
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
    """28×28 grey images: class c is a stripe texture at angle 18°·c (no pixel above 200) plus noise.

    The class lives in local texture, as in real images, so a corner trigger is as easy to see for a
    convolutional network as the class itself.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, count)
    y, x = np.mgrid[0:28, 0:28]
    angle = np.pi * labels / 10
    phase = rng.uniform(0, 2 * np.pi, count)
    wave = (np.cos(angle)[:, None, None] * x + np.sin(angle)[:, None, None] * y) * 2 * np.pi / 6
    images = 100 + 70 * np.sin(wave + phase[:, None, None]) + rng.uniform(-30, 30, (count, 28, 28))
    return images.clip(0, 200).astype(np.uint8), labels.astype(np.uint8)


def write_synthetic_idx_dataset(root, n_train=2000, n_test=300, seed=0):
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


def check_registered_fitted_dirty_label(*names: str) -> None:
    """Each attack is registered, learns its trigger (refusing to apply it before fit) and is
    dirty label."""
    from eigenguard.attacks import NotFittedError, create_attack, list_attacks

    assert set(names) <= set(list_attacks())
    for name in names:
        attack = create_attack(name)
        assert attack.needs_fit and not attack.clean_label
        with pytest.raises(NotFittedError):
            attack.apply(torch.zeros(1, 1, 28, 28, dtype=torch.uint8))


def stripes(count: int, seed: int):
    """``count`` of the stripe images as an in-memory ImageSet (no files): the planted setting of
    the defense tests."""
    from eigenguard.data import ImageSet

    images, labels = synthetic_images(count, seed)
    return ImageSet(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long(),
                    tuple(map(str, range(10))), (0.4,), (0.2,), "stripes")


@pytest.fixture
def one_thread():
    """One torch thread for the test: figures measured that way do not depend on the machine's
    thread count, and one thread loses no time to contention where other work shares the
    cores."""
    from eigenguard.attacks.helpers import single_thread

    with single_thread():
        yield


@pytest.fixture(scope="module")
def one_thread_module():
    """``one_thread`` for a whole module (its module-scoped fixtures train under it too)."""
    from eigenguard.attacks.helpers import single_thread

    with single_thread():
        yield


def synthetic_train_subset(root, count: int):
    """The first ``count`` images of the synthetic Fashion-MNIST stand-in (10 classes, 28×28)."""
    from eigenguard.data import load_dataset

    return load_dataset("fashion-mnist", "train", root=root).subset(torch.arange(count))


def check_fit_is_deterministic_and_round_trips(name: str, settings: dict, train_set, tmp_path,
                                               *, learned: str, state: set, seed: int = 1):
    """Fitting twice under a seed (the in-process helper cache emptied between) gives the same
    state; another seed changes the ``learned`` tensor; the state saved to a safetensors file
    and loaded into a fresh attack holds exactly ``state`` and applies the same trigger.
    Returns the restored attack."""
    from safetensors.torch import load_file, save_file

    from eigenguard.attacks import create_attack
    from eigenguard.attacks.helpers import clear_helper_cache

    first = create_attack(name, **settings).fit(train_set, seed=seed)
    clear_helper_cache()
    again = create_attack(name, **settings).fit(train_set, seed=seed)
    for key, tensor in first.fitted_state().items():
        assert torch.equal(again.fitted_state()[key], tensor), key
    other = create_attack(name, **settings).fit(train_set, seed=seed + 1)
    assert not torch.equal(getattr(other, learned), getattr(first, learned))
    path = tmp_path / f"{name}.safetensors"
    save_file(first.fitted_state(), str(path))
    restored = create_attack(name, **settings).load_fitted_state(load_file(str(path)))
    assert set(restored.fitted_state()) == state
    assert torch.equal(restored.apply(train_set.images), first.apply(train_set.images))
    return restored


@pytest.fixture(autouse=True)
def _single_thread_free_seed():
    torch.manual_seed(0)
    yield
