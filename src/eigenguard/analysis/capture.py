"""What the spectral analysis reads from a model: the flattened features at each stage, and at
each EigenGuard layer its input and its output in a given mode.

A stage's features are what the next stage receives (after any EigenGuard layer that follows
it), with the layers in their running mode, the batch-independent evaluation, unless another is
asked. Batches go through in the order given, ``batch_size`` at a time; the batch mode of a layer
filters each of these batches, so a batch of one kind (all clean, all triggered, a mix) is
filtered as the layer would filter it at that composition.
"""
from __future__ import annotations

from contextlib import ExitStack

import torch
from torch import nn

from ..data import ImageSet
from ..layer import EigenGuard, find_guards, guards_in_mode
from ..models.stages import get_stage_names
from ..train import model_input

#: suffixes of an EigenGuard layer's capture points: what it receives, what it passes on
GUARD_INPUT, GUARD_OUTPUT = "in", "out"


def capture_points(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Name -> (module, "in" or "out"): every stage's output, and each EigenGuard layer's input
    and output (named ``<layer name>.in`` / ``.out``), in forward order as listed."""
    points = {name: (getattr(model, name), GUARD_OUTPUT) for name in get_stage_names(model)}
    for name, layer in find_guards(model):
        points[f"{name}.{GUARD_INPUT}"] = (layer, GUARD_INPUT)
        points[f"{name}.{GUARD_OUTPUT}"] = (layer, GUARD_OUTPUT)
    return points


@torch.no_grad()
def capture_features(model: nn.Module, images: torch.Tensor, data: ImageSet, *,
                     points: dict[str, tuple[nn.Module, str]] | None = None,
                     guard_mode: str = "running", device="cpu",
                     batch_size: int = 128) -> dict[str, torch.Tensor]:
    """Flattened float32 features (N × D, on the CPU) at each capture point for uint8
    ``images``, the model in evaluation mode and every EigenGuard layer in ``guard_mode``."""
    points = capture_points(model) if points is None else points
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in points}
    was_training = model.training
    model.eval().to(device)
    with ExitStack() as stack:
        stack.enter_context(guards_in_mode(model, guard_mode))
        for name, (module, where) in points.items():
            def keep(value, name=name):
                captured[name].append(value.detach().flatten(1).float().cpu())

            handle = (module.register_forward_pre_hook(lambda _m, args, keep=keep: keep(args[0]))
                      if where == GUARD_INPUT else
                      module.register_forward_hook(lambda _m, _a, out, keep=keep: keep(out)))
            stack.callback(handle.remove)
        for start in range(0, len(images), batch_size):
            model(model_input(images[start:start + batch_size].to(device), data))
    model.train(was_training)
    return {name: torch.cat(parts) if parts else torch.empty(0) for name, parts in
            captured.items()}


def running_directions(layer: EigenGuard) -> torch.Tensor:
    """The layer's running top-k directions as rows (k × d): the subspace its running mode
    equalises, everything else being multiplied by its tail scale."""
    if not layer.has_running_stats:
        raise ValueError("this EigenGuard layer has no running statistics (it was never "
                         "trained with track_running_stats)")
    return layer.running_basis[:, :layer.k].T.double()
