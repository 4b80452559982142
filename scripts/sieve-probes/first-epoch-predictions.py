"""Offline probe behind docs/SIEVE.md: when, inside the first epoch, a stored run's model learns
its backdoor. Replays the run's training (same poisoned set, seeds, schedule and augmentation)
with a hook that keeps each batch's labels and predicted classes, and stops after epoch 1. Per
window of 10 batches: how many poisoned rows the network predicts as the target, against how
many clean rows of the other classes (the rate the network sends everything there); and per
label, the share of its rows predicted as another class.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python scripts/sieve-probes/first-epoch-predictions.py 201451d5

Store: results/results.sqlite. The poison flags are the harness's ground truth, used to score.
"""
import sys

import torch

from eigenguard.train import TrainHook
from probe_data import ReplayOver, replay_training

WINDOW = 10


class KeepPredictions(TrainHook):
    def __init__(self, poisoned: torch.Tensor):
        self.poisoned, self.batches = poisoned, []

    def loss(self, state, batch, logits, losses, loss):
        self.batches.append((batch.labels.cpu(), logits.argmax(1).cpu(),
                             self.poisoned[batch.indices]))
        return loss

    def on_epoch_end(self, state, record):
        raise ReplayOver


def share(mask: torch.Tensor) -> float:
    return float(mask.double().mean()) if mask.numel() else float("nan")


def main() -> None:
    config, _, keep = replay_training(
        sys.argv[1], lambda model, poisoned, info: KeepPredictions(poisoned.is_poisoned))
    target = config.target
    print(f"{sys.argv[1][:8]} {config.attack}, epoch 1 ({len(keep.batches)} batches); "
          "per label: share of its rows predicted as another class")
    for first in range(0, len(keep.batches), WINDOW):
        labels, predicted, bad = (torch.cat(parts) for parts in
                                  zip(*keep.batches[first:first + WINDOW]))
        labels_wrong = " ".join(f"{share(predicted[labels == c] != c):.2f}"
                                for c in range(int(labels.max()) + 1))
        print(f"  batches {first:2d}-{first + WINDOW - 1:2d}: poisoned -> target "
              f"{share(predicted[bad] == target):.2f}, clean rows of other classes -> target "
              f"{share(predicted[~bad & (labels != target)] == target):.2f} | {labels_wrong}")


if __name__ == "__main__":
    main()
