"""The benchmark's results in the source's layout: one table per setting, defenses side by side.

A table covers one (data set, model/width, training budget, poison ratio) setting. Its rows are
attack × metric (ACC, ASR, RA, DER), its columns the defenses ("No defense" first), and each cell
holds the mean ± sample standard deviation over the training seeds, in percent. DER
(BackdoorBench: [max(0, ΔASR) − max(0, ΔACC) + 1] / 2) is computed per seed against the undefended
run of the same setup (same data, attack, training and seed), then averaged. The best defense of
each row is marked (bold): highest ACC, RA and DER, lowest ASR; the undefended column competes for
ACC and RA only, and a row with a single competitor marks nothing.

A defense whose predictions depend on the composition of the test batch (EigenGuard) is reported
under one named evaluation protocol: by default the defense's batch-independent protocol
(EigenGuard: ``running``) when its runs recorded it, else ``triggered``; the column header and a
footnote name it. The undefended column is always read under ``triggered``.

:func:`source_tables` builds the tables (the numbers, per seed, stay on them for plots);
:func:`format_source_markdown` writes them as Markdown; :mod:`eigenguard.report_html` as HTML.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field

from .attacks import create_attack
from .attacks.registry import attack_label
from .budgets import REDUCED_MARK, reduced_note, reduced_text
from .defenses.registry import DEFENSES
from .errors import EigenGuardError
from .evaluate import PROTOCOLS, der
from .report import _defense_label, _read, _setup_key
from .store import ResultStore, StoredRun

METRICS = ("ACC", "ASR", "RA", "DER")
#: per metric: True when higher is better
HIGHER_IS_BETTER = {"ACC": True, "ASR": False, "RA": True, "DER": True}
#: metrics the undefended column does not compete for (it sets their reference)
DEFENDED_ONLY = ("ASR", "DER")
NO_DEFENSE = "No defense"
DAGGER = "†"
PROTOCOL_MARK = "‡"
UNLEARNED_MARK = "§"
#: below this mean undefended ASR (%) a row's backdoor counts as not learned
LEARNED_ASR = 50.0
UNLEARNED_NOTE = (f"{UNLEARNED_MARK} not learned without a defense: the undefended model's mean "
                  f"ASR is below {LEARNED_ASR:.0f}%, so there is no backdoor to remove; DER there "
                  "measures only what the defense costs in accuracy")
TUNING_NOTE = (f"{DAGGER} tuning attack: used to choose settings on the validation split; "
               "the others are held out")
#: what each protocol does, for the footnote of a column evaluated under it
PROTOCOL_TEXT = {
    "triggered": "every test batch (128 images) fully triggered, the usual benchmark protocol",
    "mixed": "each triggered image in a batch with 127 clean test images; only its prediction "
             "counts",
    "single": "batches of one image",
    "running": "batches of 128 with the model in its batch-independent mode (the layer filters "
               "each image alone with its running statistics)",
}
LEGEND = ("Cells: mean ± sample standard deviation over training seeds, in %. "
          "DER = [max(0, ΔASR) − max(0, ΔACC) + 1] / 2 (BackdoorBench), computed per seed against "
          "the undefended run of the same setup and seed, then averaged; \"-\": not applicable or "
          "no data. Bold: the best defense of the row (highest ACC, RA and DER, lowest ASR; the "
          "undefended column competes for ACC and RA only; ties are all bold; nothing is bold "
          "where a single column competes).")
#: config keys that are neither the setting of a table nor ignored (they only split tables)
_ROW_KEYS = ("attack", "attack_settings", "seed", "defense", "defense_settings")


# -- the numbers of one run ------------------------------------------------------------------------

@dataclass
class RunValues:
    """One run's evaluations (in %, mean over eval seeds) by protocol, its DER under the protocol of
    its column (None where not applicable or no undefended reference) and its history."""

    run: StoredRun
    by_protocol: dict[str, dict[str, float]]
    der: float | None = None

    @property
    def seed(self):
        return self.run.config.get("seed")

    @property
    def history(self) -> list[dict]:
        return self.run.history or []


def _run_values(run: StoredRun, evaluations: list[dict]) -> RunValues:
    sums: dict[str, dict[str, list[float]]] = {}
    for evaluation in evaluations:
        target = sums.setdefault(evaluation["protocol"], {})
        for metric in ("acc", "asr", "ra"):
            if metric in evaluation:
                target.setdefault(metric, []).append(100 * evaluation[metric])
    return RunValues(run, {protocol: {m: statistics.mean(v) for m, v in values.items()}
                           for protocol, values in sums.items()})


# -- columns: defenses and the protocol each is read under -----------------------------------------

def _defense_instance(run: StoredRun):
    """The run's defense, rebuilt from its stored settings (None where it cannot be)."""
    return DEFENSES.rebuild(run.config["defense"], run.config.get("defense_settings"))


