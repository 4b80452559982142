"""Offline probe behind docs/SIEVE.md ("The clean-label attacks, looked into"): could a statistic
inside one label see a clean-label poison that no label-mixing statistic can? On a stored run's
trained model, over all its training samples as trained on (poisoned images, their labels), at
each stage: every label's top-to-second energy ratio σ₁²/σ₂² (label_signatures), the poison
label's rank by it, and along the poison label's top direction the poisoned rows' separation from
its clean rows and the two-means split's accuracy. And how constant the trigger's feature shift
is over the poisoned rows, f(poisoned) − f(original): |mean shift|² / mean |shift|² (1: the same
vector for every row, a pure offset of one group; near 0: no common direction). The poison
indices and the original images are the harness's ground truth, for scoring only.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/sieve-probes/clean-label-split.py RUN [RUN ...]

Store: results/results.sqlite; runs need a checkpoint here.
"""
import sys

import torch

from eigenguard.analysis.capture import capture_features
from eigenguard.analysis.signatures import label_signatures
from eigenguard.experiment import RebuiltRun, rebuild_run
from eigenguard.store import ResultStore
from probe_data import translation_mixing

STAGES = ("layer1", "layer2", "layer3", "layer4")


def shift_constancy(shifts: torch.Tensor) -> float:
    shifts = shifts.double()
    return float(shifts.mean(0).pow(2).sum() / shifts.pow(2).sum(1).mean())


@torch.no_grad()
def probe(rebuilt: RebuiltRun) -> None:
    config, model, train = rebuilt.config, rebuilt.model, rebuilt.splits.train
    poisoned = rebuilt.poisoned
    rows, mask = poisoned.poison_indices, poisoned.is_poisoned
    points = {stage: (getattr(model, stage), "out") for stage in STAGES}
    features = capture_features(model, poisoned.data.images, train, points=points)
    originals = capture_features(model, train.images[rows], train, points=points)
    print(f"{rebuilt.run.key[:8]} {config.attack} {config.poison_ratio:g} {config.defense} seed "
          f"{config.seed}: {len(rows)} poisoned of "
          f"{int((poisoned.data.labels == config.target).sum())} rows labelled {config.target}")
    print("  | stage | poison label's ratio (rank) | largest other | separation (clean sd) | "
          "split accuracy | shift constancy |")
    for stage in STAGES:
        found = label_signatures(features[stage], poisoned.data.labels, mask)
        ratios = found["ratios"]
        rank = 1 + sum(ratio > found["poison_label_ratio"] for ratio in ratios.values())
        constancy = shift_constancy(features[stage][rows] - originals[stage])
        print(f"  | {stage} | {found['poison_label_ratio']:.2f} ({rank}) | "
              f"{found['max_other_ratio']:.2f} | {found['separation']:.2f} | "
              f"{found['split_accuracy']:.3f} | {constancy:.3f} |")
    for stage in ("layer1", "layer2"):
        labels = poisoned.data.labels
        mixing = {label: translation_mixing(features[stage][labels == label])
                  for label in range(train.num_classes)}
        print(f"  translation mixing at {stage}: " + ", ".join(
            f"{label}{'*' if label == config.target else ''} {value:.2f}"
            for label, value in sorted(mixing.items(), key=lambda item: -item[1])))


def main() -> None:
    store = ResultStore("results/results.sqlite")
    for run in (store.find_runs(prefix)[0] for prefix in sys.argv[1:]):
        probe(rebuild_run(store, run))


if __name__ == "__main__":
    main()
