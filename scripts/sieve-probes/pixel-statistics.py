"""Offline probe behind docs/SIEVE.md: the label statistics on the images themselves (pixels on
[0, 1], no network), where nothing moves during training. Per label: the two-means cut along its
top direction and the spread score of each side (the effective number of other labels whose mean
image is nearest each row once the side's mean is taken away); for the target label, the cut's
accuracy and the row rule's TPR / FPR with either side taken as the clean one.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python scripts/sieve-probes/pixel-statistics.py 201451d5 ccd9f551

Store: results/results.sqlite. The poison flags are the harness's ground truth, used to score.
"""
import math
import sys

import torch

from eigenguard.analysis.signatures import top_direction, two_means_split
from eigenguard.experiment import RunConfig, load_run_attack, load_run_splits, poison_training_set
from eigenguard.store import ResultStore


def spread(rows: torch.Tensor, means: torch.Tensor, label: int, centre: torch.Tensor) -> float:
    distance = torch.cdist(rows - rows.mean(0) + centre, means)
    distance[:, label] = math.inf
    shares = torch.bincount(distance.argmin(1), minlength=len(means)).double() / len(rows)
    shares = shares[shares > 0]
    return math.exp(-float((shares * shares.log()).sum()))


def main() -> None:
    store = ResultStore("results/results.sqlite")
    for prefix in sys.argv[1:]:
        run = store.find_runs(prefix)[0]
        config = RunConfig.from_dict(run.config)
        splits = load_run_splits(run, None)[1]
        poisoned = poison_training_set(load_run_attack(store, run), config, splits.train)
        pixels = poisoned.data.images.flatten(1).double() / 255
        labels, bad = poisoned.data.labels, poisoned.is_poisoned
        classes = int(labels.max()) + 1
        means = torch.stack([pixels[labels == c].mean(0) for c in range(classes)])
        print(f"{run.key[:8]} {config.attack} {config.poison_ratio}: per label, spread of each "
              "side of its cut (of 9)")
        for label in range(classes):
            rows = pixels[labels == label]
            upper = two_means_split(top_direction(rows)[0])
            line = (f"  {label}: {spread(rows[upper], means, label, pixels.mean(0)):.1f} / "
                    f"{spread(rows[~upper], means, label, pixels.mean(0)):.1f}")
            if label == config.target:
                inside = bad[labels == label]
                agree = float((upper == inside).double().mean())
                line += f"  cut right {max(agree, 1 - agree):.3f}"
                nearest_other = torch.cdist(rows, means) ** 2
                nearest_other[:, label] = math.inf
                for clean_side in (upper, ~upper):
                    own = ((rows - rows[clean_side].mean(0)) ** 2).sum(1)
                    flagged = nearest_other.min(1).values < own
                    line += (f" | TPR {float(flagged[inside].double().mean()):.2f} "
                             f"FPR {float(flagged[~inside].double().mean()):.2f}")
            print(line)


if __name__ == "__main__":
    main()
