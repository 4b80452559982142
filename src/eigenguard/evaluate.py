"""ACC, ASR, RA and DER, and the evaluation protocols that batch-dependent models need.

A model whose layers look at the whole batch (EigenGuard filters each batch) gives a prediction
that depends on the rest of its batch, so the protocol is part of every result. A protocol says
how the test batches are composed:

- ``triggered``: triggered test images in fixed order, batches of 128, partial last batch kept
  (the usual benchmark protocol; every batch is fully triggered);
- ``mixed``: each triggered image inside a batch with 127 clean test images drawn with a fixed
  seed, its own clean original excluded; only its prediction counts;
- ``single``: batches of one;
- ``running``: batches of 128 with the model in its batch-independent mode (a layer that keeps
  running statistics filters each image alone with them).

Each defense declares the protocols that apply to its models and the state a protocol puts its
model in (:meth:`eigenguard.defenses.Defense.evaluation_mode`); a model that does not depend on
its batch needs ``triggered`` only. ACC is measured on clean test batches of the protocol's batch
size (128, or 1 for ``single``).

Label modes. All-to-one (the default): the triggered test set holds the test images whose true
class is not the target, and ASR is the fraction predicted as the target. All-to-all: it holds
every test image, each with its own target (y + 1) mod C, and ASR is the fraction predicted as
their own target. In both, RA is the fraction predicted as their true class; the per-image
targets travel with the triggered set (:attr:`TriggeredTestSet.targets`), so every protocol
scores against them.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .attacks import Attack
from .attacks.base import all_to_all_targets, check_label_mode
from .data import ImageSet
from .train import model_input

PROTOCOLS = ("triggered", "mixed", "single", "running")
MIXED_COMPANIONS = 127
#: the values of one evaluation recorded as metrics
EVALUATION_METRICS = ("acc", "asr", "ra", "batch_size", "n_clean", "n_triggered")


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

    def metric_rows(self, split: str = "test", eval_seed: int = 0) -> list[dict]:
        """The evaluation in the store's long format, one row per metric."""
        return [dict(split=split, protocol=self.protocol, metric=name,
                     value=float(getattr(self, name)), eval_seed=eval_seed)
                for name in EVALUATION_METRICS]


def der(acc_undefended: float, asr_undefended: float, acc_defended: float,
        asr_defended: float) -> float:
    """Defense effectiveness rating (BackdoorBench): [max(0, ΔASR) − max(0, ΔACC) + 1] / 2."""
    return (max(0.0, asr_undefended - asr_defended) - max(0.0, acc_undefended - acc_defended)
            + 1) / 2


def check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {protocol!r}; choose from {PROTOCOLS}")


@dataclass(frozen=True, eq=False)
class TriggeredTestSet:
    """Test images whose attack target differs from their true class, with the trigger added,
    and each image's target (``targets``; every one ``target`` in all-to-one mode, the default
    when ``targets`` is not given)."""

    images: torch.Tensor
    labels: torch.Tensor  # true classes
    source_indices: torch.Tensor  # positions of the clean originals in the test set
    target: int | None  # the all-to-one target; None when the targets differ per image
    targets: torch.Tensor | None = None  # int64, the target of each image

    def __post_init__(self):
        if self.targets is None:
            if self.target is None:
                raise ValueError("a triggered test set needs a target or per-image targets")
            object.__setattr__(self, "targets", torch.full_like(self.labels, self.target))
        elif len(self.targets) != len(self.labels):
            raise ValueError(f"{len(self.targets)} targets for {len(self.labels)} images")

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, index) -> "TriggeredTestSet":
        """The images at ``index`` (a slice or index tensor), each with its label and target."""
        return TriggeredTestSet(self.images[index], self.labels[index],
                                self.source_indices[index], self.target, self.targets[index])


