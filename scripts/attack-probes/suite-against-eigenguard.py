"""The attack suite against EigenGuard, one row per attack (docs/ATTACKS.md and docs/ANALYSIS.md):
the undefended run's figures, the EigenGuard run's in the running protocol (each image alone,
the deployed model) and in the per-batch `triggered` protocol, and where the undefended trigger's
feature shift lies against the top 16 directions at `layer1` (from `eigenguard analyze`'s
analysis.json under docs/figures/analysis/: the share of the mean shift, the mean share of each
image's shift, and the shift's consistency over images). Test split; 10% poison, seed 0, the
grids' budget; rows sorted by the mean shift's share.

    .venv/bin/python scripts/attack-probes/suite-against-eigenguard.py [--store PATH]
    .venv/bin/python scripts/attack-probes/suite-against-eigenguard.py --protocols

``--protocols``: instead, the EigenGuard run's ACC / ASR under each of the four evaluation
protocols (README, "Evaluation protocols"), rows sorted by the running ASR.

``--spread``: instead, for the EigenGuard runs analysed with `eigenguard analyze` (their numbers
are in the store), the trigger's feature shift against the clean features' spread at the layer's
input and after its running filter (mean shift and per-image, `shift_to_spread` and
`sample_shift_to_spread`), rows sorted by the per-image figure after the filter.

Reads the store's finished runs (default results/results.sqlite; a store made with `eigenguard
import results/*.jsonl` does as well).
"""
import argparse
import json
from pathlib import Path

from eigenguard.attacks.registry import attack_label
from eigenguard.store import ResultStore

ANALYSIS = Path("docs/figures/analysis")


def metric(store: ResultStore, run, protocol: str, name: str) -> float:
    for row in store.metrics(run.key):
        if (row.get("split"), row.get("protocol"), row.get("metric")) == ("test", protocol, name):
            return 100 * row["value"]
    return float("nan")


def setup(config: dict) -> str:
    """What the undefended and the defended run share: everything but the defense."""
    rest = {k: v for k, v in config.items() if k not in ("defense", "defense_settings", "version")}
    rest["attack_settings"] = attack_label(config["attack"], config.get("attack_settings"))
    return json.dumps(rest, sort_keys=True, default=str)


def in_suite(config: dict) -> bool:
    return (config["defense"] == "eigenguard" and config["seed"] == 0
            and config["poison_ratio"] == 0.1 and config.get("train_size") == 12000
            and (config.get("train") or {}).get("epochs") == 8
            and (config.get("defense_settings") or {}).get("k", 16) == 16)


def shift_measures(run_key: str) -> tuple[float, float, float]:
    path = ANALYSIS / run_key[:8] / "analysis.json"
    if not path.exists():
        return (float("nan"),) * 3
    point = json.loads(path.read_text())["points"]["layer1"]
    return (100 * point["shift_in_top_k"], 100 * point["sample_shift_in_top_k"],
            point["shift_consistency"])


PROTOCOLS = ("running", "triggered", "mixed", "single")


def print_protocols(store: ResultStore, rows) -> None:
    print("| attack | " + " | ".join(f"`{name}` ACC / ASR %" for name in PROTOCOLS) + " | run |")
    print("|---" * (len(PROTOCOLS) + 2) + "|")
    for *_, label, _, run in sorted(rows, key=lambda r: metric(store, r[-1], "running", "asr")):
        cells = [f"{metric(store, run, name, 'acc'):.2f} / {metric(store, run, name, 'asr'):.2f}"
                 for name in PROTOCOLS]
        print(f"| {label} | " + " | ".join(cells) + f" | {run.key[:8]} |")


def analysis_value(store: ResultStore, run, name: str) -> float | None:
    for row in store.metrics(run.key):
        if (row.get("protocol"), row.get("metric")) == ("analysis", name):
            return row["value"]
    return None


def print_spread(store: ResultStore, rows) -> None:
    print("| attack | EigenGuard running ASR % | layer input: mean / per-image shift over spread | "
          "after the running filter: mean / per-image | run |")
    print("|---|---|---|---|---|")
    found = []
    for *_, label, _, run in rows:
        values = [analysis_value(store, run, f"layer1_eigenguard.{point}.{name}")
                  for point in ("in", "out") for name in ("shift_to_spread",
                                                          "sample_shift_to_spread")]
        if None not in values:
            found.append((values[3], label, run, values))
    for _, label, run, (mean_in, image_in, mean_out, image_out) in sorted(found, key=lambda f: f[0]):
        print(f"| {label} | {metric(store, run, 'running', 'asr'):.2f} | {mean_in:.4f} / "
              f"{image_in:.4f} | {mean_out:.4f} / {image_out:.4f} | {run.key[:8]} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="results/results.sqlite")
    parser.add_argument("--protocols", action="store_true",
                        help="the EigenGuard runs under every evaluation protocol")
    parser.add_argument("--spread", action="store_true",
                        help="the analysed EigenGuard runs' trigger shift against the spread")
    args = parser.parse_args()
    store = ResultStore(args.store)
    runs = [run for run in store.find_runs("") if run.status == "finished"]
    undefended = {setup(run.config): run for run in runs if run.config["defense"] == "none"}
    rows = []
    for run in filter(lambda run: in_suite(run.config), runs):
        plain = undefended.get(setup(run.config))
        if plain is None:
            continue
        label = attack_label(run.config["attack"], run.config.get("attack_settings"))
        rows.append((*shift_measures(plain.key), label, plain, run))
    if args.protocols:
        print_protocols(store, rows)
        return
    if args.spread:
        print_spread(store, rows)
        return
    print("| attack | mean shift in top 16 % | per-image shift in top 16 % | consistency | "
          "undefended ACC / ASR % | EigenGuard running ACC / ASR % | per batch (`triggered`) "
          "ACC / ASR % | runs |")
    print("|---|---|---|---|---|---|---|---|")
    for mean, per_image, consistency, label, plain, run in sorted(rows, key=lambda r: r[0]):
        print(f"| {label} | {mean:.1f} | {per_image:.1f} | {consistency:.2f} | "
              f"{metric(store, plain, 'triggered', 'acc'):.2f} / "
              f"{metric(store, plain, 'triggered', 'asr'):.2f} | "
              f"{metric(store, run, 'running', 'acc'):.2f} / "
              f"{metric(store, run, 'running', 'asr'):.2f} | "
              f"{metric(store, run, 'triggered', 'acc'):.2f} / "
              f"{metric(store, run, 'triggered', 'asr'):.2f} | {plain.key[:8]} / {run.key[:8]} |")


if __name__ == "__main__":
    main()
