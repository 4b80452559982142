"""Offline probe behind docs/SIEVE.md: the layer's own `spread` scores, fed the features of one
stored epoch checkpoint (fixed features, so nothing moves under the running means), with the
network in evaluation or training mode (batch statistics) and the images plain or augmented as
training augments them (random crop with padding 2 and flips on Fashion-MNIST). Per label: the
higher side's score and the lower side's.

    PYTHONPATH=src .venv/bin/python scripts/sieve-probes/spread-under-augmentation.py 201451d5 1

Store: results/results.sqlite; 2,000 analysis samples of the run, batches of 125, three passes.
"""
import sys

import torch

from eigenguard.analysis.samples import load_for_analysis
from eigenguard.data import augment_batch, normalize
from eigenguard.data.registry import dataset_info
from eigenguard.sieve import LabelSieve
from eigenguard.store import ResultStore

COUNT, BATCH, PASSES = 2000, 125, 3


def stage_features(model, samples, training_mode: bool, augment: bool, info) -> torch.Tensor:
    captured = []
    handle = model.layer2.register_forward_hook(lambda _m, _a, out: captured.append(out.detach()))
    draw = torch.Generator().manual_seed(0)
    model.train(training_mode)
    with torch.no_grad():
        for start in range(0, COUNT, BATCH):
            x = samples.mix[start:start + BATCH].float().div(255)
            if augment:
                x = augment_batch(x, crop_padding=info.crop_padding, flip=info.flip,
                                  generator=draw)
            model(normalize(x, samples.data.mean, samples.data.std))
    handle.remove()
    return torch.cat(captured)


def main() -> None:
    torch.set_num_threads(1)
    key, epoch = sys.argv[1], int(sys.argv[2])
    store = ResultStore("results/results.sqlite")
    run = store.find_runs(key)[0]
    loaded = load_for_analysis(store, run, count=COUNT)
    kept = run.extra["epoch_checkpoints"]
    path = dict(zip(kept["epochs"], kept["files"]))[epoch]
    loaded.model.load_state_dict(store.read_tensors(path, "epoch checkpoint", run.key))
    info = dataset_info(run.config["dataset"])
    print(f"{run.key[:8]} {run.config['attack']} epoch {epoch}, layer2; per label: "
          "higher side / lower side")
    for training_mode in (False, True):
        for augment in (False, True):
            features = stage_features(loaded.model, loaded.samples, training_mode, augment, info)
            layer = LabelSieve(10, warmup=10 ** 6, statistic="spread").train()
            for _ in range(PASSES):
                for start in range(0, COUNT, BATCH):
                    layer.set_labels(loaded.samples.mix_labels[start:start + BATCH])
                    layer(features[start:start + BATCH])
            scores = layer.spread_scores()
            name = (f"{'training' if training_mode else 'evaluation'} mode, "
                    f"{'augmented' if augment else 'plain'}")
            print(f"  {name:28s}", " ".join(f"{float(s.max()):.2f}/{float(s.min()):.2f}"
                                             for s in scores))


if __name__ == "__main__":
    main()
