"""The images a stored run is analysed on, rebuilt from its config exactly as the run made them.

The analysis is the harness's, not a defense's, so it may use the ground truth: which training
samples were poisoned. Three kinds of images, each ``count`` of them, drawn with the analysis
seed from the run's own training split:

- ``clean``: training images that were not poisoned and whose class is not the target;
- ``triggered``: the same images with the run's fitted trigger (``attack.apply``), so row i of
  each is the same image, and f(triggered) − f(clean) is the trigger's feature shift;
- ``mix``: training samples as the victim received them (poisoned ones included, at the run's
  poison ratio), with the mask of the poisoned ones: what a training batch looks like.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import ImageSet
from ..experiment import RunConfig, rebuild_run
from ..seeding import generator
from ..store import ResultStore, StoredRun


@dataclass
class AnalysisSamples:
    clean: torch.Tensor  # uint8 N × C × H × W
    triggered: torch.Tensor  # the same images with the trigger
    clean_labels: torch.Tensor
    mix: torch.Tensor
    mix_labels: torch.Tensor  # as trained on (poisoned labels)
    mix_poisoned: torch.Tensor  # bool mask
    data: ImageSet  # the training split (normalisation, class names)
    poison_ratio: float


@dataclass
class LoadedRun:
    config: RunConfig
    model: torch.nn.Module
    samples: AnalysisSamples


def load_for_analysis(store: ResultStore, run: StoredRun, *, count: int, seed: int = 0,
                      data_root=None) -> LoadedRun:
    """The run's model (checkpoint loaded) and ``count`` images of each kind."""
    if run.status not in ("finished", "evaluation-failed"):
        raise ValueError(f"run {run.key[:8]} is {run.status}: only a trained run can be "
                         "analysed")
    if not run.checkpoint or not store.resolve(run.checkpoint).exists():
        raise ValueError(f"run {run.key[:8]} has no checkpoint in this store (runs imported "
                         "from JSON Lines carry none): run it again with `eigenguard run` or "
                         "`eigenguard sweep` to train it here")
    rebuilt = rebuild_run(store, run, data_root=data_root)
    return LoadedRun(rebuilt.config, rebuilt.model,
                     draw_samples(rebuilt.splits.train, rebuilt.poisoned, rebuilt.attack,
                                  rebuilt.config, count=count, seed=seed))


def draw_samples(train: ImageSet, poisoned, attack, config: RunConfig, *, count: int,
                 seed: int) -> AnalysisSamples:
    if count < 2:
        raise ValueError(f"the analysis needs at least 2 images of each kind, got {count}")
    stream = generator(seed, "analysis-samples")
    candidates = ((~poisoned.is_poisoned) & (train.labels != config.target)).nonzero().flatten()
    if len(candidates) == 0:
        raise ValueError("no clean training image outside the target class to trigger")
    chosen = candidates[torch.randperm(len(candidates), generator=stream)[:count]].sort().values
    mixed = torch.randperm(len(poisoned.data), generator=stream)[:count].sort().values
    return AnalysisSamples(
        clean=train.images[chosen], triggered=attack.apply(train.images[chosen]),
        clean_labels=train.labels[chosen], mix=poisoned.data.images[mixed],
        mix_labels=poisoned.data.labels[mixed], mix_poisoned=poisoned.is_poisoned[mixed],
        data=train, poison_ratio=config.poison_ratio)
