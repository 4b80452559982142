"""Every defense of the comparison grid against one attack, one row per defense (docs/DEFENSES.md):
test ACC / ASR / RA and DER against the undefended run of the same setup, the detection TPR / FPR
of the defenses that flag training samples, and the defense's own wall time. A batch-dependent
model gets one row per protocol it was evaluated under (`running` first: the deployed model).

    .venv/bin/python scripts/defense-comparison.py ATTACK [--ratio 0.1] [--seed 0]
        [--store results/results.sqlite] [--grid benchmarks/grids/fashion-mnist.yaml]

ATTACK is the attack's name (badnets, blended, wanet, sig). Reads finished runs of the grid
only; a store made with `eigenguard import results/*.jsonl` does as well.
"""
import argparse

from eigenguard.cli import grid_runs
from eigenguard.report import _defense_label
from eigenguard.report_cost import duration
from eigenguard.store import ResultStore

ORDER = ("running", "triggered", "mixed", "single")


def values(store: ResultStore, run) -> tuple[dict, dict]:
    """{protocol: {metric: value}} on the test split, and the detection metrics."""
    scores, detection = {}, {}
    for row in store.metrics(run.key):
        if row["split"] == "test" and row["metric"] in ("acc", "asr", "ra"):
            scores.setdefault(row["protocol"], {})[row["metric"]] = 100 * row["value"]
        elif row["protocol"] == "detection":
            detection[row["metric"]] = row["value"]
    return scores, detection


def der(acc: float, asr: float, reference: dict) -> float:
    """BackdoorBench's DER, in %, against the undefended run's `triggered` figures."""
    drop_asr = max(0.0, reference["asr"] - asr)
    drop_acc = max(0.0, reference["acc"] - acc)
    return (drop_asr - drop_acc + 100) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("attack")
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--store", default="results/results.sqlite")
    parser.add_argument("--grid", default="benchmarks/grids/fashion-mnist.yaml")
    args = parser.parse_args()
    store = ResultStore(args.store, create=False)
    runs = [run for run in grid_runs(store, args.grid)
            if run.status == "finished" and run.config["attack"] == args.attack
            and run.config["poison_ratio"] == args.ratio and run.config["seed"] == args.seed]
    undefended = [run for run in runs if run.config["defense"] == "none"]
    if len(undefended) != 1:
        raise SystemExit(f"{len(undefended)} undefended {args.attack} runs at ratio "
                         f"{args.ratio}, seed {args.seed}: run the grid first")
    reference = values(store, undefended[0])[0]["triggered"]
    print("| defense | protocol | ACC % | ASR % | RA % | DER % | detection TPR / FPR % | "
          "own wall time | run |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        scores, detection = values(store, run)
        flagged = (f"{100 * detection['tpr']:.1f} / {100 * detection['fpr']:.1f}"
                   if "tpr" in detection else "-")
        for protocol in sorted(scores, key=lambda p: ORDER.index(p) if p in ORDER else 9):
            cell = scores[protocol]
            rating = "-" if run is undefended[0] else f"{der(cell['acc'], cell['asr'], reference):.2f}"
            print(f"| {_defense_label(run)} | {protocol} | {cell['acc']:.2f} | {cell['asr']:.2f} | "
                  f"{cell['ra']:.2f} | {rating} | {flagged} | "
                  f"{duration(run.wall_seconds or 0)} | {run.key[:8]} |")


if __name__ == "__main__":
    main()
