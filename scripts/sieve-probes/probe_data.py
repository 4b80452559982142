"""What every probe here loads: a stored run's poisoned training samples (a seeded draw of ``n``)
and its model at each kept epoch. Usage of the probes: ``RUN STAGE EPOCHS N`` (EPOCHS
comma-separated), store ``results/results.sqlite``."""
import sys
from dataclasses import dataclass

import torch

from eigenguard.analysis.signatures import top_direction, two_means_split
from eigenguard.data.registry import dataset_info
from eigenguard.experiment import (RunConfig, build_model, load_run_attack, load_run_splits,
                                   poison_training_set)
from eigenguard.seeding import stream_seed
from eigenguard.store import ResultStore
from eigenguard.train import Augmentation, train


@dataclass
class ProbeData:
    store: ResultStore
    run: object
    config: RunConfig
    splits: object
    stage: str
    epochs: list[int]
    images: torch.Tensor
    labels: torch.Tensor  # as trained on
    bad: torch.Tensor  # poisoned rows (harness ground truth, for scoring only)

    def models(self):
        """(epoch, model) for each requested kept epoch, the model in eval mode."""
        kept = self.run.extra["epoch_checkpoints"]
        defense = self.config.build_defense()
        for epoch, path in zip(kept["epochs"], kept["files"]):
            if epoch in self.epochs:
                model = defense.prepare_model(build_model(self.config, self.splits.train))
                model.load_state_dict(self.store.read_tensors(path, "epoch checkpoint",
                                                              self.run.key))
                yield epoch, model.eval()


def load_from_arguments() -> ProbeData:
    prefix, stage, epochs, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    store = ResultStore("results/results.sqlite")
    run = store.find_runs(prefix)[0]
    config = RunConfig.from_dict(run.config)
    splits = load_run_splits(run, None)[1]
    poisoned = poison_training_set(load_run_attack(store, run), config, splits.train)
    chosen = torch.randperm(len(poisoned.data), generator=torch.Generator().manual_seed(0))[:n]
    return ProbeData(store, run, config, splits, stage, [int(e) for e in epochs.split(",")],
                     poisoned.data.images[chosen], poisoned.data.labels[chosen],
                     poisoned.is_poisoned[chosen])


class ReplayOver(Exception):
    """Raised by a replay's hook to end the replayed training."""


def replay_training(key: str, make_hook):
    """Replay a stored run's training (same poisoned set, seeds, schedule and augmentation) with
    the hook ``make_hook(model, poisoned, info)`` builds, until the hook raises
    :class:`ReplayOver` or training ends. Returns (config, poisoned set, hook)."""
    config, _, _, poisoned, _, hook = replay(key, make_hook)
    return config, poisoned, hook


def replay_defended(key: str, make_hook):
    """Replay a stored run's training *with its defense's layers* (a defense that trains once
    with one hook, as the sieve does), the hook ``make_hook(model, poisoned)`` builds handing
    the batches over. Returns (config, splits, attack, poisoned set, model, hook)."""
    return replay(key, lambda model, poisoned, info: make_hook(model, poisoned), defended=True)


def replay(key: str, make_hook, defended: bool = False):
    """The replay both of the above run: the model plain or as the run's defense prepares it.
    Returns (config, splits, attack, poisoned set, model, hook)."""
    store = ResultStore("results/results.sqlite")
    run = store.find_runs(key)[0]
    config = RunConfig.from_dict(run.config)
    splits = load_run_splits(run, None)[1]
    attack = load_run_attack(store, run)
    poisoned = poison_training_set(attack, config, splits.train)
    info = dataset_info(config.dataset)
    torch.manual_seed(stream_seed(config.seed, "init"))
    model = build_model(config, splits.train)
    if defended:
        model = config.build_defense().prepare_model(model)
    hook = make_hook(model, poisoned, info)
    try:
        train(model, poisoned.data, config.train, seed=stream_seed(config.seed, "train"),
              augmentation=Augmentation(info.crop_padding, info.flip), hooks=[hook],
              progress=False)
    except ReplayOver:
        pass
    return config, splits, attack, poisoned, model, hook


def translation_mixing(rows: torch.Tensor, neighbours: int = 10) -> float:
    """Split the rows in two along their top direction, take each side's mean away, and measure
    how far the two sides mix among each row's nearest neighbours: the share of neighbours from
    the other side over the share expected if the sides were one distribution. Near 1: one side
    is the other moved by a constant (a trigger added to images of one class); near 0: the two
    sides are different shapes (two natural modes of a class)."""
    rows = rows.double()
    up = two_means_split(top_direction(rows)[0])
    if up.all() or not up.any():
        return float("nan")
    centred = rows.clone()
    for side in (up, ~up):
        centred[side] -= rows[side].mean(0)
    distances = torch.cdist(centred, centred)
    distances.fill_diagonal_(float("inf"))
    nearest = distances.topk(neighbours, largest=False).indices
    crossing = (up[nearest] != up[:, None]).double().mean(1)
    share_up = float(up.double().mean())
    expected = torch.where(up, torch.tensor(1 - share_up), torch.tensor(share_up)).double()
    return float(crossing.mean() / expected.mean())
