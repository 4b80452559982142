"""The self-contained HTML report: no network references, one PNG per plot, the tables' numbers."""
import base64
import re
from html.parser import HTMLParser

import pytest

pytest.importorskip("matplotlib")

from eigenguard.report_cost import cost_rows, total_text
from eigenguard.report_html import plot_files, write_html_report  # noqa: E402
from eigenguard.report_tables import format_source_markdown, source_tables  # noqa: E402
from eigenguard.store import ResultStore  # noqa: E402
from test_report_tables import add_run  # noqa: E402

PLOTS = ("acc_vs_asr", "training_curves", "protocol_gap", "poison_ratio")


def history(loss0):
    return [dict(epoch=e, loss=loss0 / e, train_acc=0.5 + 0.1 * e, lr=0.01, seconds=1.0)
            for e in range(1, 5)]


def full_store(path):
    """Two attacks, none and EigenGuard, two poison ratios, two seeds, 4-epoch histories."""
    store = ResultStore(path)
    for ratio in (0.01, 0.1):
        for attack in ("badnets", "blended"):
            for seed in (0, 1):
                add_run(store, f"n-{attack}-{ratio}-{seed}", attack=attack, ratio=ratio,
                        seed=seed, history=history(2.0), commit="1234567abcdef",
                        evaluations={"triggered": (0.90 + 0.01 * seed, 0.98, 0.01)})
                add_run(store, f"e-{attack}-{ratio}-{seed}", attack=attack, ratio=ratio,
                        seed=seed, defense="eigenguard", history=history(2.2),
                        commit="89abcde0000-dirty",
                        evaluations={"triggered": (0.88, 0.50, 0.3), "mixed": (0.88, 0.9, 0.1),
                                     "single": (0.80, 1.0, 0.0),
                                     "running": (0.89 - 0.01 * seed, 0.05 + ratio, 0.8)})
    return store


class Cells(HTMLParser):
    """The number cells (td.num) of each results table, row by row, as plain text."""

    def __init__(self):
        super().__init__()
        self.tables, self.row, self.cell, self.active = [], None, None, False

    def handle_starttag(self, tag, attrs):
        classes = dict(attrs).get("class") or ""
        if tag == "table":  # the compute table holds no results
            self.active = "results" in classes and "compute" not in classes
            if self.active:
                self.tables.append([])
        elif tag == "tr" and self.active:
            self.row = []
        elif tag == "td" and "num" in classes and self.row is not None:
            self.cell = ""

    def handle_endtag(self, tag):
        if tag == "td" and self.cell is not None:
            self.row.append(self.cell.strip())
            self.cell = None
        elif tag == "tr" and self.row is not None:
            if self.row:
                self.tables[-1].append(self.row)
            self.row = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data


def markdown_cells(markdown):
    tables, rows = [], None
    for line in markdown.splitlines():
        if line.startswith("| Attack |"):
            rows = []
            tables.append(rows)
        elif line.startswith("|---"):
            continue
        elif line.startswith("| ") and rows is not None:
            cells = [cell.strip().replace("**", "") for cell in line.strip("|").split(" | ")]
            rows.append(cells[2:])
    return tables


