"""The one training loop every stage uses: plain training, poisoned training, training-time defenses.

Data stay in memory as uint8 tensors; each step moves a batch to the device, augments it there as a
whole and normalises it. Under a fixed seed and thread count the loop is deterministic on CPU.

Attacks and defenses that need more than plain training (WaNet poisons each batch, ABL floods and
then unlearns, NAD adds attention losses, Input-aware trains a generator alongside) do not fork the
loop: they pass :class:`TrainHook` objects, which it calls in the order given, at these points::

    on_train_start(state)                          once, before the first epoch
    for each epoch:
        on_epoch_start(state)                      after model.train()
        for each step:
            batch = on_batch(state, batch)         augmented images in [0, 1], not yet normalised
            loss = loss(state, batch, logits,      per-sample cross-entropy; the first hook gets
                        losses, loss)              their mean, each next one the previous result
            after_step(state, batch)               after optimizer.step(), before the LR schedule
        on_epoch_end(state, record)                may add keys; then record joins state.history
    on_train_end(state)                            once, after the last epoch

The final loss must be finite, or training stops with a FloatingPointError.

A hook that stamps a trigger on a quarter of every batch:

>>> import torch
>>> from eigenguard.data import ImageSet
>>> class StampCorner(TrainHook):
...     def on_batch(self, state, batch):
...         n = len(batch) // 4
...         batch.images[:n, :, -2:, -2:] = 1.0
...         batch.labels[:n] = 0
...         return batch
>>> data = ImageSet(torch.full((64, 1, 8, 8), 100, dtype=torch.uint8), torch.arange(64) % 2,
...                 ("even", "odd"), (0.5,), (0.25,), "grey")
>>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
>>> history = train(model, data, TrainConfig(epochs=2, batch_size=16), seed=0, progress=False,
...                 hooks=[StampCorner()])
>>> [record["epoch"] for record in history]
[1, 2]
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .data import ImageSet, augment_batch, normalize
from .progress import Progress
from .seeding import generator

SCHEDULES = ("onecycle", "cosine", "constant")


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser and schedule: SGD with momentum, one-cycle (fast runs) or cosine (BackdoorBench)."""

    epochs: int = 4
    batch_size: int = 128
    lr: float = 0.05
    schedule: str = "onecycle"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: bool = True

    def __post_init__(self):
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be an integer >= 1, got {self.epochs!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")


@dataclass(frozen=True)
class Augmentation:
    """Which batch augmentations suit a data set (no flips for digits or road signs)."""

    crop_padding: int = 0
    flip: bool = False


@dataclass
class TrainState:
    """What hooks may read (and, with care, change) while training runs.

    ``epoch`` is 1-based; ``step`` counts optimiser steps taken so far, so during ``on_batch`` and
    ``loss`` it is the index of the current step and in ``after_step`` it already includes it.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    config: TrainConfig
    data: ImageSet
    device: torch.device
    epoch: int = 0
    step: int = 0
    steps_per_epoch: int = 0
    history: list[dict] = field(default_factory=list)


@dataclass
class Batch:
    """One step's samples: float images in [0, 1] on the device (augmented, not yet normalised),
    int64 labels on the device, and the int64 CPU positions of the samples in the training set."""

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


class TrainHook:
    """Base class of training hooks: each method does nothing, so a hook overrides what it needs."""

    def on_train_start(self, state: TrainState) -> None:
        pass

    def on_epoch_start(self, state: TrainState) -> None:
        pass

    def on_batch(self, state: TrainState, batch: Batch) -> Batch:
        """Return the batch to train on: images and labels may change, samples may come or go."""
        return batch

    def loss(self, state: TrainState, batch: Batch, logits: torch.Tensor, losses: torch.Tensor,
             loss: torch.Tensor) -> torch.Tensor:
        """Return the scalar loss to optimise; ``losses`` is the per-sample cross-entropy."""
        return loss

    def after_step(self, state: TrainState, batch: Batch) -> None:
        """Runs after ``optimizer.step()``: the place to step an optimiser of the hook's own."""

    def on_epoch_end(self, state: TrainState, record: dict) -> None:
        """``record`` is the epoch's summary; keys added here end up in the returned history."""

    def on_train_end(self, state: TrainState) -> None:
        pass


class EpochEndHook(TrainHook):
    """Calls ``fn(record)`` after each epoch, e.g. ``EpochEndHook(history.append)``."""

    def __init__(self, fn: Callable[[dict], None]):
        self.fn = fn

    def on_epoch_end(self, state: TrainState, record: dict) -> None:
        self.fn(record)


class KeepStates(TrainHook):
    """Keeps a CPU copy of the model's ``state_dict`` every ``every`` epochs and at the last
    epoch of each training call, in :attr:`states` (epoch -> tensors): the intermediate
    checkpoints of ``--save-every``.

    It only reads the model after the other hooks' ``on_epoch_end`` (put it last), so training
    is bitwise the same with or without it: no random draw, no mode change, no write. One
    instance may follow several training calls; their epochs are numbered one after the other
    (a second call's first epoch is the first call's last plus one). The copies stay in memory
    (one model's size each) until they are written out.
    """

    def __init__(self, every: int):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"save_every must be an integer >= 1 (epochs between kept "
                             f"checkpoints), got {every!r}")
        self.every = every
        self.states: dict[int, dict[str, torch.Tensor]] = {}
        self.epochs_before = 0  # epochs of the calls followed before this one

    def on_epoch_end(self, state: TrainState, record: dict) -> None:
        epoch = self.epochs_before + state.epoch
        if epoch % self.every == 0 or state.epoch == state.config.epochs:
            self.states[epoch] = {name: tensor.detach().to("cpu", copy=True)
                                  for name, tensor in state.model.state_dict().items()}

    def on_train_end(self, state: TrainState) -> None:
        self.epochs_before += state.config.epochs


