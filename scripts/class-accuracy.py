"""Per-class accuracy of stored runs on their validation split (clean images), from their
checkpoints: where a model's accuracy is lost. docs/ATTACKS.md uses it to show that the
clean-label attacks at 10% cost class 0 alone.

    .venv/bin/python scripts/class-accuracy.py RUN [RUN ...] [--store PATH]
"""
import argparse

import torch

from eigenguard.experiment import load_run_model, load_run_splits
from eigenguard.store import ResultStore, default_store_path
from eigenguard.train import model_input


@torch.no_grad()
def class_accuracy(store: ResultStore, prefix: str) -> tuple[str, list[float]]:
    found = store.find_runs(prefix)
    if len(found) != 1:
        raise SystemExit(f"{prefix!r} names {len(found)} stored runs: give a unique key prefix")
    run = found[0]
    splits = load_run_splits(run, None)[1]
    model = load_run_model(store, run, splits.train).eval()
    data = splits.validation
    predicted = torch.cat([model(model_input(data.images[start:start + 256], splits.train))
                           .argmax(1) for start in range(0, len(data), 256)])
    classes = int(data.labels.max()) + 1
    return run.key, [float((predicted[data.labels == c] == c).double().mean())
                     for c in range(classes)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run keys or unique prefixes")
    parser.add_argument("--store", default=None, help="result store (default: eigenguard's)")
    args = parser.parse_args()
    store = ResultStore(args.store or default_store_path())
    for prefix in args.runs:
        key, accuracy = class_accuracy(store, prefix)
        cells = " ".join(f"{100 * value:5.1f}" for value in accuracy)
        print(f"{key[:8]}  per class (%): {cells}")


if __name__ == "__main__":
    main()
