"""Offline probe behind docs/SIEVE.md ("The 5% miss"): replay a stored run's training for EPOCHS
epochs and keep, for every batch, the features after ``layer2`` of the batch's *unaugmented* images
(what the sieve's default ``view="plain"`` reads), the labels trained on, which rows are poisoned
and their true classes (harness ground truth, for scoring only). Statistics can then be replayed
over the saved batches in seconds (``sieve-statistics.py``) instead of a training run per
candidate. Before the sieve flags anything its run trains exactly as the undefended run does, so a
replay of either is what the layer saw up to its first suspicion.

    PYTHONPATH=src .venv/bin/python scripts/sieve-probes/capture-plain.py RUN EPOCHS OUT.pt [STAGE]

STAGE (default ``layer2``) names another stage to keep instead (``layer1``: the clean-label probe).

Store: results/results.sqlite.
"""
import sys

import torch

from eigenguard.data import normalize
from eigenguard.train import TrainHook
from probe_data import ReplayOver, replay_training


class Stop(Exception):
    """Ends a forward pass once the stage's features are captured."""


class CapturePlain(TrainHook):
    def __init__(self, model, poisoned, epochs: int, stage: str = "layer2"):
        self.model, self.poisoned, self.epochs = model, poisoned, epochs
        self.batches: list[dict] = []
        self.pending: dict | None = None
        getattr(model, stage).register_forward_hook(self.capture)

    def capture(self, _module, _inputs, output):
        if self.pending is not None:
            self.pending["features"] = output.detach().flatten(1).float().clone()
            raise Stop

    def on_batch(self, state, batch):
        data = self.poisoned.data
        self.pending = {"epoch": state.epoch, "labels": batch.labels.clone(),
                        "poisoned": self.poisoned.is_poisoned[batch.indices].clone(),
                        "original": self.poisoned.original_labels[batch.indices].clone()}
        buffers = {name: value.clone() for name, value in self.model.named_buffers()}
        plain = data.images[batch.indices].float().div(255)
        try:
            with torch.no_grad():
                self.model(normalize(plain, data.mean, data.std))
        except Stop:
            pass
        self.batches.append(self.pending)
        self.pending = None
        with torch.no_grad():
            for name, value in self.model.named_buffers():
                value.copy_(buffers[name])
        return batch

    def on_epoch_end(self, state, record):
        if state.epoch >= self.epochs:
            raise ReplayOver


def main() -> None:
    key, epochs, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    stage = sys.argv[4] if len(sys.argv) > 4 else "layer2"
    config, _, hook = replay_training(key, lambda model, poisoned, info: CapturePlain(
        model, poisoned, epochs, stage))
    torch.save({"key": key, "attack": config.attack, "poison_ratio": config.poison_ratio,
                "seed": config.seed, "target": config.target, "stage": stage,
                "batches": hook.batches}, out)
    print(f"{key[:8]}: {len(hook.batches)} batches kept in {out}")


if __name__ == "__main__":
    main()
