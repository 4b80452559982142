"""The detection table of the report: each detecting defense's TPR and FPR per attack and poison
ratio, averaged over seeds, from the rows the harness records."""
import pytest

from eigenguard.report_detection import detection_rows, format_detection_markdown
from eigenguard.store import ResultStore


def add_detector_run(store, key, *, defense="ss", attack="badnets", ratio=0.1, seed=0,
                     detection=None):
    """A finished run; ``detection``: (tpr, fpr, flagged) recorded as the harness does."""
    config = {"dataset": "fashion-mnist", "model": "preact_resnet18", "width": 16,
              "attack": attack, "attack_settings": {}, "poison_ratio": ratio, "seed": seed,
              "target": 0, "train": {"epochs": 4}, "train_size": None, "defense": defense,
              "defense_settings": {}}
    token = store.claim(key, f"{attack}-{ratio}-{seed}", config, {}, None, "cpu").token
    metrics = [dict(split="test", protocol="triggered", metric="acc", value=0.8, eval_seed=0)]
    if detection is not None:
        metrics += [dict(split="train", protocol="detection", metric=name, value=value,
                         eval_seed=0)
                    for name, value in zip(("tpr", "fpr", "flagged"), detection)]
    store.complete(key, token, status="finished", history=[], metrics=metrics,
                   wall_seconds=1.0, checkpoint=None, attack_state=None)


def test_detection_rows_average_seeds_and_skip_runs_that_detect_nothing(tmp_path):
    store = ResultStore(tmp_path / "s.sqlite")
    add_detector_run(store, "n0", defense="none")  # no detection rows: not in the table
    add_detector_run(store, "s0", detection=(0.30, 0.02, 300), seed=0)
    add_detector_run(store, "s1", detection=(0.50, 0.04, 500), seed=1)
    add_detector_run(store, "a0", defense="ac", detection=(0.90, 0.10, 1000))
    add_detector_run(store, "b0", attack="blended", detection=(0.0, 0.0, 0))
    add_detector_run(store, "low", ratio=0.01, detection=(1.0, 0.05, 600))
    rows = detection_rows(store, None)
    assert [(r.attack, r.poison_ratio, r.defense, r.seeds) for r in rows] == [
        ("badnets", 0.01, "ss", 1), ("badnets", 0.1, "ss", 2), ("badnets", 0.1, "ac", 1),
        ("blended", 0.1, "ss", 1)]
    ss = rows[1]
    assert (ss.tpr, ss.fpr, ss.flagged) == (pytest.approx(0.40), pytest.approx(0.03), 400)
    text = format_detection_markdown(rows)
    assert "| badnets | 10% | ss | 2 | 40.0 | 3.0 | 400 |" in text
    assert text.count("\n") == 3 + len(rows)  # note, blank line, header, rule, rows
    assert format_detection_markdown([]) == ""


def test_the_source_layout_report_prints_the_detection_table(tmp_path, capsys):
    from eigenguard.cli import main

    store = ResultStore(tmp_path / "s.sqlite")
    add_detector_run(store, "s0", detection=(0.25, 0.01, 250))
    assert main(["report", "--store", str(store.path), "--source-layout"]) == 0
    out = capsys.readouterr().out
    assert "**Detection.**" in out and "| badnets | 10% | ss | 1 | 25.0 | 1.0 | 250 |" in out
    assert out.index("**Detection.**") < out.index("**Compute.**")
