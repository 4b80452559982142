"""Tables read back from the result store."""
from __future__ import annotations

import json
import statistics

from .attacks.registry import attack_label
from .defenses.registry import DEFENSES
from .evaluate import PROTOCOLS, der
from .errors import EigenGuardError
from .store import ResultStore, StoredRun

RUN_COLUMNS = ("run", "commit", "dataset", "model", "attack", "poison", "defense", "seed", "epochs")
COLUMNS = (*RUN_COLUMNS, "protocol", "eval batch", "ACC %", "ASR %", "RA %", "DER %")
WIDE_COLUMNS = (*RUN_COLUMNS, *(f"{p} ACC/ASR" for p in PROTOCOLS))
SUMMARY_COLUMNS = ("dataset", "model", "attack", "poison", "defense", "epochs", "seeds",
                   *(f"{p} ACC / ASR (range) / DER" for p in PROTOCOLS))


def _defense_label(run: StoredRun) -> str:
    """The defense's own short label for tables (its name where it cannot be rebuilt)."""
    defense = DEFENSES.rebuild(run.config["defense"], run.config.get("defense_settings"))
    return defense.label() if defense is not None else run.config["defense"]


def _attack_label(run: StoredRun) -> str:
    return attack_label(run.config["attack"], run.config.get("attack_settings"))


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


def same_value(stored, wanted) -> bool:
    """Equality that keeps booleans apart from numbers (``seed=true`` does not match seed 1)."""
    if isinstance(stored, bool) or isinstance(wanted, bool):
        return isinstance(stored, bool) and isinstance(wanted, bool) and stored == wanted
    return stored == wanted


def config_matches(config: dict, conditions: list[tuple[list[str], object]]) -> bool:
    """Whether every (path, value) condition holds in a run's resolved config."""
    return all(same_value(config_value(config, path), value) for path, value in conditions)


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
    return [run for run in runs if run.status in ("finished", "evaluation-failed")]


def _short_commit(commit: str | None) -> str:
    if not commit:
        return "-"
    return commit[:7] + ("-dirty" if commit.endswith("-dirty") else "")


def _dataset_cell(config: dict) -> str:
    """The data set, with the subset size when the run drew one (``train_size``), so budgets
    that differ only in it stay apart in a table."""
    size = config.get("train_size")
    return config["dataset"] if size is None else f"{config['dataset']} ({size} images)"


def _setup_cells(run: StoredRun) -> tuple:
    """Data set, model/width, attack, poison ratio and defense of a run."""
    config = run.config
    return (_dataset_cell(config), f"{config['model']}/{config['width']}", _attack_label(run),
            f"{config['poison_ratio']:.0%}", _defense_label(run))


def _run_cells(run: StoredRun) -> tuple:
    """The run's identity: key, the source commit it ran at (rerun there for the same digits), setup."""
    return (run.key[:8], _short_commit(run.git_commit), *_setup_cells(run),
            str(run.config["seed"]), str(run.config["train"]["epochs"]))


def _config_without(config: dict, *ignored: str) -> str:
    """The run's config without the ``ignored`` top-level keys, as text (a grouping key)."""
    return json.dumps({name: value for name, value in config.items() if name not in ignored},
                      sort_keys=True)


def _setup_key(run: StoredRun) -> str:
    """What a defended run shares with its undefended reference: the stored setup key (which
    includes the data's fingerprint); all but the defense for runs stored before it existed."""
    return run.setup_key or _config_without(run.config, "defense", "defense_settings")


def _read(store: ResultStore, runs: list[StoredRun] | None, split: str = "test"):
    """The finished runs among ``runs`` (all, in start order, when None), every run's evaluations
    by run key, and the undefended references of DER: (ACC, ASR) of each finished undefended run
    by its setup (:func:`_setup_key`). Two queries, whatever the number of runs."""
    finished = _finished_runs(store, None)
    runs = finished if runs is None else _finished_runs(store, runs)
    evaluations_of: dict[str, list[dict]] = {}
    for evaluation in store.evaluations(split=split):
        evaluations_of.setdefault(evaluation["run_key"], []).append(evaluation)
    undefended = {}
    for run in finished:
        if run.config.get("defense") == "none":
            for e in evaluations_of.get(run.key, []):
                if e["protocol"] == "triggered" and e["seed"] == 0:
                    undefended[_setup_key(run)] = (e["acc"], e["asr"])
    return runs, evaluations_of, undefended