def _attack_instance(run: StoredRun):
    """The run's attack, rebuilt from its stored settings (None where it cannot be)."""
    try:
        return create_attack(run.config["attack"], **dict(run.config.get("attack_settings") or {}))
    except (EigenGuardError, KeyError, TypeError, ValueError):
        return None


def _reduced(component, name: str) -> str | None:
    """The footnote entry of a component below its paper's budget (None when it is not)."""
    reduced = component.reduced_settings() if component is not None else {}
    return reduced_text(name, reduced) if reduced else None


def _independent(defense, protocol: str) -> bool | None:
    """``defense.batch_independent`` for a protocol, without a model (None where it needs one)."""
    try:
        return bool(defense.batch_independent(None, protocol))
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


@dataclass(frozen=True)
class Column:
    """A defense (by its label) and the protocol its cells are read under."""

    label: str
    defense: str
    protocol: str = "triggered"
    batch_dependent: bool = False
    reduced: bool = False  # below its paper's budget (:mod:`eigenguard.budgets`)

    @property
    def undefended(self) -> bool:
        return self.defense == "none"

    @property
    def name(self) -> str:
        """The column's name without the protocol ("No defense" or the defense's label)."""
        return NO_DEFENSE if self.undefended else self.label + REDUCED_MARK * self.reduced

    @property
    def header(self) -> str:
        """The name, and for a batch-dependent defense the protocol it is read under."""
        if self.batch_dependent:
            return f"{self.name} [{self.protocol}]{PROTOCOL_MARK}"
        return self.name


def _column_protocol(runs: list[RunValues], requested: str | None) -> tuple[str, bool]:
    """(protocol, batch dependent) of one defense's column from its runs in one table."""
    available = [p for p in PROTOCOLS if any(p in values.by_protocol for values in runs)]
    available += sorted({p for values in runs for p in values.by_protocol} - set(available))
    defense = _defense_instance(runs[0].run)
    if defense is None:  # not registered here: judge by what was recorded
        declared = tuple(available)
        dependent = len(available) > 1
        preferred = ["running"]
    else:
        declared = tuple(defense.protocols)
        independent = {p: _independent(defense, p) for p in declared}
        dependent = any(flag is False for flag in independent.values()) or (
            None in independent.values() and len(declared) > 1)
        # a batch of one is batch independent only by its size: not the defense's own mode
        preferred = [p for p in declared if p not in ("triggered", "single") and independent[p]]
    if not dependent:
        return ("triggered" if "triggered" in available or not available else available[0]), False
    if requested is not None and requested in available:
        return requested, True
    for protocol in preferred:
        if protocol in available:
            return protocol, True
    return ("triggered" if "triggered" in available or not available else available[0]), True


# -- cells -----------------------------------------------------------------------------------------

@dataclass
class Cell:
    """Per-seed values (in %) of one metric, one attack, one defense."""

    values: tuple[float, ...]
    bold: bool = False

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.mean(self.values)

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    @property
    def shown_mean(self) -> float:
        """The mean as displayed (two decimals): what the best mark compares."""
        return round(self.mean, 2)

    def number(self) -> str:
        """``"83.27 ± 1.02"``; a single seed: ``"83.27"``."""
        std = self.std
        return f"{self.mean:.2f}" if std is None else f"{self.mean:.2f} ± {std:.2f}"


@dataclass
class Row:
    attack: str  # the attack's name (with its settings where one table holds several of them)
    metric: str
    tuning: bool
    cells: list[Cell | None]
    unlearned: bool = False  # the undefended model did not learn this backdoor
    reduced: bool = False  # the attack ran below its paper's budget

    @property
    def attack_label(self) -> str:
        return (self.attack + (DAGGER if self.tuning else "") + REDUCED_MARK * self.reduced
                + (UNLEARNED_MARK if self.unlearned else ""))


