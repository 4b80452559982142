"""How large each trigger is against the natural variation of the images themselves, before any
network sees it (docs/ANALYSIS.md, "The whole suite, against EigenGuard"): the analysis measures
the trigger's feature shift against the clean features' spread inside a trained model, where a
model that learned the backdoor may have amplified it; on the pixels the same ratio is a
property of the attack alone.

For each stored run (its fitted attack state; the 1,000 first validation images not of the
target class), with d_i the trigger's change to image i and Δ their mean, over the clean images'
total variance (pixels on a 0-1 scale): ``shift/spread`` = ‖Δ‖² / var, ``per-image`` =
mean ‖d_i‖² / var (`eigenguard.analysis.spectrum.shift_alignment`, the same numbers the analysis
records per capture point).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/attack-probes/pixel-shift.py RUN [RUN ...]

Store: results/results.sqlite. A run without its fitted attack state (imported from an export)
has its attack fitted again here as the run fitted it (same training split, same seed); for the
attacks with a helper model (LF, TrojanNN, SSBA, LC, the adaptive ones) that takes minutes.
"""
import sys

import torch

from eigenguard.analysis.spectrum import shift_alignment
from eigenguard.attacks.registry import attack_label
from eigenguard.experiment import RunConfig, load_run_splits
from eigenguard.seeding import stream_seed
from eigenguard.store import ResultStore

IMAGES = 1000


def main(prefixes: list[str]) -> None:
    store = ResultStore("results/results.sqlite", create=False)
    print("| run | attack | pixel shift / spread | per-image shift / spread |")
    print("|---|---|---|---|")
    for prefix in prefixes:
        run = store.find_runs(prefix)[0]
        config = RunConfig.from_dict(run.config)
        splits = load_run_splits(run, None)[1]
        attack = config.build_attack()
        if run.attack_state:
            attack.load_fitted_state(store.read_tensors(run.attack_state, "attack state", run.key))
        else:  # as the run fitted it (eigenguard.experiment)
            attack.fit(splits.train, seed=stream_seed(config.seed, "attack-fit"))
        validation = splits.validation
        images = validation.images[validation.labels != config.target][:IMAGES]
        triggered = attack.apply(images)
        flat = images.flatten(1).double() / 255
        result = shift_alignment(flat, triggered.flatten(1).double() / 255,
                                 torch.zeros(1, flat.shape[1], dtype=torch.float64))
        label = attack_label(config.attack, run.config.get("attack_settings"))
        print(f"| {run.key[:8]} | {label} | {result['shift_to_spread']:.4f} | "
              f"{result['sample_shift_to_spread']:.4f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
