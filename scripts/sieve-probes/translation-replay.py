"""Offline probe behind docs/SIEVE.md ("The clean-label attacks, looked into"): does the
translation-mixing statistic (``probe_data.translation_mixing``) single out a clean-label poison
label while the network trains, as it does on the trained model? Over the batches a capture
holds (``capture-plain.py RUN EPOCHS OUT.pt STAGE``: the unaugmented images' features, as the
sieve's default view reads them), every ``every`` batches, each label's rows of the last
``window`` batches; per window the poison label's value, its rank and the largest other
label's. The poisoned rows are the harness's ground truth, for naming the poison label only.

    .venv/bin/python scripts/sieve-probes/translation-replay.py CAPTURE.pt [WINDOW] [EVERY]
"""
import sys

import torch

from probe_data import translation_mixing


def main() -> None:
    capture = torch.load(sys.argv[1])
    window = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    every = int(sys.argv[3]) if len(sys.argv) > 3 else 10
    batches, target = capture["batches"], capture["target"]
    print(f"{capture['key'][:8]} {capture['attack']} {capture['poison_ratio']:g} seed "
          f"{capture['seed']} at {capture.get('stage', 'layer2')}: windows of {window} batches")
    print("| epoch | batch | rows of the poison label (poisoned) | its mixing (rank) | largest "
          "other (label) |")
    for end in range(window, len(batches) + 1, every):
        recent = batches[end - window:end]
        features = torch.cat([batch["features"] for batch in recent])
        labels = torch.cat([batch["labels"] for batch in recent])
        poisoned = torch.cat([batch["poisoned"] for batch in recent])
        mixing = {label: translation_mixing(features[labels == label])
                  for label in labels.unique().tolist()}
        own = mixing[target]
        others = {label: value for label, value in mixing.items() if label != target}
        top = max(others, key=others.get)
        rank = 1 + sum(value > own for value in others.values())
        print(f"| {recent[-1]['epoch']} | {end} | {int((labels == target).sum())} "
              f"({int(poisoned.sum())}) | {own:.2f} ({rank}) | {others[top]:.2f} ({top}) |")


if __name__ == "__main__":
    main()
