"""Tables read back from the result store."""
from __future__ import annotations

import json

from .evaluate import PROTOCOLS
from .errors import EigenGuardError
from .store import ResultStore, StoredRun

RUN_COLUMNS = ("run", "commit", "dataset", "model", "attack", "poison", "defense", "seed", "epochs")
COLUMNS = (*RUN_COLUMNS, "protocol", "eval batch", "ACC %", "ASR %", "RA %")
WIDE_COLUMNS = (*RUN_COLUMNS, *(f"{p} ACC/ASR" for p in PROTOCOLS))


def _defense_label(run: StoredRun) -> str:
    name = run.config["defense"]
    settings = run.config.get("defense_settings") or {}
    if name == "eigenguard":
        return (f"eigenguard(k={settings.get('k')}, after={settings.get('after')}, "
                f"tail={settings.get('tail_scale')}, scale={settings.get('scale')}, "
                f"eval={settings.get('eval_mode')}, stats_every={settings.get('stats_every', 1)})")
    return name


def parse_condition(text: str) -> tuple[list[str], object]:
    """``"defense_settings.after=layer1"`` -> (["defense_settings", "after"], "layer1").

    The value is read as JSON when it parses (``0.01``, ``32``, ``true``, ``null``), else as text.
    """
    path, sep, value = text.partition("=")
    if not sep or not path:
        raise EigenGuardError(f"--where expects PATH=VALUE, for example poison_ratio=0.01 or "
                              f"defense_settings.after=layer1; got {text!r}")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return path.split("."), parsed


_MISSING = object()


def config_value(config: dict, path: list[str]):
    """The value at a dotted path of a run's config, or _MISSING."""
    node = config
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def config_matches(config: dict, conditions: list[tuple[list[str], object]]) -> bool:
    """Whether every (path, value) condition holds in a run's resolved config."""
    return all(config_value(config, path) == value for path, value in conditions)


def select_runs(store: ResultStore, prefixes: list[str] = (), where: list[str] = (),
                sort: list[str] = ()) -> list[StoredRun]:
    """The stored runs whose key starts with one of ``prefixes`` (any key when there are none)
    and whose config meets every ``where`` condition; in start order, or ordered by the config
    values at the dotted paths in ``sort`` (runs without the value first)."""
    conditions = [parse_condition(text) for text in where]
    runs = [run for run in store.find_runs()
            if (not prefixes or any(run.key.startswith(p) for p in prefixes))
            and config_matches(run.config, conditions)]
    for path in reversed([text.split(".") for text in sort]):  # stable: last path sorts first
        runs.sort(key=lambda run: _sort_key(config_value(run.config, path)))
    return runs


def _sort_key(value) -> tuple:
    if value is _MISSING or value is None:
        return (0, 0, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (1, value, "")
    return (2, 0, str(value))


def _finished_runs(store: ResultStore, runs: list[StoredRun] | None) -> list[StoredRun]:
    runs = store.find_runs() if runs is None else runs
    return [run for run in runs if run.status == "finished"]


def _evaluations_by_run(store: ResultStore, runs: list[StoredRun]) -> dict[str, list[dict]]:
    """Each run's evaluations, read in one query."""
    grouped: dict[str, list[dict]] = {run.key: [] for run in runs}
    for evaluation in store.evaluations():
        if evaluation["run_key"] in grouped:
            grouped[evaluation["run_key"]].append(evaluation)
    return grouped


def _short_commit(commit: str | None) -> str:
    if not commit:
        return "-"
    return commit[:7] + ("-dirty" if commit.endswith("-dirty") else "")


def _run_cells(run: StoredRun) -> tuple:
    """The run's identity: key, the source commit it ran at (rerun there for the same digits), setup."""
    config = run.config
    return (run.key[:8], _short_commit(run.git_commit), config["dataset"], f"{config['model']}/{config['width']}",
            config["attack"], f"{config['poison_ratio']:.0%}", _defense_label(run),
            str(config["seed"]), str(config["train"]["epochs"]))


def result_rows(store: ResultStore, runs: list[StoredRun] | None = None) -> list[tuple]:
    """One row per (finished run, evaluation protocol); all finished runs in start order when
    ``runs`` is None."""
    rows = []
    runs = _finished_runs(store, runs)
    evaluations_of = _evaluations_by_run(store, runs)
    for run in runs:
        evaluations = sorted(evaluations_of[run.key],
                             key=lambda e: (PROTOCOLS.index(e["protocol"]), e["seed"]))
        rows += [(*_run_cells(run), e["protocol"], str(e["batch_size"]), f"{100 * e['acc']:.2f}",
                  f"{100 * e['asr']:.2f}", f"{100 * e['ra']:.2f}") for e in evaluations]
    return rows


def wide_rows(store: ResultStore, runs: list[StoredRun] | None = None) -> list[tuple]:
    """One row per finished run, ACC / ASR (%) of every protocol side by side (WIDE_COLUMNS)."""
    rows = []
    runs = _finished_runs(store, runs)
    evaluations_of = _evaluations_by_run(store, runs)
    for run in runs:
        found = {e["protocol"]: e for e in evaluations_of[run.key] if e["seed"] == 0}
        cells = [f"{100 * found[p]['acc']:.2f} / {100 * found[p]['asr']:.2f}" if p in found
                 else "-" for p in PROTOCOLS]
        rows.append((*_run_cells(run), *cells))
    return rows


def format_table(rows: list[tuple], columns: tuple = COLUMNS, markdown: bool = False) -> str:
    if not rows:
        return "no finished runs in the store"
    widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) for i, c in enumerate(columns)]
    if markdown:
        lines = ["| " + " | ".join(columns) + " |",
                 "|" + "|".join("---" for _ in columns) + "|"]
        lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
        return "\n".join(lines)
    line = "  ".join(str(c).ljust(w) for c, w in zip(columns, widths))
    rule = "  ".join("-" * w for w in widths)
    body = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join([line, rule, *body])
