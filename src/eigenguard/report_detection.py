"""What the detectors found: for every defense that flags training samples (Spectral Signatures,
Activation Clustering, SPECTRE, ABL's isolation, DBD's split, the sieve), the share of the poison
it flagged (TPR) and of the clean samples (FPR), as the harness measured them with the poison
indices it alone holds (:func:`eigenguard.evaluate.detection_metrics`).

A detector's verdict explains its ASR: a retraining defense that flags 30% of the poison leaves
the rest to plant the backdoor again, so the table sits beside the source layout's.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass

from .report import _attack_label, _defense_label, _finished_runs
from .store import ResultStore, StoredRun


@dataclass
class DetectionRow:
    attack: str
    poison_ratio: float
    defense: str
    seeds: int
    tpr: float  # mean over seeds, in [0, 1]
    fpr: float
    flagged: float  # mean number of samples flagged


def detection_rows(store: ResultStore, runs: list[StoredRun] | None) -> list[DetectionRow]:
    """One row per (attack, poison ratio, defense) whose runs recorded a detection, averaged
    over seeds; rows ordered by poison ratio, then attack, then defense, each as first seen."""
    found: dict[tuple, dict[str, list[float]]] = {}
    for run in _finished_runs(store, runs):
        values = {row["metric"]: row["value"] for row in store.metrics(run.key)
                  if row["protocol"] == "detection"}
        if not {"tpr", "fpr"} <= set(values):
            continue
        key = (_attack_label(run), float(run.config["poison_ratio"]), _defense_label(run))
        group = found.setdefault(key, {"tpr": [], "fpr": [], "flagged": []})
        for name in group:
            group[name].append(float(values.get(name, float("nan"))))
    attacks = {attack: index for index, attack in enumerate(dict.fromkeys(k[0] for k in found))}
    defenses = {name: index for index, name in enumerate(dict.fromkeys(k[2] for k in found))}
    rows = [DetectionRow(attack, ratio, defense, len(group["tpr"]),
                         statistics.fmean(group["tpr"]), statistics.fmean(group["fpr"]),
                         statistics.fmean(group["flagged"]))
            for (attack, ratio, defense), group in found.items()]
    return sorted(rows, key=lambda row: (row.poison_ratio, attacks[row.attack],
                                         defenses[row.defense]))


NOTE = ("The training samples each detecting defense flagged: TPR the share of the poisoned "
        "samples, FPR the share of the clean ones (training split, mean over seeds; measured by "
        "the harness, which alone holds the poison indices).")
COLUMNS = ("Attack", "Poison", "Defense", "Seeds", "TPR %", "FPR %", "Flagged")


def detection_cells(row: DetectionRow) -> list[str]:
    return [row.attack, f"{row.poison_ratio:.0%}", row.defense, str(row.seeds),
            f"{100 * row.tpr:.1f}", f"{100 * row.fpr:.1f}", f"{row.flagged:.0f}"]


def format_detection_markdown(rows: list[DetectionRow]) -> str:
    """The table as Markdown ("" when no run detected anything)."""
    if not rows:
        return ""
    lines = [f"**Detection.** {NOTE}", "", "| " + " | ".join(COLUMNS) + " |",
             "|---|---:|---|" + "---:|" * (len(COLUMNS) - 3)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in detection_cells(row))
              + " |" for row in rows]
    return "\n".join(lines)