def triggered_test_set(test: ImageSet, attack: Attack, target: int, target_of=None,
                       label_mode: str = "all-to-one") -> TriggeredTestSet:
    """The triggered view of a test set. ``target_of`` maps true labels to the attack's target
    labels; ``label_mode="all-to-all"`` uses (y + 1) mod C. By default every image goes to
    ``target`` and images of the target class are left out; in general, images whose target is
    their own class are left out (none in all-to-all mode)."""
    check_label_mode(label_mode)
    if label_mode == "all-to-all":
        if target_of is not None:
            raise ValueError("give either target_of or label_mode='all-to-all', not both")
        target_of = lambda labels: all_to_all_targets(labels, test.num_classes)  # noqa: E731
    if target_of is None:
        source = (test.labels != target).nonzero().flatten()
        return TriggeredTestSet(attack.apply(test.images[source]), test.labels[source], source,
                                target)
    targets = target_of(test.labels)
    source = (targets != test.labels).nonzero().flatten()
    return TriggeredTestSet(attack.apply(test.images[source]), test.labels[source], source, None,
                            targets[source])


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


def evaluate(model: nn.Module, test: ImageSet, attack: Attack, target: int,
             protocol: str = "triggered", *, batch_size: int = 128, seed: int = 0,
             device: str | torch.device = "cpu", progress: bool = True,
             defense=None, label_mode: str = "all-to-one") -> Evaluation:
    """Measure ACC on the clean test set and ASR / RA on its triggered images: the non-target
    ones (all-to-one), or every one, each with target (y + 1) mod C (all-to-all).

    ``defense`` (the one that built the model) puts the model in each protocol's state and may
    compute the mixed protocol faster; without it the model is evaluated as it is.
    """
    check_protocol(protocol)
    attack.check_fitted()
    triggered = triggered_test_set(test, attack, target, label_mode=label_mode)
    mode = defense.evaluation_mode(model, protocol) if defense is not None else nullcontext()
    with mode:
        if protocol == "single":
            batch_size = 1  # computed in larger batches where the defense says they are the same
            independent = defense is not None and defense.batch_independent(model, protocol)
            compute = 256 if independent else 1
            clean_pred = predict(model, test.images, test, compute, device)
            trig_pred = predict(model, triggered.images, test, compute, device)
        else:
            clean_pred = predict(model, test.images, test, batch_size, device)
            if protocol == "mixed":
                logits = None
                if defense is not None:
                    logits = defense.mixed_logits(model, test, triggered, seed=seed,
                                                  device=device, progress=progress)
                if logits is None:
                    companions = mixed_companions(triggered, len(test), seed)
                    logits = naive_mixed_logits(model, test, triggered, companions, device)
                trig_pred = logits.argmax(1)
            else:
                trig_pred = predict(model, triggered.images, test, batch_size, device)
    acc = (clean_pred == test.labels).double().mean().item()
    asr = (trig_pred == triggered.targets).double().mean().item()
    ra = (trig_pred == triggered.labels).double().mean().item()
    return Evaluation(protocol, batch_size, acc, asr, ra, len(test), len(triggered.labels))


def mixed_companions(triggered: TriggeredTestSet, test_size: int, seed: int,
                     count: int = MIXED_COMPANIONS) -> torch.Tensor:
    """(M, count) clean test indices for each triggered image, its own original excluded."""
    if test_size - 1 < count:
        raise ValueError(f"the mixed protocol needs at least {count + 1} test images (each "
                         f"triggered image among {count} clean ones), got {test_size}: use a "
                         f"larger --test-size or evaluate without the mixed protocol")
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


def detection_metrics(flagged: torch.Tensor, is_poisoned: torch.Tensor) -> list[dict]:
    """TPR (poisoned samples flagged) and FPR (clean samples flagged) of a detector, computed by
    the harness, which alone holds the poison indices."""
    mask = torch.zeros_like(is_poisoned)
    mask[flagged.long()] = True
    poisoned, clean = int(is_poisoned.sum()), int((~is_poisoned).sum())
    tpr = float((mask & is_poisoned).sum()) / poisoned if poisoned else 0.0
    fpr = float((mask & ~is_poisoned).sum()) / clean if clean else 0.0
    return [dict(split="train", protocol="detection", metric=name, value=value)
            for name, value in (("tpr", tpr), ("fpr", fpr), ("flagged", float(mask.sum())))]
