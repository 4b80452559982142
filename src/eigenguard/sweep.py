"""A grid of runs as one resumable command: plan against the store, then run what is missing.

The store is the sweep's memory. A finished run is never repeated; a run killed mid-way left a
claim whose process is gone, which the next sweep takes over (the store writes a run's rows in
one transaction, so nothing half-written survives); a failed run is recorded with its error and
the sweep goes on, and on the next sweep it is skipped unless ``retry_failed``.

Runs are ordered so that each setup's undefended run comes before the post-training defenses
that repair its model. An executor runs the pending list: :class:`InProcessExecutor` here, one
run after the other; ``eigenguard.sweep_ray.RayExecutor`` on a Ray cluster.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

from .experiment import RunConfig, reevaluate, run
from .grid import Grid
from .splits import LoadedData, load_data
from .store import ResultStore, StoredRun

#: what a planned run's state means in the dry-run listing
STATES = {"stored": "finished, in the store", "pending": "to run",
          "failed": "failed before (skipped; --retry-failed runs it again)",
          "evaluation-failed": "trained, evaluation failed (skipped; --retry-failed re-evaluates)",
          "running": "claimed by another live process", "stale": "killed mid-way; runs again",
          "missing-protocols": "finished; evaluated again for the grid's protocols"}


@dataclass
class PlannedRun:
    config: RunConfig
    key: str
    setup_key: str
    state: str
    stored: StoredRun | None = None
    estimate: float | None = None  # seconds, from measured runs of the same kind
    protocols: tuple[str, ...] | None = None  # the grid's protocols that apply to this defense
    missing: tuple[str, ...] = ()  # of those, the ones a stored run has not been evaluated in

    @property
    def to_do(self) -> bool:
        return self.state in ("pending", "stale", "missing-protocols")

    def describe(self) -> str:
        c = self.config
        budget = f"{c.train_size or 'all'} images x {c.train.epochs} epochs"
        attack = c.attack
        if c.attack_settings:  # the settings the grid names, so variants of one attack differ
            attack += f"({', '.join(f'{k}={v}' for k, v in c.attack_settings)})"
        return (f"{c.dataset} {c.model}/{c.width} {budget} {attack} {c.poison_ratio:g} "
                f"{c.build_defense().label()} seed {c.seed}")


@dataclass
class SweepSummary:
    total: int
    stored_before: int
    finished: int = 0
    failed: list[str] = field(default_factory=list)  # keys
    skipped: list[str] = field(default_factory=list)  # failed before, or busy elsewhere
    seconds: float = 0.0  # wall time of this sweep's runs


def _kind(config: RunConfig) -> tuple:
    """What a run's cost depends on (the attack and seed change it little)."""
    return (config.dataset, config.model, config.width, config.train_size, config.train.epochs,
            config.train.batch_size)


def _victim_images(config: RunConfig, available: int) -> float:
    """About how many images the victim trains on: the subset minus validation and reserve."""
    images = min(config.train_size or available, available)
    return images * (1 - config.validation_fraction - config.reserve_fraction)


class CostModel:
    """Seconds a run is expected to take, from the wall time of finished runs: of the same kind
    (same data, model, width, training budget; the same defense where one was measured), else
    scaled from the seconds per training image and epoch of the same data, model and width.
    Medians, not means: a run slowed by other work on the machine, or paused, must not set the
    estimate of every run like it."""

    def __init__(self, runs: list[StoredRun]):
        self.measured: dict[tuple, list[float]] = {}
        self.rates: dict[tuple, list[float]] = {}
        for stored in runs:
            if stored.status == "finished" and stored.wall_seconds:
                try:
                    config = RunConfig.from_dict(stored.config)
                except (TypeError, ValueError):
                    continue
                images = (stored.extra.get("split_sizes") or {}).get("train")
                self.add(config, stored.wall_seconds, images)

    def add(self, config: RunConfig, seconds: float, images: int | None = None) -> None:
        for key in ((*_kind(config), config.defense), _kind(config)):
            self.measured.setdefault(key, []).append(seconds)
        if images:
            rate = seconds / (images * config.train.epochs)
            for key in ((config.dataset, config.model, config.width, config.defense),
                        (config.dataset, config.model, config.width)):
                self.rates.setdefault(key, []).append(rate)

    def estimate(self, config: RunConfig, available: int | None = None) -> float | None:
        for key in ((*_kind(config), config.defense), _kind(config)):
            if key in self.measured:
                return statistics.median(self.measured[key])
        if available:
            for key in ((config.dataset, config.model, config.width, config.defense),
                        (config.dataset, config.model, config.width)):
                if key in self.rates:
                    return (statistics.median(self.rates[key]) * config.train.epochs
                            * _victim_images(config, available))
        return None


