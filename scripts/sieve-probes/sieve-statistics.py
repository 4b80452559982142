"""Offline probe behind docs/SIEVE.md ("The 5% miss"): replay a LabelSieve over the batches kept
by ``capture-plain.py`` (the unaugmented features after ``layer2`` of a run's first epochs) and
print, per window of batches, the poison label's score, the highest clean label's score and which
label that is, the leader's score over the next one's (what the margin is compared with), and
when a label became suspect under the given settings. Runs in seconds, so a statistic or a
decision rule can be compared on several runs (poisoned and clean) before a training run.

    PYTHONPATH=src .venv/bin/python scripts/sieve-probes/sieve-statistics.py CAPTURE.pt \
        [--statistic spread] [--margin 1.2] [--patience 10] [--window 10]

The poison label is the run's target (scoring only); for a clean run it is printed as a clean
label like any other.
"""
import argparse

import torch

from eigenguard.sieve import STATISTICS, LabelSieve


def replay(capture: dict, **settings) -> list[dict]:
    """One row per batch: the epoch, every label's score (its higher side), the suspect labels."""
    layer = LabelSieve(10, **settings).train()
    rows = []
    for batch in capture["batches"]:
        layer.set_labels(batch["labels"])
        layer(batch["features"])
        scores = layer.side_scores().nan_to_num(0).max(1).values
        rows.append({"epoch": batch["epoch"], "scores": scores,
                     "suspect": layer.suspect.nonzero().flatten().tolist()})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("capture")
    parser.add_argument("--statistic", default="spread", choices=STATISTICS)
    parser.add_argument("--margin", type=float, default=1.2)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--threshold", type=float, default=0.6)
    parser.add_argument("--window", type=int, default=10)
    args = parser.parse_args()
    capture = torch.load(args.capture)
    target = capture["target"]
    rows = replay(capture, statistic=args.statistic, margin=args.margin,
                  patience=args.patience, threshold=args.threshold)
    print(f"{capture['key'][:8]} {capture['attack']} {capture['poison_ratio']:g} seed "
          f"{capture['seed']}: {args.statistic}, margin {args.margin}, patience {args.patience}")
    first = next((i for i, row in enumerate(rows) if row["suspect"]), None)
    if first is not None:
        print(f"  suspect from batch {first + 1}: label {rows[first]['suspect']}")
    for end in range(args.window - 1, len(rows), args.window):
        row = rows[end]
        scores = row["scores"]
        others = scores.clone()
        others[target] = -1
        best = int(others.argmax())
        top = scores.topk(2)
        print(f"  epoch {row['epoch']} batch {end + 1:3d}: label {target} "
              f"{float(scores[target]):.3f} | best other {best} {float(scores[best]):.3f} | "
              f"leader {int(top.indices[0])} "
              f"by {float(top.values[0] / top.values[1].clamp(min=1e-9)):.2f}")


if __name__ == "__main__":
    main()
