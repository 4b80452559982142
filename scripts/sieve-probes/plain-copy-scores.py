"""Offline probe behind docs/SIEVE.md: would the sieve's statistic find the poison label in
training if it were computed on the batch's *unaugmented* images? Replays a stored run's training
(same poisoned set, seeds, schedule and augmentation) for EPOCHS epochs. At every batch the
features after ``layer2`` are captured twice: from the training forward (augmented images, what
the layer sees today) and from a second forward of the same samples without augmentation (no
gradient; the BatchNorm buffers restored after it, so training is the run's). Each stream feeds
its own LabelSieve (the statistic given, default mixing; it only measures here, never flags).
Per window of 10 batches: each stream's score of the poison label and of the highest clean label,
and the leading label's score over the next one's (what the layer's margin is compared with).

    PYTHONPATH=src .venv/bin/python scripts/sieve-probes/plain-copy-scores.py 201451d5 2 [STATISTIC]

Store: results/results.sqlite. The target label is the run's config (scoring only).
"""
import sys

import torch

from eigenguard.data import normalize
from eigenguard.sieve import LabelSieve
from eigenguard.train import TrainHook
from probe_data import ReplayOver, replay_training

WINDOW = 10


class Stop(Exception):
    """Ends a forward pass once the stage's features are captured."""


class TwoStreams(TrainHook):
    def __init__(self, model, data, classes: int, statistic: str, epochs: int):
        self.model, self.data, self.epochs = model, data, epochs
        self.sieves = {name: LabelSieve(classes, warmup=10 ** 9, statistic=statistic).train()
                       for name in ("augmented", "plain")}
        self.rows: list[tuple] = []
        self.plain_pass = False
        model.layer2.register_forward_hook(self.capture)

    def capture(self, _module, _inputs, output):
        stream = "plain" if self.plain_pass else "augmented"
        self.sieves[stream](output.detach())
        if self.plain_pass:
            raise Stop

    def on_batch(self, state, batch):
        for sieve in self.sieves.values():
            sieve.set_labels(batch.labels)
        buffers = {name: value.clone() for name, value in self.model.named_buffers()}
        plain = self.data.images[batch.indices].float().div(255)
        self.plain_pass = True
        try:
            with torch.no_grad():
                self.model(normalize(plain, self.data.mean, self.data.std))
        except Stop:
            pass
        self.plain_pass = False
        with torch.no_grad():
            for name, value in self.model.named_buffers():
                value.copy_(buffers[name])
        return batch

    def after_step(self, state, batch):
        self.rows.append((state.epoch, {name: sieve.side_scores().nan_to_num(0).max(1).values
                                        for name, sieve in self.sieves.items()}))

    def on_epoch_end(self, state, record):
        if state.epoch >= self.epochs:
            raise ReplayOver


def main() -> None:
    key, epochs = sys.argv[1], int(sys.argv[2])
    statistic = sys.argv[3] if len(sys.argv) > 3 else "mixing"
    config, _, streams = replay_training(key, lambda model, poisoned, info: TwoStreams(
        model, poisoned.data, info.num_classes, statistic, epochs))
    target = config.target
    print(f"{key[:8]} {config.attack} {config.poison_ratio:g}, {statistic} after layer2; per "
          f"window of {WINDOW} batches, at its end: target label's score / highest other label "
          f"(which), leader over second")
    for end in range(WINDOW - 1, len(streams.rows), WINDOW):
        epoch, scores = streams.rows[end]
        cells = []
        for name in ("augmented", "plain"):
            score = scores[name]
            others = score.clone()
            others[target] = -1
            best = int(others.argmax())
            top = score.topk(2)
            cells.append(f"{name} {float(score[target]):.2f} / {float(score[best]):.2f} ({best}), "
                         f"lead {float(top.values[0] / top.values[1]):.2f}")
        print(f"  epoch {epoch}, batch {end + 1:3d}: " + " | ".join(cells))


if __name__ == "__main__":
    main()