def _der_of(run: StoredRun, acc: float, asr: float, undefended: dict) -> float | None:
    reference = undefended.get(_setup_key(run))
    if run.config.get("defense") == "none" or reference is None:
        return None
    return der(*reference, acc, asr)


def _der_cell(run: StoredRun, acc: float, asr: float, undefended: dict) -> str:
    value = _der_of(run, acc, asr, undefended)
    return "-" if value is None else f"{100 * value:.2f}"


def result_rows(store: ResultStore, runs: list[StoredRun] | None = None,
                split: str = "test") -> list[tuple]:
    """One row per (finished run, evaluation protocol); all finished runs in start order when
    ``runs`` is None. DER is against the undefended run of the same setup, where one is stored."""
    rows = []
    runs, evaluations_of, undefended = _read(store, runs, split)
    for run in runs:
        evaluations = sorted(evaluations_of.get(run.key, []),
                             key=lambda e: (PROTOCOLS.index(e["protocol"]), e["seed"]))
        rows += [(*_run_cells(run), e["protocol"], str(e["batch_size"]), f"{100 * e['acc']:.2f}",
                  f"{100 * e['asr']:.2f}", f"{100 * e['ra']:.2f}",
                  _der_cell(run, e["acc"], e["asr"], undefended)) for e in evaluations]
    return rows


def wide_rows(store: ResultStore, runs: list[StoredRun] | None = None,
              split: str = "test") -> list[tuple]:
    """One row per finished run, ACC / ASR (%) of every protocol side by side (WIDE_COLUMNS)."""
    rows = []
    runs, evaluations_of, _ = _read(store, runs, split)
    for run in runs:
        found = {e["protocol"]: e for e in evaluations_of.get(run.key, []) if e["seed"] == 0}
        cells = [f"{100 * found[p]['acc']:.2f} / {100 * found[p]['asr']:.2f}" if p in found
                 else "-" for p in PROTOCOLS]
        rows.append((*_run_cells(run), *cells))
    return rows


def summary_rows(store: ResultStore, runs: list[StoredRun] | None = None,
                 split: str = "test") -> list[tuple]:
    """One row per setup over its seeds (runs whose configs differ only in the seed), in the order
    of each setup's first run: mean ACC / ASR (%), the ASR's range over the seeds and the mean DER
    (%), per protocol (SUMMARY_COLUMNS)."""
    runs, evaluations_of, undefended = _read(store, runs, split)
    groups: dict[str, list[StoredRun]] = {}
    for run in runs:
        groups.setdefault(_config_without(run.config, "seed"), []).append(run)
    rows = []
    for group in groups.values():
        cells = []
        for protocol in PROTOCOLS:
            found = [(run, e) for run in group for e in evaluations_of.get(run.key, [])
                     if e["protocol"] == protocol and e["seed"] == 0]
            cells.append(_summary_cell(found, undefended, len(group)))
        rows.append((*_setup_cells(group[0]), str(group[0].config["train"]["epochs"]),
                     ",".join(str(run.config["seed"]) for run in group), *cells))
    return rows


def _summary_cell(found: list[tuple[StoredRun, dict]], undefended: dict, seeds: int) -> str:
    """Mean ACC / ASR (ASR range) / mean DER of one protocol; says so when not every seed of the
    setup was evaluated under it."""
    if not found:
        return "-"
    accs = [100 * e["acc"] for _, e in found]
    asrs = [100 * e["asr"] for _, e in found]
    cell = f"{statistics.mean(accs):.2f} / {statistics.mean(asrs):.2f}"
    if len(found) > 1:
        cell += f" ({min(asrs):.2f}-{max(asrs):.2f})"
    ders = [_der_of(run, e["acc"], e["asr"], undefended) for run, e in found]
    cell += " / -" if None in ders else f" / {100 * statistics.mean(ders):.2f}"
    if len(found) < seeds:
        cell += f" [{len(found)} of {seeds} seeds]"
    return cell


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
