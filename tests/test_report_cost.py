"""The compute table of the report: wall time per defense, from the runs' recorded seconds (the
median, so a run slowed by other work on the machine does not set the typical cost)."""
from eigenguard.report_cost import cost_rows, duration, format_cost_markdown, total_text
from eigenguard.store import ResultStore

from test_report_tables import EG, add_run


def test_cost_rows_are_per_defense_with_mean_range_and_total(tmp_path):
    store = ResultStore(tmp_path / "s.sqlite")
    for seed, seconds in enumerate((150.0, 400.0, 160.0)):  # one run slowed by other work
        add_run(store, f"n{seed}", seed=seed, wall_seconds=seconds)
    add_run(store, "g0", defense="eigenguard", wall_seconds=4000.0)
    none, guarded = cost_rows(store, None)
    assert (none.defense, none.runs, none.median_seconds) == ("none", 3, 160.0)
    assert (none.min_seconds, none.max_seconds, none.total_seconds) == (150.0, 400.0, 710.0)
    assert (guarded.defense, guarded.runs, guarded.total_seconds) == (EG, 1, 4000.0)
    assert total_text([none, guarded]) == "1 h 18 min of compute over 4 runs"
    text = format_cost_markdown([none, guarded])
    assert "| none | 3 | 2 min 40 s | 2 min 30 s – 6 min 40 s | 11 min 50 s |" in text
    assert f"| {EG} | 1 | 1 h 07 min |" in text


def test_durations_read_at_a_glance():
    assert [duration(s) for s in (7, 60, 95, 3599, 3600, 4000, 90000)] == [
        "7 s", "1 min 00 s", "1 min 35 s", "59 min 59 s", "1 h 00 min", "1 h 07 min",
        "25 h 00 min"]
    assert format_cost_markdown([]).startswith("**Compute.** No finished run")
