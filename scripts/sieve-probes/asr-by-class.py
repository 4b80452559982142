"""Offline probe behind docs/SIEVE.md ("Why LF and the white-box trigger get partly through"):
where the backdoor a trained model still obeys comes from, class by class. For each true class
other than the target: the share of the run's poisoned training images of that class the model
classifies as the target (what it still fitted of the poison: the rows the sieve unlearned are
pushed away from it, the rows it missed are learned), and the test ASR on that class's triggered
test images. Test split for the ASR; the poison indices are the harness's ground truth, for
scoring only.

    .venv/bin/python scripts/sieve-probes/asr-by-class.py RUN [RUN ...]

Store: results/results.sqlite; runs need a checkpoint here.
"""
import sys

import torch

from eigenguard.evaluate import predict, triggered_test_set
from eigenguard.experiment import rebuild_run
from eigenguard.store import ResultStore


def by_class(store: ResultStore, prefix: str) -> None:
    rebuilt = rebuild_run(store, store.find_runs(prefix)[0])
    run, config, splits, model = rebuilt.run, rebuilt.config, rebuilt.splits, rebuilt.model
    target, poisoned = config.target, rebuilt.poisoned
    rows = poisoned.poison_indices
    fitted = predict(model, poisoned.data.images[rows], splits.train) == target
    sources = poisoned.original_labels[rows]
    triggered = triggered_test_set(splits.test, rebuilt.attack, target)
    obeyed = predict(model, triggered.images, splits.train) == target
    names = splits.train.classes
    print(f"{run.key[:8]} {config.attack} {config.poison_ratio:g} {config.defense} seed "
          f"{config.seed}: test ASR {100 * float(obeyed.double().mean()):.2f}%")
    print("  | class | poisoned training images | fitted as the target % | test ASR % |")
    for label in range(splits.train.num_classes):
        if label == target:
            continue
        mine = sources == label
        test_mine = triggered.labels == label
        print(f"  | {label} {names[label]} | {int(mine.sum())} | "
              f"{100 * float(fitted[mine].double().mean()):.1f} | "
              f"{100 * float(obeyed[test_mine].double().mean()):.2f} |")


def main() -> None:
    store = ResultStore("results/results.sqlite")
    with torch.no_grad():
        for prefix in sys.argv[1:]:
            by_class(store, prefix)


if __name__ == "__main__":
    main()
