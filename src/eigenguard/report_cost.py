"""What a set of runs cost: wall time per defense, so a grid's header can state its measured cost
and a reader can weigh a defense's result against its price.

A run's wall time is what it spent itself: a post-training defense's run counts its repair only
(the undefended model it starts from is the undefended run's cost), a detector's its scoring and
retraining, a training-time defense everything it trains.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass

from .report import _defense_label, _finished_runs
from .store import ResultStore, StoredRun


@dataclass
class CostRow:
    defense: str
    runs: int
    median_seconds: float  # the typical run: robust to a run slowed by other work on the machine
    min_seconds: float
    max_seconds: float
    total_seconds: float


def cost_rows(store: ResultStore, runs: list[StoredRun] | None) -> list[CostRow]:
    """One row per defense label among the finished runs (in first-seen order); runs without a
    recorded wall time are left out."""
    seconds: dict[str, list[float]] = {}
    for run in _finished_runs(store, runs):
        if run.wall_seconds is not None:
            seconds.setdefault(_defense_label(run), []).append(float(run.wall_seconds))
    return [CostRow(label, len(values), statistics.median(values), min(values), max(values),
                    sum(values)) for label, values in seconds.items()]


def duration(seconds: float) -> str:
    """``95`` -> ``1 min 35 s``; ``4000`` -> ``1 h 07 min``."""
    seconds = round(seconds)
    if seconds < 3600:
        minutes, rest = divmod(seconds, 60)
        return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours} h {minutes:02d} min"


def total_text(rows: list[CostRow]) -> str:
    runs = sum(row.runs for row in rows)
    return (f"{duration(sum(row.total_seconds for row in rows))} of compute over {runs} "
            f"run{'s' * (runs != 1)}")


COLUMNS = ("Defense", "Runs", "Median per run", "Range", "Total")


def cost_cells(row: CostRow) -> list[str]:
    return [row.defense, str(row.runs), duration(row.median_seconds),
            f"{duration(row.min_seconds)} – {duration(row.max_seconds)}",
            duration(row.total_seconds)]


def format_cost_markdown(rows: list[CostRow]) -> str:
    if not rows:
        return "**Compute.** No finished run with a recorded wall time."
    lines = [f"**Compute.** {total_text(rows)}; wall time per run on the machine that ran it "
             "(a post-training defense counts its repair only).", "",
             "| " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * (len(COLUMNS) - 1)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in cost_cells(row)) + " |"
              for row in rows]
    return "\n".join(lines)