def model_input(images: torch.Tensor, data: ImageSet) -> torch.Tensor:
    """uint8 batch on any device -> normalised float batch."""
    return normalize(images.float().div_(255), data.mean, data.std)


def batch_slices(num_samples: int, batch_size: int) -> list[slice]:
    """Slices of one epoch's order that cover every sample once.

    A last partial batch smaller than half a batch joins the one before it: a step on a handful of
    samples gives BatchNorm noisy statistics and leaves EigenGuard's batch filter, which needs more
    samples than directions it damps, nothing to filter. A set smaller than one batch is one step.
    """
    steps = max(1, num_samples // batch_size + (2 * (num_samples % batch_size) >= batch_size))
    return [slice(i * batch_size, num_samples if i == steps - 1 else (i + 1) * batch_size)
            for i in range(steps)]


def make_scheduler(optimizer, config: TrainConfig, total_steps: int):
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr,
                                                   total_steps=total_steps)
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def train(model: nn.Module, data: ImageSet, config: TrainConfig, *, seed: int,
          augmentation: Augmentation = Augmentation(), device: str | torch.device = "cpu",
          progress: bool = True, description: str = "train",
          hooks: Iterable[TrainHook] = ()) -> list[dict]:
    """Train ``model`` in place on ``data``; returns one dict per epoch (loss, train_acc, lr, time).

    Each epoch visits every sample once in a fresh random order, in batches of
    ``config.batch_size`` (see :func:`batch_slices` for the last one). ``loss`` and ``train_acc``
    average over the samples the hooks let through, ``loss`` being the loss optimised. The epoch
    order and the augmentations draw from their own streams of ``seed``.
    """
    if len(data) == 0:
        raise ValueError(f"{data.name}: no samples to train on")
    hooks = tuple(hooks)
    device = torch.device(device)
    model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay, nesterov=False)
    slices = batch_slices(len(data), config.batch_size)
    scheduler = make_scheduler(optimizer, config, config.epochs * len(slices))
    state = TrainState(model, optimizer, scheduler, config, data, device,
                       steps_per_epoch=len(slices))
    order_generator = generator(seed, "epoch-order")
    augment_generator = generator(seed, "augment")
    for hook in hooks:
        hook.on_train_start(state)
    for epoch in range(1, config.epochs + 1):
        state.epoch = epoch
        model.train()
        for hook in hooks:
            hook.on_epoch_start(state)
        start = time.monotonic()
        order = torch.randperm(len(data), generator=order_generator)
        bar = Progress(len(slices), f"{description} epoch {epoch}/{config.epochs}",
                       enabled=progress)
        loss_sum = torch.zeros((), dtype=torch.float64)
        correct = seen = 0
        for step, rows in enumerate(slices):
            indices = order[rows]
            x = data.images[indices].to(device, non_blocking=True).float().div_(255)
            y = data.labels[indices].to(device, non_blocking=True)
            if config.augment:
                x = augment_batch(x, crop_padding=augmentation.crop_padding,
                                  flip=augmentation.flip, generator=augment_generator)
            batch = Batch(x, y, indices)
            for hook in hooks:
                batch = hook.on_batch(state, batch)
                if not isinstance(batch, Batch):
                    raise TypeError(f"{type(hook).__name__}.on_batch must return a Batch, "
                                    f"got {type(batch).__name__}")
            logits = model(normalize(batch.images, data.mean, data.std))
            losses = F.cross_entropy(logits, batch.labels, reduction="none")
            loss = losses.mean()
            for hook in hooks:
                loss = hook.loss(state, batch, logits, losses, loss)
                if not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
                    raise TypeError(f"{type(hook).__name__}.loss must return a scalar tensor, "
                                    f"got {getattr(loss, 'shape', type(loss).__name__)}")
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"training loss became {loss.item()} at epoch {epoch}, step {step + 1}: "
                    f"lower the learning rate (now {config.lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            state.step += 1
            for hook in hooks:
                hook.after_step(state, batch)
            scheduler.step()
            loss_sum += loss.detach().double().cpu() * len(batch)
            correct += int((logits.argmax(1) == batch.labels).sum())
            seen += len(batch)
            if progress and (step % 20 == 0 or step + 1 == len(slices)):
                bar.update(0, f"loss {loss.item():.3f}")
            bar.update()
        record = dict(epoch=epoch, loss=float(loss_sum) / seen,
                      train_acc=correct / seen, lr=optimizer.param_groups[0]["lr"],
                      seconds=time.monotonic() - start)
        bar.close(f"loss {record['loss']:.3f}, train acc {100 * record['train_acc']:.1f}%")
        for hook in hooks:
            hook.on_epoch_end(state, record)
        state.history.append(record)
    for hook in hooks:
        hook.on_train_end(state)
    return state.history