@dataclass
class Table:
    """One setting's results; ``runs[(attack, column index)]`` keeps the per-run numbers."""

    caption: str
    split: str
    setting: dict
    columns: list[Column]
    rows: list[Row]
    footnotes: list[str]
    attacks: list[str]
    tuning: set[str] = field(default_factory=set)
    runs: dict[tuple[str, int], list[RunValues]] = field(default_factory=dict)
    rest: dict = field(default_factory=dict)  # the rest of the runs' shared config (training...)

    @property
    def uniform_n(self) -> int | None:
        """The number of seeds of every cell, or None when it differs across cells."""
        counts = {cell.n for row in self.rows for cell in row.cells if cell is not None}
        return counts.pop() if len(counts) == 1 else None

    def cell_parts(self, row: Row, index: int) -> tuple[str, bool, str]:
        """(number text, bold, seed count note) of a cell: ``("82.00 ± 2.00", True, "(n=2)")``."""
        cell = row.cells[index]
        if cell is None:
            return "-", False, ""
        note = f"(n={cell.n})" if self.uniform_n is None else ""
        return cell.number(), cell.bold, note

    def cell_text(self, row: Row, index: int) -> str:
        """The cell as plain text (no bold mark), the same in Markdown and HTML."""
        number, _, note = self.cell_parts(row, index)
        return f"{number} {note}" if note else number


# -- building the tables ---------------------------------------------------------------------------

def _percent(ratio) -> str:
    return f"{100 * ratio:g}%" if isinstance(ratio, (int, float)) else str(ratio)


def _setting(config: dict) -> dict:
    train = config.get("train") or {}
    return {"dataset": config.get("dataset"), "model": config.get("model"),
            "width": config.get("width"), "epochs": train.get("epochs"),
            "train_size": config.get("train_size"), "poison_ratio": config.get("poison_ratio")}


def _rest(config: dict) -> dict:
    """Everything else that makes a table's runs comparable (training settings, splits, target)."""
    main = {"dataset", "model", "width", "train_size", "poison_ratio"}
    rest = {k: v for k, v in config.items() if k not in main and k not in _ROW_KEYS}
    train = dict(rest.get("train") or {})
    train.pop("epochs", None)
    rest["train"] = train
    return rest


def _flatten(data, prefix: str = "") -> dict:
    if isinstance(data, dict):
        flat = {}
        for key, value in data.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: data}


def setting_text(setting: dict, *, ratio: bool = True) -> str:
    """``"fashion-mnist, preact_resnet18/16, 4 epochs on the whole training set, poison 10%"``
    (without the poison ratio when ``ratio`` is false)."""
    size = setting.get("train_size")
    data = f"{size} training images" if size else "the whole training set"
    text = (f"{setting['dataset']}, {setting['model']}/{setting['width']}, "
            f"{setting['epochs']} epochs on {data}")
    return f"{text}, poison {_percent(setting['poison_ratio'])}" if ratio else text


