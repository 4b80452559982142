"""The clean helper model that fitted attacks derive their trigger from (LF's universal
perturbation, TrojanNN's neurons; later LC and adaptive attacks), and the settings they share.

:func:`train_clean_helper` trains a registered model (``small_cnn`` by default) from scratch on a
seeded subset of the clean training set with the project's own loop (:func:`eigenguard.train.train`,
SGD + one-cycle at :class:`~eigenguard.train.TrainConfig`'s defaults, no augmentation), and returns
it in eval mode. Nothing is downloaded. Every random draw comes from its own stream of the fit seed
(:mod:`eigenguard.seeding`): the subset ("helper-subset"), the initial weights ("helper-init", drawn
inside ``torch.random.fork_rng`` so the caller's global RNG is untouched) and the epoch order
("helper-train"). Two attacks fitted with the same seed and helper settings therefore share one
helper. It trains with one CPU thread (:func:`single_thread`), so the helper does not depend on
the process's thread count, and a machine busy with other work (a sweep's other runs) does not
slow it down by oversubscription: on the 2-core development machine, with a training
job beside it, one thread trained at 0.5 ms per image and epoch, two threads at 3.4 to 4.8 ms.

In-process caches: a helper depends only on its settings, the seed, the device type and the
training data, so it is cached under a hash of those (the data hashed byte for byte: images,
labels, classes, mean and std). A sweep fitting the same attack twice, or LF and TrojanNN with the
same seed, trains once. The cache keeps the state dicts of the last :data:`CACHE_SIZE` helpers on
the CPU and hands out a fresh module each time, so a caller cannot change a cached helper. The
attacks cache their fitted tensors the same way (:func:`cached_fit`, keyed by the helper's key
and every setting and argument the optimisation reads), so fitting the same attack twice in one
process repeats neither the training nor the optimisation. :func:`clear_helper_cache` empties
both (the tests do, to check that a fit is deterministic without them).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..data import ImageSet, normalize
from ..models import create_model, is_model, list_models
from ..seeding import generator, stream_seed
from ..threads import thread_count
from ..train import TrainConfig, train
from .base import is_integer

#: helpers kept in the in-process cache (state dicts on the CPU)
CACHE_SIZE = 4
_CACHE: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
#: fitted attack states kept in the in-process cache
FIT_CACHE_SIZE = 16
_FIT_CACHE: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()


def check_helper_settings(owner: str, model: str, width: int, epochs: int,
                          train_size: int) -> None:
    """Refuse bad helper settings with an error that names the setting."""
    if not isinstance(model, str) or not is_model(model):
        raise ValueError(f"{owner} helper_model must be a registered model name (one of "
                         f"{', '.join(list_models())}), got {model!r}")
    if not is_integer(width) or width < 1:
        raise ValueError(f"{owner} helper_width must be an integer >= 1 (the helper model's "
                         f"first-stage channels), got {width!r}")
    if not is_integer(epochs) or epochs < 1:
        raise ValueError(f"{owner} helper_epochs must be an integer >= 1 (epochs of the clean "
                         f"helper model's training), got {epochs!r}")
    if not is_integer(train_size) or train_size < 1:
        raise ValueError(f"{owner} helper_train_size must be an integer >= 1 (the most training "
                         f"images the helper model learns from), got {train_size!r}")


def data_fingerprint(data: ImageSet) -> str:
    """A hash of everything in ``data`` a helper could depend on."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((tuple(data.images.shape), data.classes, data.mean, data.std)).encode())
    digest.update(data.images.contiguous().cpu().numpy().tobytes())
    digest.update(data.labels.contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class HelperSpec:
    """What a clean helper model is: architecture, width, epochs, and the most images it sees."""

    model: str = "small_cnn"
    width: int = 16
    epochs: int = 4
    train_size: int = 30000

    def key(self, data: ImageSet, seed: int, device: str | torch.device) -> str:
        return hashlib.blake2b(repr((self.model, self.width, self.epochs, self.train_size,
                                     int(seed), torch.device(device).type,
                                     data_fingerprint(data))).encode(),
                               digest_size=16).hexdigest()


def helper_subset(data: ImageSet, size: int, seed: int) -> torch.Tensor:
    """The sorted indices of the ``min(size, len(data))`` images the helper trains on."""
    if size >= len(data):
        return torch.arange(len(data))
    order = torch.randperm(len(data), generator=generator(seed, "helper-subset"))
    return order[:size].sort().values


def build_helper(spec: HelperSpec, data: ImageSet, seed: int) -> nn.Module:
    """The helper architecture with its seeded initial weights (the global RNG is untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(seed, "helper-init"))
        return create_model(spec.model, in_channels=data.in_channels,
                            num_classes=data.num_classes, width=spec.width)


def train_clean_helper(data: ImageSet, *, seed: int, model: str = "small_cnn", width: int = 16,
                       epochs: int = 4, train_size: int = 30000,
                       device: str | torch.device = "cpu", cache: bool = True) -> nn.Module:
    """A clean ``model`` of ``width`` trained for ``epochs`` on at most ``train_size`` images of
    ``data`` drawn with ``seed`` (all of them when there are fewer), in eval mode, on ``device``,
    with gradients of its parameters switched off."""
    check_helper_settings("helper", model, width, epochs, train_size)
    if len(data) == 0:
        raise ValueError(f"{data.name}: the helper model needs training images, and the set is "
                         "empty")
    spec = HelperSpec(model, int(width), int(epochs), int(train_size))
    key = spec.key(data, seed, device)
    helper = _helper_from(spec, key, data, seed, device, cache)
    helper.cache_key = key  # what the helper depends on, for caches of what is derived from it
    return helper


def _helper_from(spec: HelperSpec, key: str, data: ImageSet, seed: int,
                 device: str | torch.device, cache: bool) -> nn.Module:
    helper = build_helper(spec, data, seed)
    state = _CACHE.get(key) if cache else None
    if state is None:
        subset = data.subset(helper_subset(data, spec.train_size, seed))
        with single_thread():
            train(helper, subset, TrainConfig(epochs=spec.epochs, augment=False),
                  seed=stream_seed(seed, "helper-train"), device=device, progress=False,
                  description="helper")
        if cache:
            _CACHE[key] = {name: tensor.detach().cpu().clone()
                           for name, tensor in helper.state_dict().items()}
            while len(_CACHE) > CACHE_SIZE:
                _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
        helper.load_state_dict(state)
    helper.to(device).eval()
    for parameter in helper.parameters():
        parameter.requires_grad_(False)
    return helper


def clear_helper_cache() -> None:
    """Forget every cached helper and fitted state."""
    _CACHE.clear()
    _FIT_CACHE.clear()


def cached_fit(key: tuple, compute) -> dict[str, torch.Tensor]:
    """``compute()`` (a dict of tensors), or a copy of the one cached under ``key`` (a tuple of
    plain values that includes the helper's ``cache_key``)."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=16).hexdigest()
    state = _FIT_CACHE.get(digest)
    if state is None:
        state = {name: tensor.detach().cpu().clone() for name, tensor in compute().items()}
        _FIT_CACHE[digest] = state
        while len(_FIT_CACHE) > FIT_CACHE_SIZE:
            _FIT_CACHE.popitem(last=False)
    else:
        _FIT_CACHE.move_to_end(digest)
    return {name: tensor.clone() for name, tensor in state.items()}


def helper_input(images: torch.Tensor, data: ImageSet) -> torch.Tensor:
    """Images on the 0..255 scale (uint8 or float, any device; differentiable) -> the helper's
    normalised input, as the training loop feeds it."""
    return normalize(images.float() / 255, data.mean, data.std)


def penultimate(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the features entering ``model.classifier``, the logits) for a normalised batch; every
    model of the project ends in ``model.classifier``."""
    captured = []
    handle = model.classifier.register_forward_pre_hook(
        lambda module, inputs: captured.append(inputs[0]))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return captured[0], logits


@contextmanager
def single_thread():
    """Run the block with one CPU thread (the previous count is restored after it).

    The helper's training (batches of 128 small images) and the attacks' optimisations (one
    image for TrojanNN, a few dozen for LF) gain little from more threads on an idle CPU, and
    lose many times over on a busy one (on the 2-core development machine with a training job
    beside it, 200 TrojanNN steps took 9.6 s with 2 threads and 0.38 s with 1). One thread also
    makes their results independent of the machine's thread count.
    """
    with thread_count(1):
        yield
