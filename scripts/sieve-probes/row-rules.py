"""Offline probe behind docs/SIEVE.md ("Where the rest gets through"): which rows of the poison
label each rule would flag, replayed over the batches ``capture-plain.py`` kept. The layer's
running state is replayed as in training (the default statistic); from batch FROM on the poison
label is taken as suspect (its higher-scoring side as the poison side, as the layer takes it)
and, per batch, its rows are judged by

- ``foreign`` (the layer's rule): nearer another label's running mean than the label's clean
  side's running mean;
- ``side``: nearer the poison side's running mean than the clean side's;
- ``either``: one or the other;
- ``shifted``: the row less the trigger's estimated offset t (below) nearer another label's
  running mean than the row itself is to the clean side;
- ``offset≥c`` (probe only, not a layer setting): the row's offset from the clean side's mean,
  projected on the trigger's estimated offset t (the poison side's running mean less the mean
  of the other labels' running means: the poison's content, drawn from every other class,
  averages out), at least ``c`` × |t|², for c in 0.3-0.6; and ``either+offset≥c``, the union.

Printed per epoch: the share of the poisoned rows flagged (overall and per true class) and of
the label's clean rows (the cost). Ground truth for scoring only.

    PYTHONPATH=src .venv/bin/python scripts/sieve-probes/row-rules.py CAPTURE.pt [FROM]
"""
import sys
from collections import defaultdict

import torch

from eigenguard.sieve import LabelSieve

LAYER_RULES = ("foreign", "side", "either", "shifted")
CUTS = (0.3, 0.4, 0.5, 0.6)
RULES = LAYER_RULES + tuple(f"offset≥{c}" for c in CUTS) + tuple(f"either+offset≥{c}"
                                                                 for c in CUTS)


def judged(layer: LabelSieve, rows: torch.Tensor, labels: torch.Tensor,
           label: int) -> dict[str, torch.Tensor]:
    """Each rule's flags over the batch's rows, by the layer's own :meth:`foreign_rows`, with
    ``label`` taken as suspect and its higher-scoring side as the poison side."""
    sides = torch.full((layer.classes,), -1, dtype=torch.long)
    sides[label] = int(layer.side_scores()[label].nan_to_num(-1).argmax())
    flags = {}
    for rule in LAYER_RULES:
        layer.row_rule = rule
        flags[rule] = layer.foreign_rows(rows, labels, sides)
    state, side = layer._state, int(sides[label])
    offset = layer.trigger_offsets(sides)[label]
    projection = ((rows - state["side_mean"][label, 1 - side]) * offset).sum(1) / (
        offset * offset).sum()
    for cut in CUTS:
        beyond = (labels == label) & (projection >= cut)
        flags[f"offset≥{cut}"] = beyond
        flags[f"either+offset≥{cut}"] = beyond | flags["either"]
    return flags


def main() -> None:
    torch.set_grad_enabled(False)
    capture = torch.load(sys.argv[1])
    start = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    target = capture["target"]
    layer = LabelSieve(10, statistic="spread", warmup=10 ** 9).train()
    counts = defaultdict(lambda: defaultdict(float))  # (epoch, what) -> rule -> flagged
    totals = defaultdict(float)  # (epoch, what) -> rows
    for number, batch in enumerate(capture["batches"], 1):
        labels, features = batch["labels"], batch["features"]
        layer.set_labels(labels)
        layer(features)
        if number < start:
            continue
        mine = labels == target
        bad, original = batch["poisoned"][mine], batch["original"][mine]
        flags = {rule: flagged[mine] for rule, flagged in
                 judged(layer, layer.pooled(features), labels, target).items()}
        groups = {"poisoned": bad, "clean": ~bad}
        groups.update({f"poisoned class {c}": bad & (original == c)
                       for c in original[bad].unique().tolist()})
        for what, members in groups.items():
            totals[(batch["epoch"], what)] += float(members.sum())
            for rule, flagged in flags.items():
                counts[(batch["epoch"], what)][rule] += float((flagged & members).sum())
    print(f"{capture['key'][:8]} {capture['attack']} {capture['poison_ratio']:g} seed "
          f"{capture['seed']}: label {target}'s rows flagged from batch {start}, by rule (%)")
    print("| epoch | rows | " + " | ".join(RULES) + " |")
    print("|---" * (len(RULES) + 2) + "|")
    for (epoch, what), total in sorted(totals.items(), key=lambda item: (
            item[0][0], item[0][1] != "poisoned", item[0][1] != "clean", item[0][1])):
        if not total:
            continue
        cells = [f"{100 * counts[(epoch, what)][rule] / total:.1f}" for rule in RULES]
        print(f"| {epoch} | {what} ({int(total)}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