def _sort_value(value) -> tuple:
    if value is None:
        return (0, 0, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (1, value, "")
    return (2, 0, str(value))


def _attack_names(runs: list[StoredRun]) -> dict[str, str]:
    """Each run's attack as a table row names it: the attack's name, with the settings that
    differ from its defaults where the table holds several variants of it (``wanet(s=1.0)``
    beside ``wanet``). A stored run may list every setting or none, so variants are told apart
    by their labels, not their stored dicts."""
    labels = {run.key: attack_label(run.config.get("attack"), run.config.get("attack_settings"))
              for run in runs}
    variants: dict[str, set[str]] = {}
    for run in runs:
        variants.setdefault(str(run.config.get("attack")), set()).add(labels[run.key])
    return {run.key: labels[run.key] if len(variants[str(run.config.get("attack"))]) > 1
            else str(run.config.get("attack")) for run in runs}


def _mark_best(row: Row, columns: list[Column]) -> None:
    competing = [i for i, cell in enumerate(row.cells) if cell is not None
                 and not (columns[i].undefended and row.metric in DEFENDED_ONLY)]
    if len(competing) < 2:  # a lone competitor is not "the best" of anything
        return
    pick = max if HIGHER_IS_BETTER[row.metric] else min
    best = pick(row.cells[i].shown_mean for i in competing)
    for i in competing:
        row.cells[i].bold = row.cells[i].shown_mean == best


def source_tables(store: ResultStore, runs: list[StoredRun] | None, *, split: str = "test",
                  tuning_attacks=(), protocol: str | None = None) -> list["Table"]:
    """One :class:`Table` per (data set, model/width, epochs/train size, poison ratio) setting of
    the finished runs among ``runs`` (all finished runs when None), on ``split``.

    ``tuning_attacks``: attack names that chose settings (marked with a dagger). ``protocol``:
    the protocol of batch-dependent defenses' columns (default: the defense's batch-independent
    protocol where recorded, else ``triggered``). DER references come from the whole store.
    """
    if protocol is not None and protocol not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {protocol!r}; choose from {PROTOCOLS}")
    tuning_attacks = set(tuning_attacks)
    finished, evaluations_of, _ = _read(store, runs, split)
    references = _references(store, evaluations_of)

    groups: dict[str, list[StoredRun]] = {}
    for run in finished:
        key = json.dumps([_setting(run.config), _rest(run.config)], sort_keys=True, default=str)
        groups.setdefault(key, []).append(run)
    # settings shared by several groups are told apart by what else differs
    by_setting: dict[str, list[str]] = {}
    for key in groups:
        by_setting.setdefault(json.dumps(json.loads(key)[0], sort_keys=True), []).append(key)
    extra_text: dict[str, str] = {}
    for keys in by_setting.values():
        if len(keys) > 1:
            flats = [_flatten(json.loads(key)[1]) for key in keys]
            differing = sorted({name for flat in flats for name in flat
                                if any(other.get(name) != flat.get(name) for other in flats)})
            for key, flat in zip(keys, flats):
                extra_text[key] = ", ".join(f"{name}={flat.get(name, 'unset')}"
                                           for name in differing)

    def group_order(key):
        setting = json.loads(key)[0]
        return tuple(_sort_value(setting[name]) for name in
                     ("dataset", "model", "width", "epochs", "train_size", "poison_ratio"))

    tables = []
    for key in sorted(groups, key=group_order):
        tables.append(_table(groups[key], evaluations_of, references, split, tuning_attacks,
                             protocol, extra_text.get(key, "")))
    return tables


def _references(store: ResultStore, evaluations_of: dict[str, list[dict]]) -> dict[str, dict]:
    """(ACC, ASR) in % under ``triggered`` (mean over eval seeds) of every finished undefended run
    of the store, by setup key."""
    references = {}
    for run in store.find_runs():
        if run.status in ("finished", "evaluation-failed") and run.config.get("defense") == "none":
            triggered = _run_values(run, evaluations_of.get(run.key, [])).by_protocol.get(
                "triggered", {})
            if "acc" in triggered and "asr" in triggered:
                references[_setup_key(run)] = triggered
    return references


def _table(runs: list[StoredRun], evaluations_of, references, split, tuning_attacks, protocol,
           extra: str) -> Table:
    attack_names = _attack_names(runs)
    labels: list[str] = []
    defense_of: dict[str, str] = {}
    attacks: list[str] = []
    tuning: set[str] = set()
    by_cell: dict[tuple[str, str], list[RunValues]] = {}
    reduced: dict[str, str] = {}  # label or attack name -> its footnote entry
    for run in runs:
        label = _defense_label(run)
        if label not in defense_of:
            defense_of[label] = run.config.get("defense")
            labels.append(label)
            if note := _reduced(_defense_instance(run), label):
                reduced[label] = note
        attack = attack_names[run.key]
        if attack not in attacks:
            attacks.append(attack)
            if note := _reduced(_attack_instance(run), attack):
                reduced[attack] = note
        if run.config.get("attack") in tuning_attacks:
            tuning.add(attack)
        by_cell.setdefault((attack, label), []).append(
            _run_values(run, evaluations_of.get(run.key, [])))
    labels.sort(key=lambda label: defense_of[label] != "none")  # stable: "No defense" first

    columns = []
    for label in labels:
        column_runs = [values for (_, l), cell in by_cell.items() if l == label for values in cell]
        chosen, dependent = _column_protocol(column_runs, protocol)
        columns.append(Column(label, defense_of[label], chosen, dependent, label in reduced))

    rows, kept = [], {}
    for attack in attacks:
        for metric in METRICS:
            cells = []
            for index, column in enumerate(columns):
                found = by_cell.get((attack, column.label), [])
                kept[(attack, index)] = found
                cells.append(_cell(found, column, metric, references))
            rows.append(Row(attack, metric, attack in tuning, cells, reduced=attack in reduced))
    for row in rows:
        _mark_best(row, columns)
    _mark_unlearned(rows, columns)

    setting = _setting(runs[0].config)
    table = Table("", split, setting, columns, rows, [], attacks, tuning, kept,
                  _rest(runs[0].config))
    n = table.uniform_n
    seeds = (f"n = {n} seed{'s' if n != 1 else ''} per cell" if n is not None
             else "seeds per cell differ: (n=...) in each cell")
    caption = setting_text(setting) + (f" ({extra})" if extra else "")
    table.caption = f"{caption}; {split} split; mean ± sample std over seeds, {seeds}"
    table.footnotes = _footnotes(table)
    entries = [reduced[name] for name in [*attacks, *labels] if name in reduced]
    if entries:
        table.footnotes.append(reduced_note(entries))
    return table


def _mark_unlearned(rows: list[Row], columns: list[Column]) -> None:
    """Flag the attacks whose undefended mean ASR is below :data:`LEARNED_ASR`: a defense's
    low ASR there is no achievement, and its DER can only show the accuracy it costs."""
    undefended = [i for i, column in enumerate(columns) if column.undefended]
    if not undefended:
        return
    unlearned = {row.attack for row in rows if row.metric == "ASR"
                 and row.cells[undefended[0]] is not None
                 and row.cells[undefended[0]].mean < LEARNED_ASR}
    for row in rows:
        row.unlearned = row.attack in unlearned


def _cell(found: list[RunValues], column: Column, metric: str, references) -> Cell | None:
    values = []
    for run_values in found:
        measured = run_values.by_protocol.get(column.protocol, {})
        if metric == "DER":
            if column.undefended:
                return None
            reference = references.get(_setup_key(run_values.run))
            if reference is None or "acc" not in measured or "asr" not in measured:
                run_values.der = None
                continue
            run_values.der = 100 * der(reference["acc"] / 100, reference["asr"] / 100,
                                       measured["acc"] / 100, measured["asr"] / 100)
            values.append(run_values.der)
        elif metric.lower() in measured:
            values.append(measured[metric.lower()])
    return Cell(tuple(values)) if values else None


def _footnotes(table: Table) -> list[str]:
    notes = []
    if table.tuning:
        notes.append(TUNING_NOTE)
    if any(row.unlearned for row in table.rows):
        notes.append(UNLEARNED_NOTE)
    for protocol in dict.fromkeys(c.protocol for c in table.columns if c.batch_dependent):
        notes.append(f"{PROTOCOL_MARK} [{protocol}]: the evaluation protocol of the column (the "
                     f"defense's predictions depend on its test batch): "
                     f"{PROTOCOL_TEXT.get(protocol, protocol)}. The undefended column is read "
                     f"under triggered.")
    return notes


# -- Markdown --------------------------------------------------------------------------------------

def _md(text: str) -> str:
    return str(text).replace("|", "\\|")


def format_source_markdown(tables: list[Table]) -> str:
    """The tables as Markdown: a caption, attack × metric rows (the attack named once per
    block), bold best cells, footnotes, then the legend of the cells once."""
    if not tables:
        return "no finished runs in the store"
    parts = []
    for number, table in enumerate(tables, 1):
        lines = [f"**Table {number}.** {_md(table.caption)}.", "",
                 "| Attack | Metric | " + " | ".join(_md(c.header) for c in table.columns) + " |",
                 "|---|---|" + "---|" * len(table.columns)]
        previous = None
        for row in table.rows:
            attack = _md(row.attack_label) if row.attack != previous else ""
            previous = row.attack
            cells = []
            for index in range(len(table.columns)):
                number_text, bold, note = table.cell_parts(row, index)
                text = f"**{number_text}**" if bold else number_text
                cells.append(f"{text} {note}" if note else text)
            lines.append(f"| {attack} | {row.metric} | " + " | ".join(cells) + " |")
        if table.footnotes:
            lines.append("")
            lines += [f"{_md(note)}  " for note in table.footnotes]
            lines[-1] = lines[-1].rstrip()
        parts.append("\n".join(lines))
    parts.append(LEGEND)
    return "\n\n".join(parts) + "\n"