def _order(config: RunConfig) -> int:
    """Undefended runs first, then training-time defenses, then post-training repairs."""
    if config.defense == "none":
        return 0
    return 2 if config.build_defense().starts_from == "backdoored" else 1


def _grid_protocols(grid: Grid, config: RunConfig) -> tuple[str, ...] | None:
    if grid.protocols is None:
        return None
    declared = config.build_defense().protocols
    return tuple(p for p in grid.protocols if p in declared) or tuple(declared[:1])


def _missing_protocols(store: ResultStore, stored: StoredRun, protocols) -> tuple[str, ...]:
    if not protocols:
        return ()
    have = {row["protocol"] for row in store.metrics(stored.key)}
    return tuple(p for p in protocols if p not in have)


def plan(grid: Grid, store: ResultStore, *, data_root=None,
         loaded: dict[str, LoadedData] | None = None, retry_failed: bool = False
         ) -> tuple[list[PlannedRun], dict[str, LoadedData]]:
    """Every run of the grid with its key and state in the store, in the order it would run.

    Loads each data set once (its fingerprint is part of the keys); returns the loaded data too.
    """
    loaded = dict(loaded or {})
    for dataset in dict.fromkeys(c.dataset for c in grid.configs):
        if dataset not in loaded:
            loaded[dataset] = load_data(dataset, data_root)
    costs = CostModel(store.find_runs())
    planned = []
    for config in sorted(grid.configs, key=_order):
        fingerprint = loaded[config.dataset].fingerprint
        key = config.key(fingerprint)
        stored = store.get_run(key)
        protocols = _grid_protocols(grid, config)
        missing = _missing_protocols(store, stored, protocols) if stored is not None else ()
        if stored is None:
            state = "pending"
        elif stored.status == "finished":
            state = "missing-protocols" if missing and stored.checkpoint else "stored"
        elif stored.status == "running":
            state = "running" if store.is_live(stored) else "stale"
        else:
            state = stored.status if not retry_failed else "pending"
        available = len(loaded[config.dataset].train)
        planned.append(PlannedRun(config, key, config.setup_key(fingerprint), state, stored,
                                  costs.estimate(config, available), protocols, missing))
    return planned, loaded


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes = round(seconds / 60)
    if minutes < 1:
        return f"{seconds:.0f} s"
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def dry_run_lines(grid: Grid, planned: list[PlannedRun]) -> list[str]:
    """What a sweep would do: each run with its state and estimated cost, then the totals."""
    lines = [f"grid {grid.name}: {len(planned)} runs"
             + (f" ({grid.source})" if grid.source else "")]
    for item in planned:
        cost = format_duration(item.estimate) if item.to_do else ""
        lines.append(f"  {item.key[:8]}  {item.state:<18} {cost:>10}  {item.describe()}")
    to_do = [item for item in planned if item.to_do]
    known = [item.estimate for item in to_do if item.estimate is not None]
    counts = {state: sum(item.state == state for item in planned) for state in STATES}
    lines.append("states: " + ", ".join(f"{n} {state}" for state, n in counts.items() if n))
    estimate = format_duration(sum(known)) if known else "unknown (no run of this kind measured)"
    if known and len(known) < len(to_do):
        estimate += f" for the {len(known)} of {len(to_do)} runs of a measured kind"
    lines.append(f"to run: {len(to_do)}; estimated compute: {estimate}")
    return lines