def test_the_page_is_self_contained_with_one_png_per_plot(tmp_path):
    store = full_store(tmp_path / "s.sqlite")
    path = write_html_report(store, None, tmp_path / "out" / "report.html", title="My <report>",
                             command=["eigenguard", "report", "--html", "r.html"],
                             tuning_attacks=["badnets"])
    page = path.read_text(encoding="utf-8")
    assert not re.search(r"https?://", page) and "<script" not in page
    assert "<link" not in page and "@import" not in page
    images = re.findall(r'<img [^>]*src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == len(PLOTS) == page.count("<img ")
    for encoded in images:
        png = base64.b64decode(encoded)
        assert png.startswith(b"\x89PNG") and b"http" not in png
    assert "<h1>My &lt;report&gt;</h1>" in page
    assert "eigenguard report --html r.html" in page
    assert "1234567" in page and "89abcde-dirty" in page and "(8 runs)" in page
    assert "test (the held-out split" in page
    assert "badnets†" in page and "tuning attack: used to choose settings" in page
    assert "[running]‡" in page


def test_the_html_tables_hold_the_markdown_numbers(tmp_path):
    store = full_store(tmp_path / "s.sqlite")
    path = write_html_report(store, None, tmp_path / "report.html", title="t")
    parser = Cells()
    parser.feed(path.read_text(encoding="utf-8"))
    expected = markdown_cells(format_source_markdown(source_tables(store, None)))
    assert len(parser.tables) == len(expected) == 2
    assert parser.tables == expected
    assert parser.tables[0][0] == ["90.50 ± 0.71", "88.50 ± 0.71"]  # badnets ACC at 1%
    # DER seed 0: (0.92 - 0.01 + 1) / 2 = 95.5, seed 1: (0.92 - 0.03 + 1) / 2 = 94.5
    assert parser.tables[0][3] == ["-", "95.00 ± 0.71"]
    page = path.read_text(encoding="utf-8")
    assert page.count('class="num best"') == sum(
        cell.bold for table in source_tables(store, None) for row in table.rows
        for cell in row.cells if cell is not None)


def test_plots_without_data_are_skipped_with_a_sentence(tmp_path):
    store = ResultStore(tmp_path / "s.sqlite")
    for seed in (0, 1):
        add_run(store, f"n{seed}", seed=seed, evaluations={"triggered": (0.9, 1.0, 0.0)})
    path = write_html_report(store, None, tmp_path / "report.html", title="t")
    page = path.read_text(encoding="utf-8")
    assert page.count("<img ") == 1  # ACC against ASR only
    assert "recorded no per-epoch history" in page
    assert "no protocol gap to show" in page
    assert "single poison ratio" in page
    assert plot_files(store, None, tmp_path / "png") == [tmp_path / "png" / "acc_vs_asr.png"]


def test_plot_files_writes_every_figure_as_png(tmp_path):
    store = full_store(tmp_path / "s.sqlite")
    paths = plot_files(store, None, tmp_path / "figures")
    assert [p.name for p in paths] == [f"{name}.png" for name in PLOTS]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths)


def test_an_empty_selection_still_writes_a_page(tmp_path):
    store = ResultStore(tmp_path / "s.sqlite")
    page = write_html_report(store, [], tmp_path / "r.html", title="t").read_text()
    assert "No finished run" in page and "<img " not in page


def test_the_page_states_the_compute_per_defense(tmp_path):
    store = full_store(tmp_path / "s.sqlite")
    page = write_html_report(store, None, tmp_path / "report.html", title="t").read_text()
    rows = cost_rows(store, None)
    assert f"{total_text(rows)}</a>" in page and 'id="compute"' in page
    for row in rows:
        assert f"<td>{row.defense}</td><td class=num>{row.runs}</td>" in page


def test_the_page_shows_what_the_detectors_flagged(tmp_path):
    from test_report_detection import add_detector_run

    store = full_store(tmp_path / "s.sqlite")
    page = write_html_report(store, None, tmp_path / "plain.html", title="t").read_text()
    assert 'id="detection"' not in page  # nothing was detected: no empty table
    add_detector_run(store, "ss0", detection=(0.3, 0.02, 300))
    page = write_html_report(store, None, tmp_path / "report.html", title="t").read_text()
    assert 'id="detection"' in page
    assert ("<td>badnets</td><td class=num>10%</td><td>ss</td><td class=num>1</td>"
            "<td class=num>30.0</td><td class=num>2.0</td><td class=num>300</td>") in page


def test_every_defense_of_a_large_comparison_gets_its_own_colour():
    """The comparison grid plots 13 defenses beside the undefended column: no colour repeats
    (tab10 alone would give three pairs of defenses one colour each)."""
    from types import SimpleNamespace

    from eigenguard.report_html import NO_DEFENSE_COLOR, _colors
    from eigenguard.report_tables import NO_DEFENSE

    names = [NO_DEFENSE] + [f"defense-{i}" for i in range(13)]
    table = SimpleNamespace(columns=[SimpleNamespace(name=name) for name in names])
    colors = _colors([table])
    assert colors[NO_DEFENSE] == NO_DEFENSE_COLOR
    assert len(set(colors.values())) == len(names) == 14
