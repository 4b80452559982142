"""ACC, ASR, RA and DER, and the evaluation protocols that batch-dependent models need.

A model containing EigenGuard filters each batch, so a test prediction depends on the rest of its
batch. The protocol is therefore part of every result:

- ``triggered``: triggered test images in fixed order, batches of 128, partial last batch kept
  (the usual benchmark protocol; every batch is fully triggered);
- ``mixed``: each triggered image inside a batch with 127 clean test images drawn with a fixed seed,
  its own clean original excluded; only its prediction counts;
- ``single``: batches of one;
- ``running``: the layer filters each image alone with the subspace it estimated during training
  (``eval_mode="running"``), which makes the model batch-independent.

The first three evaluate the layer in its ``batch`` mode, whatever eval_mode the model was built
with. ACC is measured on clean test batches of the protocol's batch size (128 for ``triggered``
and ``mixed``, whose clean batches are the same, 1 for ``single``). Models without EigenGuard do not
depend on their batch; they are evaluated under ``triggered`` only.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .attacks import Attack
from .data import ImageSet
from .layer import EigenGuard, find_guards
from .progress import Progress
from .train import model_input

PROTOCOLS = ("triggered", "mixed", "single", "running")
#: the layer mode each protocol evaluates (a batch of one passes the batch filter unchanged)
PROTOCOL_MODES = {"triggered": "batch", "mixed": "batch", "single": "identity",
                  "running": "running"}
MIXED_COMPANIONS = 127


@dataclass(frozen=True)
class Evaluation:
    protocol: str
    batch_size: int
    acc: float
    asr: float
    ra: float
    n_clean: int
    n_triggered: int

    def as_dict(self) -> dict:
        return asdict(self)


def der(acc_undefended: float, asr_undefended: float, acc_defended: float,
        asr_defended: float) -> float:
    """Defense effectiveness rating (BackdoorBench): [max(0, ΔASR) − max(0, ΔACC) + 1] / 2."""
    return (max(0.0, asr_undefended - asr_defended) - max(0.0, acc_undefended - acc_defended)
            + 1) / 2


def protocols_for(model: nn.Module) -> tuple[str, ...]:
    """Every protocol that applies to a model with EigenGuard, the standard one otherwise."""
    guards = [layer for _, layer in find_guards(model)]
    if not guards:
        return ("triggered",)
    if all(layer.has_running_stats for layer in guards):
        return PROTOCOLS
    return tuple(p for p in PROTOCOLS if p != "running")


@dataclass(frozen=True, eq=False)
class TriggeredTestSet:
    """Test images whose true class is not the target, with the trigger added."""

    images: torch.Tensor
    labels: torch.Tensor  # true classes
    source_indices: torch.Tensor  # positions of the clean originals in the test set
    target: int


def triggered_test_set(test: ImageSet, attack: Attack, target: int) -> TriggeredTestSet:
    source = (test.labels != target).nonzero().flatten()
    return TriggeredTestSet(attack.apply(test.images[source]), test.labels[source], source, target)


@torch.no_grad()
def batch_logits(model: nn.Module, images: torch.Tensor, data: ImageSet, batch_size: int = 128,
                 device: str | torch.device = "cpu") -> torch.Tensor:
    """Logits for a uint8 image tensor in fixed-order batches, partial last batch kept."""
    model.eval().to(device)
    out = [model(model_input(images[i:i + batch_size].to(device), data)).cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.empty(0, data.num_classes)


def predict(model: nn.Module, images: torch.Tensor, data: ImageSet, batch_size: int = 128,
            device: str | torch.device = "cpu") -> torch.Tensor:
    """Class predictions in fixed-order batches."""
    return batch_logits(model, images, data, batch_size, device).argmax(1)


@contextmanager
def guards_in_mode(model: nn.Module, mode: str):
    """Set every EigenGuard layer's eval_mode for the duration of an evaluation."""
    guards = [layer for _, layer in find_guards(model)]
    saved = [layer.eval_mode for layer in guards]
    for layer in guards:
        layer.eval_mode = mode
    try:
        yield
    finally:
        for layer, saved_mode in zip(guards, saved):
            layer.eval_mode = saved_mode


def evaluate(model: nn.Module, test: ImageSet, attack: Attack, target: int,
             protocol: str = "triggered", *, batch_size: int = 128, seed: int = 0,
             device: str | torch.device = "cpu", progress: bool = True) -> Evaluation:
    """Measure ACC on the clean test set and ASR / RA on its triggered non-target images."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {protocol!r}; choose from {PROTOCOLS}")
    triggered = triggered_test_set(test, attack, target)
    with guards_in_mode(model, PROTOCOL_MODES[protocol]):
        if protocol == "single":
            batch_size = 1  # computed in larger batches: B = 1 passes the filter unchanged (tested)
            clean_pred = predict(model, test.images, test, 256, device)
            trig_pred = predict(model, triggered.images, test, 256, device)
        else:
            clean_pred = predict(model, test.images, test, batch_size, device)
            if protocol == "mixed":
                trig_pred = mixed_logits(model, test, triggered, seed=seed, device=device,
                                         progress=progress).argmax(1)
            else:
                trig_pred = predict(model, triggered.images, test, batch_size, device)
    acc = (clean_pred == test.labels).double().mean().item()
    asr = (trig_pred == target).double().mean().item()
    ra = (trig_pred == triggered.labels).double().mean().item()
    return Evaluation(protocol, batch_size, acc, asr, ra, len(test), len(triggered.labels))


def mixed_companions(triggered: TriggeredTestSet, test_size: int, seed: int,
                     count: int = MIXED_COMPANIONS) -> torch.Tensor:
    """(M, count) clean test indices for each triggered image, its own original excluded."""
    if test_size - 1 < count:
        raise ValueError(f"the mixed protocol needs {count + 1} test images, got {test_size}")
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for source in triggered.source_indices.tolist():
        draw = torch.randperm(test_size - 1, generator=generator)[:count]
        rows.append(draw + (draw >= source).long())
    return torch.stack(rows) if rows else torch.empty(0, count, dtype=torch.int64)


@torch.no_grad()
def naive_mixed_logits(model, test: ImageSet, triggered: TriggeredTestSet,
                       companions: torch.Tensor, device="cpu") -> torch.Tensor:
    """The mixed protocol by its definition: one full batch per triggered image (slow)."""
    model.eval().to(device)
    logits = []
    for i in range(len(triggered.labels)):
        batch = torch.cat([test.images[companions[i]], triggered.images[i:i + 1]])
        logits.append(model(model_input(batch.to(device), test))[-1].cpu())
    return torch.stack(logits) if logits else torch.empty(0, test.num_classes)


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
