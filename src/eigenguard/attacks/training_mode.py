"""The training-controlled threat model shared by WaNet, Input-aware and BppAttack.

Two threat models are supported, chosen by each of these attacks' ``mode`` setting:

- ``"data"`` (the benchmark's default): the attack hands over a poisoned training set and
  nothing else; :meth:`~eigenguard.attacks.base.Attack.training_hooks` returns no hook.
- ``"training"`` (the papers' own): the attacker also runs the victim's training. A
  :class:`BatchPoisoner` hook replaces ``round(ratio · B)`` samples of every batch of B with
  triggered copies relabelled to the target, plus the paper's extra samples that keep their
  labels (WaNet's noise mode, Input-aware's cross samples, BppAttack's negatives), drawn afresh
  in each batch from the hook's own seeded generator.

What ``poison()`` returns in training mode: the *materialised* poisoned set, exactly the set the
data mode of the same settings returns. Defenses that inspect or filter data (and the harness's
detection metrics) then see real poisoned samples, with their ground truth, instead of a clean set
that would let them look perfect. The victim must not get that dose twice, so while it trains on
that very set the hook first puts every materialised sample back as it was (its clean image, not
augmented, and its label) and only then poisons the batch the paper's way: the model sees the
paper's per-batch dose and every clean image. A defense that retrains on a filtered copy of the
set trains without the hooks (the harness attaches them only to the set itself), so it faces
the materialised poison that survived its filter, which is the data-poisoning threat model.

The hook learns the poison ratio, the pool and the materialised set from ``poison()``, which the
run calls before it asks for the hooks; ``training_hooks(target, seed, ratio=...)`` may also be
called without ``poison()`` (on a set of one's own), and then needs the ratio. Training mode
relabels every poisoned sample to one target: all-to-all is refused.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..data import ImageSet
from ..seeding import generator
from ..train import Batch, TrainHook, TrainState
from .base import POISON_POOLS, Attack, PoisonedSet, is_real

#: the threat models: the attack hands over data, or it also controls training
MODES = ("data", "training")


def check_mode(owner: str, mode) -> None:
    if mode not in MODES:
        raise ValueError(f"{owner} mode must be one of {MODES} (data: a poisoned training set "
                         f"and nothing else; training: the attack also poisons every training "
                         f"batch, as in its paper), got {mode!r}")


def refuse_all_to_all(owner: str, mode: str, label_mode: str) -> None:
    """Training mode relabels each batch's poisoned samples to one target."""
    if mode == "training" and label_mode == "all-to-all":
        raise ValueError(f"{owner} in training mode relabels the samples of every batch to one "
                         "target class: it supports label_mode all-to-one only (use mode 'data' "
                         "for all-to-all)")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] -> uint8 (exact for the loop's images, which are k / 255)."""
    return (images.detach() * 255).round().clamp(0, 255).to(torch.uint8)


def to_float(images: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return images.to(like.device, like.dtype) / 255


@dataclass(frozen=True, eq=False)
class PoisonPlan:
    """What ``poison()`` tells the hooks: the ratio, the pool, and the materialised set (with the
    clean set it came from and the samples it changed, to put them back)."""

    ratio: float
    pool: str
    materialised: ImageSet | None = None
    clean: ImageSet | None = None
    changed: torch.Tensor | None = None  # bool, one per sample of the set

    @classmethod
    def of(cls, poisoned: PoisonedSet, clean: ImageSet, ratio: float, pool: str,
           extra: torch.Tensor | None = None) -> "PoisonPlan":
        changed = poisoned.is_poisoned
        if extra is not None:
            changed[extra] = True
        return cls(float(ratio), pool, poisoned.data, clean, changed)


def plan_for(owner: str, plan: PoisonPlan | None, ratio) -> PoisonPlan:
    """The plan the hooks follow: ``poison()``'s, or a bare one for an explicit ratio."""
    if ratio is not None:
        if not is_real(ratio) or not 0 <= ratio <= 1:
            raise ValueError(f"{owner} training hooks: ratio must be a fraction in [0, 1] (the "
                             f"share of every batch poisoned), got {ratio!r}")
        if plan is None:
            return PoisonPlan(float(ratio), "all")
        return dataclasses.replace(plan, ratio=float(ratio))
    if plan is None:
        raise ValueError(f"{owner} in training mode learns the share of every batch to poison "
                         "from poison(): call poison() first, or pass training_hooks(..., "
                         "ratio=...)")
    return plan


class BatchPoisoner(TrainHook):
    """Poisons every training batch: ``round(ratio · B)`` samples triggered and relabelled to the
    target, then the extra samples (labels kept), each set drawn from the hook's generator.

    Subclasses name their seed stream (``stream``), say how many extra samples a batch gets
    (:meth:`extra_count`) and make the triggered and extra images (:meth:`edit`, which may start
    from :meth:`trigger_rows`). ``last_rows`` holds the rows of the last batch (poisoned, extra),
    for audits and tests.
    """

    #: the name of the seed stream the hook draws its rows from
    stream: str = ""

    def __init__(self, attack: Attack, target: int, seed: int, plan: PoisonPlan):
        if plan.pool not in POISON_POOLS:
            raise ValueError(f"poison pool must be one of {POISON_POOLS}, got {plan.pool!r}")
        self.attack, self.owner = attack, type(attack).__name__
        self.target, self.plan = int(target), plan
        self.draw = generator(seed, self.stream)
        self.last_rows = (torch.zeros(0, dtype=torch.int64),) * 2

    def extra_count(self, batch_size: int, poisoned: int) -> int:
        return 0

    def edit(self, state: TrainState, batch: Batch, poisoned: torch.Tensor,
             extra: torch.Tensor) -> torch.Tensor:
        """The batch's images with rows ``poisoned`` triggered and rows ``extra`` made extra
        samples (a new tensor; labels are the caller's)."""
        raise NotImplementedError

    def trigger_rows(self, batch: Batch, poisoned: torch.Tensor) -> torch.Tensor:
        """A copy of the batch's images with rows ``poisoned`` given the attack's trigger
        (:meth:`~eigenguard.attacks.base.Attack.apply` on their uint8 values)."""
        images = batch.images.clone()
        if len(poisoned):
            rows = poisoned.to(images.device)
            images[rows] = to_float(self.attack.apply(to_uint8(images[rows])), images)
        return images

    def on_batch(self, state: TrainState, batch: Batch) -> Batch:
        batch = self.restore(state, batch)
        poisoned, extra = self.choose(batch)
        self.last_rows = (poisoned, extra)
        if len(poisoned) + len(extra) == 0:
            return batch
        images = self.edit(state, batch, poisoned, extra)
        labels = batch.labels.clone()
        labels[poisoned.to(labels.device)] = self.target
        return Batch(images, labels, batch.indices)

    def restore(self, state: TrainState, batch: Batch) -> Batch:
        """Put the materialised samples of the batch back as they were before poisoning, when
        the victim trains on the materialised set itself (so it is not poisoned twice)."""
        plan = self.plan
        if plan.materialised is None or state.data is not plan.materialised:
            return batch
        rows = plan.changed[batch.indices].nonzero().flatten()
        if len(rows) == 0:
            return batch
        originals = batch.indices[rows]
        images, labels = batch.images.clone(), batch.labels.clone()
        on_device = rows.to(images.device)
        images[on_device] = to_float(plan.clean.images[originals], images)
        labels[on_device] = plan.clean.labels[originals].to(labels.device)
        return Batch(images, labels, batch.indices)

    def choose(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Sorted CPU rows to trigger (from the pool) and, among the rest, the extra rows."""
        size = len(batch)
        order = torch.randperm(size, generator=self.draw)
        if self.plan.pool == "non-target":
            keep = (batch.labels.cpu()[order] != self.target)
            candidates, others = order[keep], order[~keep]
        else:
            candidates, others = order, order[:0]
        count = min(int(round(self.plan.ratio * size)), len(candidates))
        poisoned = candidates[:count]
        rest = torch.cat((candidates[count:], others))
        rest = rest[torch.randperm(len(rest), generator=self.draw)]
        extra = rest[:min(self.extra_count(size, count), len(rest))]
        return poisoned.sort().values, extra.sort().values


def other_rows(rows: torch.Tensor, size: int, draw: torch.Generator) -> torch.Tensor:
    """For each row, a random other row of a batch of ``size`` (itself only when size is 1)."""
    if size < 2:
        return rows.clone()
    shift = torch.randint(1, size, (len(rows),), generator=draw)
    return (rows + shift) % size
