"""Offline probe behind docs/SIEVE.md ("Rows the sieve misses, epoch by epoch"): replay a stored
*sieve* run's training with its defense (same poisoned set, seeds, schedule, augmentation) and
keep, for every training row of every batch, whether the layer flagged it, the network's
probability of the row's label in that forward, and the harness's ground truth (poisoned or not,
the true class; for scoring only). From the saved rows, ``--rules`` scores row rules the layer
could add, over epochs: a memory (a sample flagged once stays flagged, by its training index)
and a loss rule (a row of the suspect label the network gives less than p of its label).

    PYTHONPATH=src:scripts/sieve-probes .venv/bin/python scripts/sieve-probes/flag-history.py RUN OUT.pt
    .venv/bin/python scripts/sieve-probes/flag-history.py --rules OUT.pt

Store: results/results.sqlite.
"""
import sys

import torch

from eigenguard.sieve import HandLabels, find_sieves
from probe_data import replay_defended

class RecordingHands(HandLabels):
    """HandLabels that also keeps, per batch, the rows' flags and label probabilities."""

    def __init__(self, layers, poisoned):
        super().__init__(layers)
        self.poisoned = poisoned
        self.rows: list[dict] = []

    def loss(self, state, batch, logits, losses, loss):
        layer = self.layers[0]
        flagged = (layer.flagged_last.cpu() if layer.flagged_last is not None
                   else torch.zeros(len(batch.labels), dtype=torch.bool))
        with torch.no_grad():
            p = logits.float().softmax(1).gather(1, batch.labels.long().view(-1, 1)).squeeze(1)
        self.rows.append({"epoch": state.epoch, "indices": batch.indices.clone(),
                          "labels": batch.labels.clone(), "flagged": flagged.clone(),
                          "p_label": p.cpu(),
                          "suspect": layer.suspect.nonzero().flatten().tolist(),
                          "poisoned": self.poisoned.is_poisoned[batch.indices].clone(),
                          "original": self.poisoned.original_labels[batch.indices].clone()})
        return super().loss(state, batch, logits, losses, loss)


def record(key: str, out: str) -> None:
    config, _, _, _, _, hands = replay_defended(
        key, lambda model, poisoned: RecordingHands(find_sieves(model), poisoned))
    torch.save({"key": key, "attack": config.attack, "seed": config.seed,
                "target": config.target, "rows": hands.rows}, out)
    print(f"{key[:8]}: {len(hands.rows)} batches kept in {out}")


def rules(path: str, thresholds=(0.3, 0.5, 0.7)) -> None:
    saved = torch.load(path)
    target = saved["target"]
    rows = saved["rows"]
    epochs = sorted({r["epoch"] for r in rows})
    cat = {name: torch.cat([r[name] for r in rows]) for name in
           ("indices", "labels", "flagged", "p_label", "poisoned", "original")}
    epoch = torch.cat([torch.full((len(r["labels"]),), r["epoch"]) for r in rows])
    in_label = cat["labels"] == target
    print(f"{saved['key'][:8]} {saved['attack']} seed {saved['seed']}: rows of label {target}, "
          f"share flagged by the layer (poison % / clean %), and rules it could add")
    header = ["epoch", "layer", "memory"] + [f"p<{t}" for t in thresholds] + [
        f"mem+p<{t}" for t in thresholds]
    print(" | ".join(header) + " | look-alikes (dress/shirt) layer → memory → mem+p<0.5")
    memory = torch.zeros(int(cat["indices"].max()) + 1, dtype=torch.bool)
    for e in epochs:
        now = (epoch == e) & in_label
        bad, good = now & cat["poisoned"], now & ~cat["poisoned"]
        layer = cat["flagged"]
        remembered = layer | memory[cat["indices"]]

        def share(flag, group):
            return 100.0 * float((flag & group).sum()) / max(int(group.sum()), 1)

        cells = [str(e), f"{share(layer, bad):.1f} / {share(layer, good):.1f}",
                 f"{share(remembered, bad):.1f} / {share(remembered, good):.1f}"]
        for t in thresholds:
            low = layer | (cat["p_label"] < t)
            cells.append(f"{share(low, bad):.1f} / {share(low, good):.1f}")
        for t in thresholds:
            low = remembered | (cat["p_label"] < t)
            cells.append(f"{share(low, bad):.1f} / {share(low, good):.1f}")
        alike = []
        for cls in (3, 6):
            group = bad & (cat["original"] == cls)
            alike.append(f"{share(layer, group):.0f}→{share(remembered, group):.0f}→"
                         f"{share(remembered | (cat['p_label'] < 0.5), group):.0f}")
        print(" | ".join(cells) + " | " + " / ".join(alike))
        memory[cat["indices"][(epoch == e) & layer]] = True


if __name__ == "__main__":
    if sys.argv[1] == "--rules":
        rules(sys.argv[2])
    else:
        record(sys.argv[1], sys.argv[2])
