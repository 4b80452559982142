"""The one training loop every stage uses: plain training, poisoned training, training-time defenses.

Data stay in memory as uint8 tensors; each step moves a batch to the device, augments it there as a
whole and normalises it. Under a fixed seed and thread count the loop is deterministic on CPU.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .data import ImageSet, augment_batch, normalize
from .progress import Progress

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


def model_input(images: torch.Tensor, data: ImageSet) -> torch.Tensor:
    """uint8 batch on any device -> normalised float batch."""
    return normalize(images.float().div_(255), data.mean, data.std)


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
          on_epoch_end: Callable[[dict], None] | None = None) -> list[dict]:
    """Train ``model`` in place on ``data``; returns one dict per epoch (loss, accuracy, lr, time).

    The last partial batch is kept, so every sample is seen once per epoch.
    """
    device = torch.device(device)
    model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay, nesterov=False)
    steps_per_epoch = math.ceil(len(data) / config.batch_size)
    scheduler = make_scheduler(optimizer, config, config.epochs * steps_per_epoch)
    order_generator = torch.Generator().manual_seed(seed)
    augment_generator = torch.Generator().manual_seed(seed + 1)
    images, labels = data.images, data.labels
    history = []
    for epoch in range(1, config.epochs + 1):
        model.train()
        start = time.monotonic()
        order = torch.randperm(len(data), generator=order_generator)
        bar = Progress(steps_per_epoch, f"{description} epoch {epoch}/{config.epochs}",
                       enabled=progress)
        loss_sum = torch.zeros((), dtype=torch.float64)
        correct = 0
        for step in range(steps_per_epoch):
            batch = order[step * config.batch_size:(step + 1) * config.batch_size]
            x = images[batch].to(device, non_blocking=True).float().div_(255)
            y = labels[batch].to(device, non_blocking=True)
            if config.augment:
                x = augment_batch(x, crop_padding=augmentation.crop_padding,
                                  flip=augmentation.flip, generator=augment_generator)
            x = normalize(x, data.mean, data.std)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"training loss became {loss.item()} at epoch {epoch}, step {step + 1}: "
                    f"lower the learning rate (now {config.lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach().double().cpu() * len(batch)
            correct += int((logits.argmax(1) == y).sum())
            if progress and (step % 20 == 0 or step + 1 == steps_per_epoch):
                bar.update(0, f"loss {loss.item():.3f}")
            bar.update()
        record = dict(epoch=epoch, loss=float(loss_sum) / len(data),
                      train_acc=correct / len(data), lr=optimizer.param_groups[0]["lr"],
                      seconds=time.monotonic() - start)
        bar.close(f"loss {record['loss']:.3f}, train acc {100 * record['train_acc']:.1f}%")
        history.append(record)
        if on_epoch_end is not None:
            on_epoch_end(record)
    return history
