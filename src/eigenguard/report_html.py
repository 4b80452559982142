"""The benchmark's report as one self-contained HTML page: the source's tables and plots.

The page opens without a network: inline CSS, the plots embedded as base64 PNG images drawn with
matplotlib's Agg renderer (no pyplot, no global state), no script. It shows the title, the
command that made it, the git commits of the runs and the split; the tables of
:mod:`eigenguard.report_tables` (same numbers, same bold and dagger marks); and four plots:

(a) clean ACC against ASR, one point per (defense, attack), mean over seeds with error bars;
(b) training curves (loss, and accuracy where recorded) from the runs' per-epoch history;
(c) the protocol gap of batch-dependent defenses: ASR under each evaluation protocol;
(d) ASR and ACC against the poison ratio, when the runs hold more than one ratio.

A plot whose data is absent is replaced by a sentence saying why. :func:`plot_files` writes the
same figures as PNG files, for Markdown reports to link.
"""
from __future__ import annotations

import base64
import html
import io
import json
import shlex
import statistics
import textwrap
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .errors import EigenGuardError
from .evaluate import PROTOCOLS
from .report import _finished_runs, _short_commit
from .report_cost import COLUMNS as COST_COLUMNS
from .report_cost import CostRow, cost_cells, cost_rows, total_text
from .report_detection import COLUMNS as DETECTION_COLUMNS
from .report_detection import NOTE as DETECTION_NOTE
from .report_detection import DetectionRow, detection_cells, detection_rows
from .report_tables import (LEGEND, NO_DEFENSE, PROTOCOL_MARK, UNLEARNED_MARK, Column,
                            RunValues, Table, setting_text, source_tables)
from .store import ResultStore, StoredRun

DPI = 110
NO_DEFENSE_COLOR = "#4d4d4d"
#: tab10 without its grey (kept for the undefended column), then tab20's lighter shades without
#: theirs: 18 defenses get distinct colours (the comparison grid has 13)
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5",
           "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">")
PROTOCOL_COLORS = {"triggered": "#d62728", "mixed": "#ff7f0e", "single": "#9467bd",
                   "running": "#2ca02c"}
#: history keys read as the training accuracy, in order of preference
ACCURACY_KEYS = ("train_acc", "acc")


def _figure_class():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:  # matplotlib is not a dependency of the library itself
        raise EigenGuardError("the report's plots are drawn with matplotlib, which is not "
                              "installed: pip install matplotlib") from error

    def new_figure(width: float, height: float):
        figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
        FigureCanvasAgg(figure)
        return figure

    return new_figure


@dataclass
class Plot:
    """One figure of the report, or the sentence that says why it is absent."""

    name: str  # file stem
    title: str
    description: str
    figure: object | None = None
    skipped: str | None = None

    def png(self) -> bytes:
        buffer = io.BytesIO()
        # no Software entry: it would carry matplotlib's web address into the page
        self.figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
        return buffer.getvalue()


# -- helpers over the tables -----------------------------------------------------------------------

def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _wrap(text: str, width: int = 48) -> str:
    return "\n".join(textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False)
                     or [text])


def _plain_header(column: Column) -> str:
    return column.header.replace(PROTOCOL_MARK, "")


def _colors(tables: list[Table]) -> dict[str, str]:
    """A colour per defense (column name), the same in every plot."""
    colors, names = {NO_DEFENSE: NO_DEFENSE_COLOR}, []
    for table in tables:
        for column in table.columns:
            if column.name not in colors and column.name not in names:
                names.append(column.name)
    colors.update({name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)})
    return colors


def _markers(tables: list[Table]) -> dict[str, str]:
    attacks = list(dict.fromkeys(attack for table in tables for attack in table.attacks))
    return {attack: MARKERS[i % len(MARKERS)] for i, attack in enumerate(attacks)}


def _short_names(tables: list[Table]) -> list[str]:
    """"Table 2 (poison 10%)": the number and the setting fields that differ between tables."""
    fields = {"dataset": lambda s: s["dataset"], "model": lambda s: f"{s['model']}/{s['width']}",
              "epochs": lambda s: f"{s['epochs']} epochs",
              "train_size": lambda s: f"{s['train_size'] or 'all'} train",
              "poison_ratio": lambda s: f"poison {100 * s['poison_ratio']:g}%"}
    differing = [name for name, show in fields.items()
                 if len({show(t.setting) for t in tables}) > 1]
    names = []
    for number, table in enumerate(tables, 1):
        details = ", ".join(fields[name](table.setting) for name in differing)
        names.append(f"Table {number}" + (f" ({details})" if details else ""))
    return names


