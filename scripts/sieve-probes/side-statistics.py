"""Offline probe behind docs/SIEVE.md ("The 5% miss"): label by label, over windows of the batches
``capture-plain.py`` kept, the two-means cut along the label's top direction and, for each side,
its size, its poisoned share (harness ground truth), its ``spread`` (what the sieve's default
statistic scores: over how many other labels the side's rows lie once their common offset is
taken away, 1 = evenly over every other label) and its ``fit`` (the median squared distance of
those rows to the nearest other label's mean, over that label's own mean squared distance to its
mean: about 1 or below when the rows are typical images of other classes). Computed on each
window as a whole, not as the layer's running estimates, so it shows what the features hold,
not when the layer would act.

    PYTHONPATH=src .venv/bin/python scripts/sieve-probes/side-statistics.py CAPTURE.pt
"""
import math
import sys

import torch

WINDOWS = ((20, 40), (40, 60), (60, 80), (80, 100), (120, 160))


def two_means_sides(coordinate: torch.Tensor, rounds: int = 50) -> torch.Tensor:
    cut = 0.0
    for _ in range(rounds):
        low, high = coordinate[coordinate <= cut], coordinate[coordinate > cut]
        if not len(low) or not len(high):
            break
        cut = float((low.mean() + high.mean()) / 2)
    return coordinate > cut


def side_numbers(side_rows, side_bad, label, means, centre, typical) -> str:
    if len(side_rows) < 5:
        return "-"
    moved = side_rows - side_rows.mean(0) + centre
    distance = torch.cdist(moved, means) ** 2
    distance[:, label] = math.inf
    nearest = distance.argmin(1)
    share = torch.bincount(nearest, minlength=len(means)).double() / len(side_rows)
    spread = float((-(share * share.clamp(min=1e-300).log()).sum()).exp() / (len(means) - 1))
    fit = float((distance.min(1).values / typical[nearest]).median())
    return (f"n {len(side_rows)} poisoned {float(side_bad.double().mean()):.2f} spread "
            f"{spread:.2f} fit {fit:.2f}")


def main() -> None:
    torch.set_grad_enabled(False)
    capture = torch.load(sys.argv[1])
    print(f"{capture['key'][:8]} {capture['attack']} {capture['poison_ratio']:g} seed "
          f"{capture['seed']} (poison label {capture['target']} where poisoned)")
    for low, high in WINDOWS:
        batches = capture["batches"][low:high]
        rows = torch.cat([b["features"] for b in batches]).double()
        labels = torch.cat([b["labels"] for b in batches])
        bad = torch.cat([b["poisoned"] for b in batches])
        classes = int(labels.max()) + 1
        means = torch.stack([rows[labels == c].mean(0) for c in range(classes)])
        typical = torch.stack([((rows[labels == c] - means[c]) ** 2).sum(1).mean()
                               for c in range(classes)])
        print(f"  batches {low + 1}-{high}")
        for label in range(classes):
            mine, mine_bad = rows[labels == label], bad[labels == label]
            centred = mine - mine.mean(0)
            direction = torch.linalg.svd(centred, full_matrices=False)[2][0]
            sides = two_means_sides(centred @ direction)
            cells = [side_numbers(mine[sides == which], mine_bad[sides == which], label, means,
                                  means.mean(0), typical) for which in (False, True)]
            print(f"    label {label}: " + " | ".join(cells))


if __name__ == "__main__":
    main()
