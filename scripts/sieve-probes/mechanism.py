"""Where each trigger's feature shift lies with and without the label sieve (docs/SIEVE.md, "The
mechanism"): for every attack with a sieve run at the defense's defaults, or at them with the row
rule or the tiers before they were chosen, or with the repair at evaluation (10% poison, seed 0, the grids' budget) and an undefended
run of the same setup, both analysed by `eigenguard analyze`, the trigger's mean feature shift
f(x + t) − f(x) against the clean features' spread (`shift_to_spread`) at each stage, the share of it in the clean
top 16 directions at `layer4`, and the poison label's two-means split accuracy at `layer2`, where
the sieve reads the features.

    eigenguard analyze RUN ... --samples 500 --no-tsne
    .venv/bin/python scripts/sieve-probes/mechanism.py [--store PATH]

Reads the store's finished runs and the analysis rows `eigenguard analyze` recorded in it.
"""
import argparse
import dataclasses
import json

from eigenguard.attacks.registry import attack_label
from eigenguard.defenses.sieve import SieveDefense
from eigenguard.store import ResultStore

STAGES = ("layer1", "layer2", "layer3", "layer4")


def test_metric(store: ResultStore, run, name: str) -> float:
    for row in store.metrics(run.key):
        if (row["split"], row["protocol"], row["metric"]) == ("test", "triggered", name):
            return 100 * row["value"]
    return float("nan")


def analysis(store: ResultStore, run) -> dict[str, float]:
    return {row["metric"]: row["value"] for row in store.metrics(run.key)
            if row["protocol"] == "analysis"}


def setup(config: dict) -> str:
    """What an undefended run and a defended run of the same setup share."""
    rest = {k: v for k, v in config.items() if k not in ("defense", "defense_settings", "version")}
    return json.dumps(rest, sort_keys=True, default=str)


def variant(config: dict) -> str | None:
    """The row rule and the tiers of suspicion of a sieve run at the defense's defaults but for
    those (the stored settings are the resolved ones, less the settings at their value before
    they existed: a run before the row rule names none and used the foreign rule, a run before
    the second tier names none and had one); None for any other run."""
    if config["defense"] != "sieve":
        return None
    settings = dict(config.get("defense_settings") or {})
    earlier = SieveDefense.later_settings
    rule = settings.pop("row_rule", earlier["row_rule"])
    tiers = {"level_threshold": settings.pop("level_threshold", earlier["level_threshold"]),
             "level_margin": settings.pop("level_margin", earlier["level_margin"])}
    repair = settings.pop("repair", earlier["repair"])
    guard = settings.pop("repair_guard", earlier["repair_guard"])
    defaults = {field.name: field.default for field in dataclasses.fields(SieveDefense)}
    if not all(defaults.get(name) == value for name, value in settings.items()):
        return None
    if guard != defaults["repair_guard"]:
        return None
    suffix = "" if repair is None else f", repair {repair:g}"
    if tiers["level_threshold"] is None:
        return f"{rule}, one tier{suffix}"
    if all(defaults[name] == value for name, value in tiers.items()):
        return f"{rule}, two tiers{suffix}"
    return None


def in_scope(config: dict) -> bool:
    return (config["seed"] == 0 and config["poison_ratio"] == 0.1
            and config.get("train_size") == 12000
            and (config.get("train") or {}).get("epochs") == 8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="results/results.sqlite")
    args = parser.parse_args()
    store = ResultStore(args.store)
    runs = [run for run in store.find_runs("") if run.status == "finished"
            and in_scope(run.config)]
    undefended = {setup(run.config): run for run in runs if run.config["defense"] == "none"}
    rows = []
    for run in runs:
        plain = undefended.get(setup(run.config))
        rule = variant(run.config)
        if rule is None or plain is None:
            continue
        before, after = analysis(store, plain), analysis(store, run)
        if "layer4.shift_to_spread" not in before or "layer4.shift_to_spread" not in after:
            continue
        rows.append((attack_label(run.config["attack"], run.config.get("attack_settings")),
                     rule, plain, run, before, after))
    print("| attack | row rule, tiers | ASR % none → sieve | "
          "mean shift / spread, none → sieve: "
          + " | ".join(f"`{stage}`" for stage in STAGES)
          + " | per-image shift / spread at `layer4` | shift in top 16 at `layer4` % "
            "| poison label split at `layer2` | runs |")
    print("|---" * (len(STAGES) + 7) + "|")
    for label, rule, plain, run, before, after in sorted(
            rows, key=lambda r: (r[5]["layer4.shift_to_spread"] / r[4]["layer4.shift_to_spread"],
                                 r[1])):
        def pair(name: str, scale: float = 1.0, digits: int = 3) -> str:
            return (f"{scale * before.get(name, float('nan')):.{digits}f} → "
                    f"{scale * after.get(name, float('nan')):.{digits}f}")
        print(f"| {label} | {rule} | {test_metric(store, plain, 'asr'):.2f} → "
              f"{test_metric(store, run, 'asr'):.2f} | "
              + " | ".join(pair(f"{stage}.shift_to_spread") for stage in STAGES)
              + f" | {pair('layer4.sample_shift_to_spread')}"
              f" | {pair('layer4.shift_in_top_k', 100, 1)}"
              f" | {pair('layer2.label_signature.split_accuracy', 1, 2)}"
              f" | {plain.key[:8]} / {run.key[:8]} |")


if __name__ == "__main__":
    main()
