"""Look inside a model by stage name: what a layer inserted after a stage would see."""

from __future__ import annotations

import torch
from torch import nn


def get_stage_names(model: nn.Module) -> tuple[str, ...]:
    """The model's ``stage_names``, checked to exist as top-level child modules."""
    names = getattr(model, "stage_names", None)
    if names is None:
        raise AttributeError(
            f"{type(model).__name__} has no 'stage_names'; build it with "
            "eigenguard.models.create_model or give it a stage_names tuple"
        )
    children = dict(model.named_children())
    missing = [n for n in names if n not in children]
    if missing:
        raise AttributeError(f"{type(model).__name__} lists stages {missing} it does not have")
    return tuple(names)


@torch.no_grad()
def stage_output_shapes(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Run ``x`` through ``model`` (in its current mode) and record each stage's output shape.

    The dict's order is the order the stages fired in. In train mode the pass also
    updates BatchNorm running statistics, so call ``model.eval()`` first to leave it as is.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name in get_stage_names(model):
        module = getattr(model, name)

        def hook(_mod, _inp, out, name=name):
            shapes[name] = tuple(out.shape)

        handles.append(module.register_forward_hook(hook))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return shapes
