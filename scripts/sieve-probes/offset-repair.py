"""Offline probe behind docs/SIEVE.md ("The repair at evaluation"): replay a
stored *sieve* run's training with its defense, then, with the layer's final running state
(the suspect label, its clean side, the trigger's estimated offset t: the flagged side's mean
less the mean of the other labels' means), score on the test split what a per-row filter at
the layer would do at evaluation (each row alone: batch-independent):

- ``none``: the layer as it is (the identity): the run's own ACC / ASR;
- ``project``: every row's component along t set to the clean side's (x − ((x − c)·t̂) t̂);
- ``subtract≥a``: t taken off the rows whose offset from the clean side, projected on t, is at
  least a |t|.

Also the share of triggered and of clean test rows at or over each a. The poison is the
harness's ground truth, for scoring only.

    PYTHONPATH=src:scripts/sieve-probes .venv/bin/python scripts/sieve-probes/offset-repair.py RUN [RUN ...]

Store: results/results.sqlite.
"""
import sys

import torch

from eigenguard.evaluate import predict, triggered_test_set
from eigenguard.sieve import HandLabels, find_sieves
from probe_data import replay_defended

LEVELS = (0.3, 0.5, 0.7)


class Filter:
    """A forward hook on the sieve: rewrites the rows at evaluation by ``mode``."""

    def __init__(self, layer, target: int):
        self.layer = layer
        state = layer._state
        side = int(layer.flagged_sides()[target])
        self.offset = layer.trigger_offsets(layer.flagged_sides())[target].float()
        self.clean = state["side_mean"][target, 1 - side].float()
        self.mode, self.level = "none", 0.0
        self.scores: list[torch.Tensor] = []

    def __call__(self, _module, _inputs, output):
        rows = output.flatten(1).float()
        along = self.layer.along_offset(rows, self.offset, self.clean)  # in units of |t|
        self.scores.append(along)
        if self.mode == "project":
            rows = rows - along[:, None] * self.offset
        elif self.mode == "subtract":
            rows = rows - (along >= self.level).float()[:, None] * self.offset
        return rows.view_as(output).to(output.dtype)


def probe(key: str) -> None:
    config, splits, attack, _, model, hands = replay_defended(
        key, lambda model, poisoned: HandLabels(find_sieves(model)))
    layer = hands.layers[0]
    model.eval()
    if not layer.suspect.any():
        print(f"{key[:8]}: no label suspect, nothing to filter")
        return
    hook = Filter(layer, config.target)
    layer.register_forward_hook(hook)
    print(f"{key[:8]} {config.attack} {config.poison_ratio:g} seed {config.seed}: |t| "
          f"{float(hook.offset.norm()):.2f}; ACC / ASR %, validation | test")
    sets = {split: (getattr(splits, split), triggered_test_set(getattr(splits, split), attack,
                                                               config.target))
            for split in ("validation", "test")}
    for mode, level in [("none", 0.0), ("project", 0.0)] + [("subtract", a) for a in LEVELS]:
        hook.mode, hook.level = mode, level
        cells, shares = [], []
        for split, (clean, triggered) in sets.items():
            with torch.no_grad():
                hook.scores = []
                acc = float((predict(model, clean.images, clean) == clean.labels).double().mean())
                clean_scores = torch.cat(hook.scores)
                hook.scores = []
                asr = float((predict(model, triggered.images, clean)
                             == config.target).double().mean())
                trig_scores = torch.cat(hook.scores)
            cells.append(f"{100 * acc:.2f} / {100 * asr:.2f}")
            shares.append(", ".join(
                f"a={a}: {100 * float((trig_scores >= a).double().mean()):.1f} / "
                f"{100 * float((clean_scores >= a).double().mean()):.1f}" for a in LEVELS))
        name = mode if mode != "subtract" else f"subtract≥{level}"
        print(f"  {name}: {cells[0]} | {cells[1]}")
    print("  rows at or over a (triggered % / clean %): validation " + shares[0] + "; test "
          + shares[1])

if __name__ == "__main__":
    for prefix in sys.argv[1:]:
        probe(prefix)