def _values(found: list[RunValues], protocol: str, metric: str) -> list[float]:
    return [v.by_protocol[protocol][metric] for v in found
            if metric in v.by_protocol.get(protocol, {})]


def _legend(figure, handles, labels) -> None:
    """One legend under the panels, in as many columns as fit the figure's width (an entry is
    about 0.07 inch per character of its longest line at 9 points, plus its handle)."""
    if not handles:
        return
    widths = [0.07 * max(len(line) for line in str(label).splitlines() or [""]) + 0.7
              for label in labels]
    room = 0.95 * figure.get_figwidth()
    if sum(widths) <= room:  # everything on one row
        columns = len(handles)
    else:
        columns = max(1, min(len(handles), int(room // max(widths))))
    figure.legend(handles, labels, loc="outside lower center", ncols=columns, frameon=False,
                  fontsize=9)


def _grid(figure, rows: int, columns: int):
    axes = figure.subplots(rows, columns, squeeze=False)
    return axes


# -- (a) clean accuracy against attack success rate ---------------------------------------------

def _acc_asr_plot(tables, names, colors, markers, new_figure) -> Plot:
    plot = Plot("acc_vs_asr", "Clean accuracy against attack success rate",
                "One point per (defense, attack): mean over seeds, error bars one sample standard "
                "deviation; each panel is one table, each defense read under its table's "
                "protocol. Better is up and to the left (high ACC, low ASR).")
    panels = [(table, name) for table, name in zip(tables, names)
              if any(_values(found, table.columns[i].protocol, "acc")
                     for (_, i), found in table.runs.items())]
    if not panels:
        plot.skipped = ("No ACC or ASR was recorded for the selected runs, so there is no point "
                        "to plot.")
        return plot
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    figure = new_figure(4.6 * columns, 3.9 * rows + 0.9)
    axes = _grid(figure, rows, columns)
    seen_defenses: dict[str, str] = {}
    seen_attacks: list[str] = []
    for index, (table, name) in enumerate(panels):
        ax = axes[index // columns][index % columns]
        for (attack, i), found in table.runs.items():
            column = table.columns[i]
            accs = _values(found, column.protocol, "acc")
            asrs = _values(found, column.protocol, "asr")
            if not accs or not asrs:
                continue
            (acc, acc_std), (asr, asr_std) = _mean_std(accs), _mean_std(asrs)
            ax.errorbar(asr, acc, xerr=asr_std, yerr=acc_std, color=colors[column.name],
                        marker=markers[attack], markersize=8, capsize=3, linestyle="none",
                        markeredgecolor="white", markeredgewidth=0.6)
            seen_defenses.setdefault(column.name, _plain_header(column))
            if attack not in seen_attacks:
                seen_attacks.append(attack)
        ax.set_xlim(-4, 104)
        ax.set_xlabel("ASR (%)")
        ax.set_ylabel("clean ACC (%)")
        ax.set_title(_wrap(name, 50), fontsize=10)
        ax.grid(alpha=0.3)
    for index in range(len(panels), rows * columns):
        axes[index // columns][index % columns].set_visible(False)
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    # colour: the defense (filled squares); marker: the attack (hollow, so not a defense's colour)
    handles = [Patch(color=colors[n]) for n in seen_defenses]
    labels = [_wrap(header, 42) for header in seen_defenses.values()]
    handles += [Line2D([], [], color="black", marker=markers[a], linestyle="none",
                       markersize=8, markerfacecolor="none") for a in seen_attacks]
    labels += [_attack_label(tables, a) for a in seen_attacks]
    _legend(figure, handles, labels)
    plot.figure = figure
    return plot


def _attack_label(tables: list[Table], attack: str) -> str:
    """The attack's name with the tables' marks: tuning (†), not learned undefended (§)."""
    tuning = any(attack in table.tuning for table in tables)
    unlearned = any(row.unlearned for table in tables for row in table.rows
                    if row.attack == attack)
    return attack + ("†" if tuning else "") + (UNLEARNED_MARK if unlearned else "")


# -- (b) training curves ---------------------------------------------------------------------------

def _accuracy_key(histories: list[list[dict]]) -> str | None:
    for key in ACCURACY_KEYS:
        if any(key in record for history in histories for record in history):
            return key
    return None


def _curve(found: list[RunValues], key: str):
    """Epochs, and the mean, min and max over the runs of a history key at each epoch."""
    by_epoch: dict[int, list[float]] = {}
    for values in found:
        for position, record in enumerate(values.history, 1):
            if isinstance(record.get(key), (int, float)):
                by_epoch.setdefault(int(record.get("epoch", position)), []).append(
                    float(record[key]))
    epochs = sorted(by_epoch)
    return (epochs, [statistics.mean(by_epoch[e]) for e in epochs],
            [min(by_epoch[e]) for e in epochs], [max(by_epoch[e]) for e in epochs])


def _training_plot(tables, names, colors, new_figure) -> Plot:
    plot = Plot("training_curves", "Training curves",
                "Per-epoch training loss (and training accuracy where the history records it) "
                "from the runs' history: one line per defense (mean over seeds, band: min to "
                "max), a panel per attack; one row of panels per table and quantity.")
    rows = []  # (table, name, key, label)
    for table, name in zip(tables, names):
        histories = [v.history for found in table.runs.values() for v in found if v.history]
        if not histories:
            continue
        rows.append((table, name, "loss", "training loss"))
        accuracy = _accuracy_key(histories)
        if accuracy is not None:
            rows.append((table, name, accuracy, "training accuracy (%)"))
    if not rows:
        plot.skipped = ("The selected runs recorded no per-epoch history, so there are no "
                        "training curves to draw.")
        return plot
    width = max(len(table.attacks) for table, *_ in rows)
    figure = new_figure(4.4 * width, 2.7 * len(rows) + 0.8)
    axes = _grid(figure, len(rows), width)
    legend: dict[str, str] = {}
    for r, (table, name, key, label) in enumerate(rows):
        scale = 100.0 if key in ACCURACY_KEYS else 1.0
        for a in range(width):
            ax = axes[r][a]
            if a >= len(table.attacks):
                ax.set_visible(False)
                continue
            attack = table.attacks[a]
            for i, column in enumerate(table.columns):
                epochs, mean, low, high = _curve(table.runs.get((attack, i), []), key)
                if not epochs:
                    continue
                color = colors[column.name]
                ax.plot(epochs, [scale * m for m in mean], color=color, marker="o",
                        markersize=3.5, linewidth=1.6)
                if len(table.runs.get((attack, i), [])) > 1:
                    ax.fill_between(epochs, [scale * v for v in low], [scale * v for v in high],
                                    color=color, alpha=0.15, linewidth=0)
                legend.setdefault(column.name, column.name)
            ax.set_title(_wrap(f"{_attack_label([table], attack)} · {name}", 50), fontsize=10)
            ax.set_xlabel("epoch")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.xaxis.get_major_locator().set_params(integer=True)
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], color=colors[n], linewidth=2) for n in legend]
    _legend(figure, handles, [_wrap(n, 50) for n in legend])
    plot.figure = figure
    return plot


# -- (c) the protocol gap of batch-dependent defenses -------------------------------------------

def _protocol_plot(tables, names, new_figure) -> Plot:
    plot = Plot("protocol_gap", "Protocol gap of batch-dependent defenses",
                "ASR of each batch-dependent defense under every evaluation protocol it was "
                "measured with (mean over seeds, error bars one sample standard deviation), per "
                "attack; the dashed black line marks the undefended ASR (triggered). triggered: "
                "every test batch fully triggered; mixed: one triggered image among 127 clean "
                "ones; single: batches of one; running: the layer's running statistics, per "
                "image.")
    panels = []
    for table, name in zip(tables, names):
        undefended = [i for i, c in enumerate(table.columns) if c.undefended]
        for i, column in enumerate(table.columns):
            if not column.batch_dependent:
                continue
            protocols = [p for p in PROTOCOLS if any(
                _values(table.runs.get((a, i), []), p, "asr") for a in table.attacks)]
            if protocols:
                panels.append((table, name, i, protocols, undefended[0] if undefended else None))
    if not panels:
        plot.skipped = ("None of the selected runs belongs to a defense whose predictions depend "
                        "on the test batch, so there is no protocol gap to show.")
        return plot
    columns = min(2, len(panels))
    rows = -(-len(panels) // columns)
    widest = max(len(table.attacks) for table, *_ in panels)
    figure = new_figure(max(5.5, 1.9 + 1.5 * widest) * columns, 3.9 * rows + 0.7)
    axes = _grid(figure, rows, columns)
    used: list[str] = []
    has_reference = False
    for index, (table, name, i, protocols, reference) in enumerate(panels):
        ax = axes[index // columns][index % columns]
        width = 0.8 / len(protocols)
        for p_index, protocol in enumerate(protocols):
            xs, heights, errors = [], [], []
            for a_index, attack in enumerate(table.attacks):
                values = _values(table.runs.get((attack, i), []), protocol, "asr")
                if values:
                    mean, std = _mean_std(values)
                    xs.append(a_index - 0.4 + width * (p_index + 0.5))
                    heights.append(mean)
                    errors.append(std)
            bars = ax.bar(xs, heights, width * 0.92, yerr=errors, capsize=2,
                          color=PROTOCOL_COLORS.get(protocol, "#999999"), label=protocol)
            ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
            if protocol not in used:
                used.append(protocol)
        if reference is not None:
            for a_index, attack in enumerate(table.attacks):
                values = _values(table.runs.get((attack, reference), []), "triggered", "asr")
                if values:
                    ax.hlines(statistics.mean(values), a_index - 0.45, a_index + 0.45,
                              color="black", linewidth=1.8, linestyle=(0, (4, 2)), zorder=1.5)
                    has_reference = True
        ax.set_xticks(range(len(table.attacks)),
                      [_attack_label([table], a) for a in table.attacks])
        ax.set_ylim(0, 112)
        ax.set_ylabel("ASR (%)")
        ax.set_title(_wrap(f"{name}: {table.columns[i].name}", 60), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    for index in range(len(panels), rows * columns):
        axes[index // columns][index % columns].set_visible(False)
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    handles = [Patch(color=PROTOCOL_COLORS.get(p, "#999999")) for p in used]
    labels = list(used)
    if has_reference:
        handles.append(Line2D([], [], color="black", linewidth=1.8, linestyle=(0, (4, 2))))
        labels.append("no defense (triggered)")
    _legend(figure, handles, labels)
    plot.figure = figure
    return plot


# -- (d) results against the poison ratio ----------------------------------------------------------

def _ratio_plot(tables, colors, new_figure) -> Plot:
    plot = Plot("poison_ratio", "Results against the poison ratio",
                "ASR (top) and clean ACC (bottom) against the poison ratio, one line per defense "
                "(each read under its table's protocol; mean over seeds, error bars one sample "
                "standard deviation), a panel per attack.")
    families: dict[str, list[Table]] = {}
    for table in tables:
        setting = {k: v for k, v in table.setting.items() if k != "poison_ratio"}
        key = json.dumps([setting, table.rest], sort_keys=True, default=str)
        families.setdefault(key, []).append(table)
    families = {key: family for key, family in families.items()
                if len({t.setting["poison_ratio"] for t in family}) > 1}
    if not families:
        plot.skipped = ("The selected runs hold a single poison ratio per setting, so there is "
                        "no trend against the ratio to draw.")
        return plot
    panels = []  # (family, attack)
    for family in families.values():
        attacks = list(dict.fromkeys(a for t in family for a in t.attacks))
        panels += [(family, attack) for attack in attacks]
    figure = new_figure(4.4 * len(panels), 6.4)
    axes = _grid(figure, 2, len(panels))
    legend: list[str] = []
    for p_index, (family, attack) in enumerate(panels):
        ratios = sorted({t.setting["poison_ratio"] for t in family})
        names = list(dict.fromkeys(c.name for t in family for c in t.columns))
        for row, (metric, label) in enumerate((("asr", "ASR (%)"), ("acc", "clean ACC (%)"))):
            ax = axes[row][p_index]
            for name in names:
                xs, means, errors = [], [], []
                for table in sorted(family, key=lambda t: t.setting["poison_ratio"]):
                    for i, column in enumerate(table.columns):
                        if column.name != name:
                            continue
                        values = _values(table.runs.get((attack, i), []), column.protocol,
                                         metric)
                        if values:
                            mean, std = _mean_std(values)
                            xs.append(100 * table.setting["poison_ratio"])
                            means.append(mean)
                            errors.append(std)
                if xs:
                    ax.errorbar(xs, means, yerr=errors, color=colors[name], marker="o",
                                capsize=3, linewidth=1.6, markersize=5)
                    if name not in legend:
                        legend.append(name)
            positive = [100 * r for r in ratios if r > 0]
            if len(positive) == len(ratios) and max(positive) / min(positive) >= 5:
                ax.set_xscale("log")
            ax.set_xticks([100 * r for r in ratios], [f"{100 * r:g}%" for r in ratios])
            ax.minorticks_off()
            ax.set_xlabel("poison ratio")
            ax.set_ylabel(label)
            if metric == "asr":
                ax.set_ylim(-4, 104)
                first = family[0].setting
                where = (f" · {first['dataset']}, {first['model']}/{first['width']}, "
                         f"{first['epochs']} epochs" if len(families) > 1 else "")
                ax.set_title(_wrap(f"{_attack_label(family, attack)}{where}", 50), fontsize=10)
            ax.grid(alpha=0.3)
    if len(families) == 1:
        first = next(iter(families.values()))[0]
        figure.suptitle(setting_text(first.setting, ratio=False), fontsize=11)
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], color=colors[n], marker="o", linewidth=1.6) for n in legend]
    _legend(figure, handles, [_wrap(n, 50) for n in legend])
    plot.figure = figure
    return plot


# -- figures, files and the page -------------------------------------------------------------------

def report_plots(tables: list[Table]) -> list[Plot]:
    """The report's four plots of ``tables`` (each drawn, or skipped with its reason)."""
    new_figure = _figure_class()
    names, colors, markers = _short_names(tables), _colors(tables), _markers(tables)
    return [_acc_asr_plot(tables, names, colors, markers, new_figure),
            _training_plot(tables, names, colors, new_figure),
            _protocol_plot(tables, names, new_figure),
            _ratio_plot(tables, colors, new_figure)]


def plot_files(store: ResultStore, runs: list[StoredRun] | None, folder, *,
               split: str = "test", tuning_attacks=(), protocol: str | None = None) -> list[Path]:
    """Write the report's plots as PNG files in ``folder`` (``acc_vs_asr.png``,
    ``training_curves.png``, ``protocol_gap.png``, ``poison_ratio.png``; a plot without data is
    not written) and return their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tables = source_tables(store, runs, split=split, tuning_attacks=tuning_attacks,
                           protocol=protocol)
    paths = []
    for plot in report_plots(tables):
        if plot.figure is not None:
            path = folder / f"{plot.name}.png"
            path.write_bytes(plot.png())
            paths.append(path)
    return paths


CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: #1d1d1f; background: #fafafa; margin: 0; }
main { max-width: 1320px; margin: 0 auto; padding: 24px 32px 64px; background: #fff; }
h1 { font-size: 26px; margin: 0 0 12px; }
h2 { font-size: 20px; margin: 36px 0 10px; border-bottom: 2px solid #e3e3e3; padding-bottom: 4px; }
h3 { font-size: 16px; margin: 26px 0 6px; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 4px 16px; margin: 0;
          font-size: 14px; }
dl.meta dt { font-weight: 600; color: #555; }
dl.meta dd { margin: 0; }
code, pre { font: 13px/1.4 ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; }
pre.command { background: #f3f3f5; padding: 6px 10px; border-radius: 4px; margin: 0;
              white-space: pre-wrap; word-break: break-all; }
p.legend { font-size: 13.5px; color: #444; max-width: 1100px; }
nav { font-size: 14px; margin: 14px 0 0; }
nav a { margin-right: 14px; }
div.scroll { overflow-x: auto; max-width: 100%; }
table.results { border-collapse: collapse; margin: 6px 0 4px; font-size: 14px; }
table.results caption { caption-side: top; text-align: left; font-size: 14px; padding: 0 0 6px;
                        max-width: 1100px; }
table.results th, table.results td { padding: 4px 12px; border-bottom: 1px solid #e6e6e6; }
table.results thead th { background: #f1f3f6; border-bottom: 2px solid #9aa3ad;
                         vertical-align: bottom; text-align: center; max-width: 24em;
                         font-weight: 600; }
table.results th.attack { text-align: left; vertical-align: top; background: #fff;
                          border-bottom: 2px solid #cfd4da; white-space: nowrap; }
table.results tbody tr:last-child td { border-bottom: 2px solid #cfd4da; }
table.results td.metric { color: #555; font-weight: 600; }
table.results td.num { text-align: right; font-variant-numeric: tabular-nums;
                       white-space: nowrap; }
table.results td.best { background: #eaf5ea; }
table.results td.none { color: #999; text-align: center; }
span.protocol { display: block; font-weight: 400; color: #7a4b00; font-size: 12.5px; }
span.n { color: #777; font-size: 12px; }
ul.notes { list-style: none; padding: 0; margin: 4px 0 0; font-size: 13px; color: #444;
           max-width: 1100px; }
figure { margin: 18px 0 28px; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 13.5px; color: #444; max-width: 1100px; margin-top: 4px; }
p.skipped { color: #8a5a00; background: #fff8e6; border-left: 4px solid #e0b04a;
            padding: 6px 10px; max-width: 1100px; }
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def table_html(table: Table, number: int) -> str:
    """One table as HTML: the same cell texts as the Markdown, bold best cells, dagger marks."""
    head = ["<th>Attack</th>", "<th>Metric</th>"]
    for column in table.columns:
        protocol = (f'<span class="protocol">[{_e(column.protocol)}]{PROTOCOL_MARK}</span>'
                    if column.batch_dependent else "")
        head.append(f"<th>{_e(column.name)}{protocol}</th>")
    parts = [f'<div class="scroll"><table class="results" id="table-{number}">',
             f"<caption><b>Table {number}.</b> {_e(table.caption)}.</caption>",
             "<thead><tr>" + "".join(head) + "</tr></thead>"]
    rows_of: dict[str, list] = {}
    for row in table.rows:
        rows_of.setdefault(row.attack, []).append(row)
    for attack, rows in rows_of.items():
        parts.append("<tbody>")
        for position, row in enumerate(rows):
            cells = []
            if position == 0:
                cells.append(f'<th class="attack" rowspan="{len(rows)}">'
                             f"{_e(row.attack_label)}</th>")
            cells.append(f'<td class="metric">{_e(row.metric)}</td>')
            for index in range(len(table.columns)):
                number_text, bold, note = table.cell_parts(row, index)
                if number_text == "-":
                    cells.append('<td class="num none">-</td>')
                    continue
                shown = f"<strong>{_e(number_text)}</strong>" if bold else _e(number_text)
                if note:
                    shown += f' <span class="n">{_e(note)}</span>'
                cells.append(f'<td class="num{" best" if bold else ""}">{shown}</td>')
            parts.append("<tr>" + "".join(cells) + "</tr>")
        parts.append("</tbody>")
    parts.append("</table></div>")  # a wide comparison scrolls inside the page, not past it
    if table.footnotes:
        parts.append('<ul class="notes">' + "".join(f"<li>{_e(n)}</li>" for n in table.footnotes)
                     + "</ul>")
    return "\n".join(parts)


def cost_html(rows: list[CostRow]) -> str:
    """The compute table (:mod:`eigenguard.report_cost`) as HTML."""
    head = "".join(f"<th>{_e(name)}</th>" for name in COST_COLUMNS)
    body = "".join("<tr>" + "".join(f'<td{"" if i == 0 else " class=num"}>{_e(cell)}</td>'
                                    for i, cell in enumerate(cost_cells(row))) + "</tr>"
                   for row in rows)
    return (f'<h3 id="compute">Compute</h3><table class="results compute"><caption>{_e(total_text(rows))}'
            "; wall time per run on the machine that ran it (a post-training defense counts its "
            f"repair only).</caption><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def detection_html(rows: list[DetectionRow]) -> str:
    """The detection table (:mod:`eigenguard.report_detection`) as HTML ("" when empty)."""
    if not rows:
        return ""
    head = "".join(f"<th>{_e(name)}</th>" for name in DETECTION_COLUMNS)
    body = "".join("<tr>" + "".join(f'<td{" class=num" if i in (1, 3, 4, 5, 6) else ""}>'
                                    f"{_e(cell)}</td>"
                                    for i, cell in enumerate(detection_cells(row))) + "</tr>"
                   for row in rows)
    return (f'<h3 id="detection">Detection</h3><table class="results compute"><caption>'
            f"{_e(DETECTION_NOTE)}</caption><thead><tr>{head}</tr></thead><tbody>{body}</tbody>"
            "</table>")


def _commits(runs: list[StoredRun]) -> str:
    counts: dict[str, int] = {}
    for run in runs:
        counts[_short_commit(run.git_commit)] = counts.get(_short_commit(run.git_commit), 0) + 1
    if not counts:
        return "-"
    return ", ".join(f"<code>{_e(c if c != '-' else 'unknown')}</code> ({n} run{'s' * (n != 1)})"
                     for c, n in counts.items())


SPLIT_TEXT = {"test": "test (the held-out split results are reported on)",
              "validation": "validation (the tuning split: not results to report)"}


def write_html_report(store: ResultStore, runs: list[StoredRun] | None, path, *, title: str,
                      command=None, split: str = "test", tuning_attacks=(),
                      protocol: str | None = None) -> Path:
    """Write the report of the finished runs among ``runs`` (all finished runs when None) as one
    self-contained HTML file at ``path``; returns the path. ``command``: the command line that
    made the report (text or a list of arguments), shown on the page."""
    path = Path(path)
    tables = source_tables(store, runs, split=split, tuning_attacks=tuning_attacks,
                           protocol=protocol)
    finished = _finished_runs(store, runs)
    plots = report_plots(tables)
    costs = cost_rows(store, runs)
    if command is None:
        command_html = "<dd>not recorded</dd>"
    else:
        text = command if isinstance(command, str) else shlex.join(map(str, command))
        command_html = f'<dd><pre class="command">{_e(text)}</pre></dd>'
    settings = len(tables)
    seeds = sorted({str(run.config.get("seed")) for run in finished})
    body = [f"<h1>{_e(title)}</h1>",
            '<dl class="meta">',
            f"<dt>Command</dt>{command_html}",
            f"<dt>Split</dt><dd>{_e(SPLIT_TEXT.get(split, split))}</dd>",
            f"<dt>Runs</dt><dd>{len(finished)} finished run{'s' * (len(finished) != 1)}, "
            f"{settings} setting{'s' * (settings != 1)}, seeds {_e(', '.join(seeds) or '-')}</dd>",
            f"<dt>Git commits</dt><dd>{_commits(finished)}</dd>",
            f"<dt>Compute</dt><dd><a href=\"#compute\">{_e(total_text(costs))}</a></dd>",
            f"<dt>Results</dt><dd><code>{_e(store.description)}</code></dd>",
            f"<dt>Generated</dt><dd>{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC</dd>",
            "</dl>",
            '<nav><a href="#tables">Tables</a>'
            + "".join(f'<a href="#{p.name}">{_e(p.title)}</a>' for p in plots) + "</nav>",
            '<h2 id="tables">Results</h2>']
    if tables:
        body.append(f'<p class="legend">{_e(LEGEND)}</p>')
        body += [table_html(table, number) for number, table in enumerate(tables, 1)]
    else:
        body.append('<p class="skipped">No finished run among the selected runs.</p>')
    body.append(detection_html(detection_rows(store, runs)))
    body.append(cost_html(costs))
    body.append("<h2>Plots</h2>")
    for plot in plots:
        body.append(f'<h3 id="{plot.name}">{_e(plot.title)}</h3>')
        if plot.figure is None:
            body.append(f'<p class="skipped">{_e(plot.skipped)}</p>')
            continue
        encoded = base64.b64encode(plot.png()).decode("ascii")
        body.append(f'<figure><img alt="{_e(plot.title)}" src="data:image/png;base64,{encoded}">'
                    f"<figcaption>{_e(plot.description)}</figcaption></figure>")
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{_e(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
            + "\n".join(body) + "\n</main>\n</body>\n</html>\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