class Progress:
    """Sweep progress as log lines: runs done of total, the current run, the time left."""

    def __init__(self, planned: list[PlannedRun], log=print):
        self.log = log
        self.total = len(planned)
        self.done = sum(not item.to_do for item in planned)
        self.start = time.monotonic()
        self.measured: list[tuple[PlannedRun, float]] = []

    def time_left(self, remaining: list[PlannedRun]) -> float | None:
        """Stored estimates where a run of the kind was measured, else this sweep's mean."""
        mean = statistics.mean(s for _, s in self.measured) if self.measured else None
        total = 0.0
        for item in remaining:
            estimate = item.estimate if item.estimate is not None else mean
            if estimate is None:
                return None
            total += estimate
        return total

    def starting(self, item: PlannedRun, remaining: list[PlannedRun]) -> None:
        self.log(f"[sweep] {self.done}/{self.total} done; now {item.key[:8]} {item.describe()}; "
                 f"time left about {format_duration(self.time_left(remaining))}")

    def finished(self, item: PlannedRun, seconds: float) -> None:
        self.done += 1
        self.measured.append((item, seconds))


class InProcessExecutor:
    """Runs the pending runs one after the other in this process."""

    name = "in-process"

    def execute(self, pending: list[PlannedRun], store: ResultStore,
                loaded: dict[str, LoadedData], summary: SweepSummary, *, device="cpu",
                data_root=None, progress=True, log=print) -> None:
        tracker = Progress(pending, log)
        tracker.done = summary.stored_before + len(summary.skipped)
        tracker.total = summary.total
        for index, item in enumerate(pending):
            tracker.starting(item, pending[index:])
            clock = time.monotonic()
            try:
                if item.state == "missing-protocols" or (
                        item.stored is not None and item.stored.status == "evaluation-failed"
                        and item.stored.checkpoint):
                    protocols = item.missing or item.protocols
                    reevaluate(store, item.stored, data_root=data_root, protocols=protocols,
                               device=device, progress=progress, log=log)
                    status = "finished"
                else:
                    status = run(item.config, store, device=device,
                                 loaded=loaded[item.config.dataset], progress=progress, log=log,
                                 protocols=item.protocols).status
            except KeyboardInterrupt:
                raise
            except Exception as error:  # recorded by run(); the sweep goes on
                log(f"[sweep] {item.key[:8]} failed: {type(error).__name__}: {error}")
                summary.failed.append(item.key)
                continue
            seconds = time.monotonic() - clock
            summary.seconds += seconds
            tracker.finished(item, seconds)
            if status == "finished":
                summary.finished += 1
            else:
                summary.failed.append(item.key)


def sweep(grid: Grid, store: ResultStore, *, executor=None, data_root=None, device="cpu",
          retry_failed: bool = False, progress: bool = True, log=print) -> SweepSummary:
    """Run every run of the grid that the store does not hold yet; returns the counts."""
    executor = executor or InProcessExecutor()
    planned, loaded = plan(grid, store, data_root=data_root, retry_failed=retry_failed)
    summary = SweepSummary(len(planned), sum(item.state == "stored" for item in planned))
    summary.skipped = [item.key for item in planned if not item.to_do and item.state != "stored"]
    for item in planned:
        if item.state in ("failed", "evaluation-failed"):
            log(f"[sweep] skipping {item.key[:8]} ({item.state} before: "
                f"{(item.stored.error or '')[:120]}); --retry-failed runs it again")
    pending = [item for item in planned if item.to_do]
    log(f"[sweep] grid {grid.name}: {summary.total} runs, {summary.stored_before} stored, "
        f"{len(pending)} to run with the {executor.name} executor")
    executor.execute(pending, store, loaded, summary, device=device, data_root=data_root,
                     progress=progress, log=log)
    log(f"[sweep] grid {grid.name}: {summary.finished} finished now, {summary.stored_before} "
        f"stored before, {len(summary.failed)} failed, {len(summary.skipped)} skipped; "
        f"{format_duration(summary.seconds)} of compute")
    return summary
