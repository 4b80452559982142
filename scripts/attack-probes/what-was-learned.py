"""What a stored data-poisoning run's model learned from its poisoned samples, for the attacks
that did not plant a backdoor (docs/ATTACKS.md, "Calibration"): how much the trigger changes the
training images, whether the model fitted the poisoned training samples (memorised) or also
obeys the trigger on new images (generalised), and, for adaptive-pgd, which part of its poisoned
images (the PGD noise or the patch) carries the backdoor.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/attack-probes/what-was-learned.py RUN [RUN ...]

Store: results/results.sqlite. The poison indices are the harness's ground truth, used here to
score, as the evaluation does; no defense sees them.
"""
import sys

import torch

from eigenguard.experiment import rebuild_run
from eigenguard.seeding import generator
from eigenguard.store import ResultStore
from eigenguard.train import model_input

CHUNK = 256


@torch.no_grad()
def predictions(model, images: torch.Tensor, reference) -> torch.Tensor:
    return torch.cat([model(model_input(images[start:start + CHUNK], reference)).argmax(1)
                      for start in range(0, len(images), CHUNK)])


def share(mask: torch.Tensor) -> str:
    return f"{100 * float(mask.double().mean()):5.1f}%"


def residual_statistics(original: torch.Tensor, poisoned: torch.Tensor) -> str:
    delta = poisoned.float() - original.float()
    return (f"pixels changed {share(delta != 0)}, mean |change| {delta.abs().mean():.2f}, "
            f"RMS {delta.pow(2).mean().sqrt():.2f} (0..255 scale)")


def probe(store: ResultStore, prefix: str) -> None:
    rebuilt = rebuild_run(store, store.find_runs(prefix)[0])
    run, config, splits, model = rebuilt.run, rebuilt.config, rebuilt.splits, rebuilt.model
    attack, poisoned = rebuilt.attack, rebuilt.poisoned
    rows = poisoned.poison_indices
    target = config.target
    print(f"{run.key[:8]} {config.attack} {config.poison_ratio} -> class {target}, "
          f"{len(rows)} poisoned training images")
    print("  trigger on the poisoned training images:",
          residual_statistics(splits.train.images[rows], poisoned.data.images[rows]))
    fitted = predictions(model, poisoned.data.images[rows], splits.train) == target
    if bool((poisoned.original_labels[rows] == target).all()):
        print(f"  poisoned training images classified as the target: {share(fitted)} (clean "
              "label: that is their own class, so this says nothing about the trigger)")
    else:
        print(f"  poisoned training images classified as the target (memorised): {share(fitted)}")
    validation = splits.validation
    others = validation.labels != target
    images, labels = validation.images[others], validation.labels[others]
    variants = {"trigger on validation images (the ASR)": attack.apply(images)}
    if config.attack == "adaptive-pgd":
        noisy = attack.noisy(images, labels, splits.train, seed=1)
        uniform = generator(2, "probe-uniform-noise")
        random_noise = (images.float() + (torch.rand(images.shape, generator=uniform) * 2 - 1)
                        * attack.eps).round().clamp(0, 255).to(torch.uint8)
        variants.update({
            "PGD noise only (no patch)": noisy,
            "PGD noise, then the patch (as in training)": attack.apply(noisy),
            "uniform noise of the same bound only": random_noise,
            "uniform noise, then the patch": attack.apply(random_noise),
        })
    print(f"  validation images not of the target ({len(images)}), classified as the target:")
    print(f"    clean: {share(predictions(model, images, splits.train) == target)}")
    for name, batch in variants.items():
        print(f"    {name}: {share(predictions(model, batch, splits.train) == target)}")


def main() -> None:
    store = ResultStore("results/results.sqlite")
    for prefix in sys.argv[1:]:
        probe(store, prefix)


if __name__ == "__main__":
    main()
