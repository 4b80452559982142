"""What the baseline defenses read from a model: penultimate features, stage activations and
per-sample losses, computed in evaluation mode in fixed-order batches without augmentation.

Every model of the registry ends in one linear layer named ``classifier``; its input is the
penultimate representation that Spectral Signatures, Activation Clustering and SPECTRE score.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..data import ImageSet
from ..models.stages import get_stage_names
from ..train import model_input


@contextmanager
def evaluation(model: nn.Module):
    """``model.eval()`` for the block, then the model's former mode again."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _capture(model: nn.Module, module: nn.Module, data: ImageSet, *, device, batch_size: int,
             take_input: bool, reduce) -> torch.Tensor:
    chunks: list[torch.Tensor] = []

    def hook(_module, inputs, output):
        value = inputs[0] if take_input else output
        chunks.append(reduce(value.detach()).cpu())

    handle = module.register_forward_hook(hook)
    try:
        with evaluation(model.to(device)), torch.no_grad():
            for start in range(0, len(data), batch_size):
                model(model_input(data.images[start:start + batch_size].to(device), data))
    finally:
        handle.remove()
    return torch.cat(chunks) if chunks else torch.empty(0)


def classifier_layer(model: nn.Module) -> nn.Linear:
    layer = getattr(model, "classifier", None)
    if not isinstance(layer, nn.Linear):
        raise AttributeError(f"{type(model).__name__} has no linear 'classifier' head; the "
                             "feature-based defenses read its input (build the model with "
                             "eigenguard.create_model)")
    return layer


def penultimate_features(model: nn.Module, data: ImageSet, *, device="cpu",
                         batch_size: int = 256) -> torch.Tensor:
    """The classifier's input for every image of ``data``: a float N × D tensor on the CPU."""
    return _capture(model, classifier_layer(model), data, device=device, batch_size=batch_size,
                    take_input=True, reduce=lambda x: x.flatten(1).float())


def stage_activations(model: nn.Module, data: ImageSet, stage: str, *, device="cpu",
                      batch_size: int = 256, spatial_mean: bool = True) -> torch.Tensor:
    """A stage's output per image: N × C channel means (default) or the whole N × C × H × W."""
    if stage not in get_stage_names(model):
        raise ValueError(f"{type(model).__name__} has no stage {stage!r}; its stages are "
                         f"{', '.join(get_stage_names(model))}")
    reduce = (lambda x: x.float().mean(dim=(2, 3))) if spatial_mean else (lambda x: x.float())
    return _capture(model, getattr(model, stage), data, device=device, batch_size=batch_size,
                    take_input=False, reduce=reduce)


@torch.no_grad()
def per_sample_losses(model: nn.Module, data: ImageSet, *, device="cpu",
                      batch_size: int = 256) -> torch.Tensor:
    """Cross-entropy of each image against its (possibly poisoned) label, in evaluation mode."""
    losses = []
    with evaluation(model.to(device)):
        for start in range(0, len(data), batch_size):
            images = model_input(data.images[start:start + batch_size].to(device), data)
            labels = data.labels[start:start + batch_size].to(device)
            losses.append(F.cross_entropy(model(images), labels, reduction="none").cpu())
    return torch.cat(losses) if losses else torch.empty(0)
