"""Evaluation of models with EigenGuard layers: the layer mode each protocol runs in, and the
mixed protocol computed exactly through a bordered Gram matrix instead of one batch per image.

Kept apart from :mod:`eigenguard.evaluate`, which defines the protocols for any model and knows
nothing of how a layer filters; the EigenGuard defense declares its protocols and hands these in.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .data import ImageSet
from .evaluate import TriggeredTestSet, batch_logits, mixed_companions, naive_mixed_logits
from .layer import EigenGuard, find_guards, guards_in_mode
from .progress import Progress
from .train import model_input

#: the layer mode each protocol evaluates (a batch of one passes the batch filter unchanged)
PROTOCOL_MODES = {"triggered": "batch", "mixed": "batch", "single": "identity",
                  "running": "running"}


def protocols_for(model: nn.Module) -> tuple[str, ...]:
    """Every protocol that applies to a model with EigenGuard ("running" once it has running
    statistics), the standard one otherwise."""
    guards = [layer for _, layer in find_guards(model)]
    if not guards:
        return ("triggered",)
    if all(layer.has_running_stats for layer in guards):
        return tuple(PROTOCOL_MODES)
    return tuple(p for p in PROTOCOL_MODES if p != "running")


class _Captured(Exception):
    """Stops a forward pass once the guard's input has been read."""


@torch.no_grad()
def _features_before(model, layer: EigenGuard, images, data, batch_size, device) -> torch.Tensor:
    captured = []

    def capture(module, args):
        captured.append(args[0].detach())
        raise _Captured

    handle = layer.register_forward_pre_hook(capture)
    try:
        for i in range(0, len(images), batch_size):
            try:
                model(model_input(images[i:i + batch_size].to(device), data))
            except _Captured:
                pass
    finally:
        handle.remove()
    return torch.cat(captured)


@contextmanager
def _guard_output(layer: EigenGuard, features: torch.Tensor):
    """Make ``layer`` return ``features`` (the layer itself runs in identity mode meanwhile)."""
    handle = layer.register_forward_hook(lambda module, args, output: features)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def mixed_logits(model: nn.Module, test: ImageSet, triggered: TriggeredTestSet, *,
                      seed: int = 0, chunk: int = 64, device="cpu",
                      progress: bool = True) -> torch.Tensor:
    """The mixed protocol through a bordered Gram matrix, without building any batch.

    Features before the guard are computed once for every clean and triggered test image, and so
    is the clean Gram matrix. For triggered image i with companions S_i, the Gram matrix of its
    batch is the clean block G[S_i, S_i] bordered by the row F_t,i F[S_i]ᵀ; it gives the filter
    matrix P, of which only image i's row is applied, F'_i = P_i [F[S_i]; F_t,i]. The rest of the
    network then runs on F'_i alone (evaluation-mode layers after the guard treat samples
    independently). Equal to the definition (:func:`naive_mixed_logits`) up to float
    rounding; tested.
    """
    model.eval().to(device)
    companions = mixed_companions(triggered, len(test), seed)
    guards = find_guards(model)
    if len(guards) != 1:  # several guards interact: fall back to the definition
        return naive_mixed_logits(model, test, triggered, companions, device)
    layer = guards[0][1]
    if layer.eval_mode != "batch":  # each image is filtered alone: its batch does not matter
        return batch_logits(model, triggered.images, test, 128, device)
    clean = _features_before(model, layer, test.images, test, 256, device)
    trig = _features_before(model, layer, triggered.images, test, 256, device)
    shape, dtype = trig.shape[1:], trig.dtype
    work_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    clean, trig = clean.flatten(1), trig.flatten(1)
    clean_exact = clean.to(torch.float64)
    clean_gram = clean_exact @ clean_exact.T  # (N, N), shared by every batch
    clean_work = clean.to(work_dtype)
    companions = companions.to(clean.device)
    bar = Progress(len(trig), "mixed protocol", enabled=progress)
    logits = []
    for start in range(0, len(trig), chunk):
        rows_t = trig[start:start + chunk]
        comp = companions[start:start + chunk]  # (c, 127)
        exact_t = rows_t.to(torch.float64)
        border = (exact_t @ clean_exact.T).gather(1, comp)  # (c, 127)
        corner = (exact_t * exact_t).sum(1)
        c, m = comp.shape
        gram = torch.empty(c, m + 1, m + 1, dtype=torch.float64, device=clean.device)
        gram[:, :m, :m] = clean_gram[comp.unsqueeze(2), comp.unsqueeze(1)]
        gram[:, m, :m] = border
        gram[:, :m, m] = border
        gram[:, m, m] = corner
        weights = layer.weights_from_gram(gram)[:, m, :].to(work_dtype)  # (c, m + 1)
        dense = torch.zeros(c, len(clean), dtype=work_dtype, device=clean.device)
        dense.scatter_(1, comp, weights[:, :m])
        filtered = dense @ clean_work + weights[:, m:] * rows_t.to(work_dtype)
        filtered = filtered.to(dtype).reshape(-1, *shape)
        with guards_in_mode(model, "identity"), _guard_output(layer, filtered):
            batch = triggered.images[start:start + chunk].to(device)
            logits.append(model(model_input(batch, test)).cpu())
        bar.update(c)
    bar.close()
    return torch.cat(logits) if logits else torch.empty(0, test.num_classes)
