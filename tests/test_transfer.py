"""Results as text: export to JSON Lines, import back, conflicts, refusals, reports from files."""
import dataclasses
import io
import json

import pytest
import torch

import eigenguard
from eigenguard.errors import EigenGuardError
from eigenguard.store import SCHEMA_VERSION, ResultStore, StoredRun
from eigenguard.transfer import export_runs, import_runs, open_results

COMPARED = [f.name for f in dataclasses.fields(StoredRun)
            if f.name not in ("checkpoint", "attack_state")]


def metric(protocol, name, value, split="test", seed=0):
    return dict(split=split, protocol=protocol, metric=name, value=value, eval_seed=seed)


def finished(store, key, config=None, metrics=None, **extra):
    claim = store.claim(key, "setup-" + key[:2], config or {"seed": 1, "lr": 0.1},
                        {"torch": "2.3.0", "python": "3.11"}, "deadbeef", "cpu")
    assert claim.state == "claimed"
    store.update_history(key, claim.token, [{"epoch": 1, "loss": 0.1 + 0.2}])
    store.complete(key, claim.token, status=extra.pop("status", "finished"),
                   history=[{"epoch": 1, "loss": 0.1 + 0.2}, {"epoch": 2, "loss": 1 / 3}],
                   metrics=metrics if metrics is not None else [
                       metric("mixed", "acc", 0.9123456789012345),
                       metric("mixed", "asr", 1 / 7, seed=3),
                       metric("triggered", "asr", 2 / 3, split="validation")],
                   wall_seconds=12.345678901234567, checkpoint=f"checkpoints/{key}.safetensors",
                   attack_state=None, extra={"flipped_labels": 7, "note": "ünï"}, **extra)
    return store.get_run(key)


def failed(store, key, config=None):
    claim = store.claim(key, "setup-" + key[:2], config or {"seed": 1, "lr": 0.1}, {}, None,
                        "cpu")
    store.fail(key, claim.token, "CUDA out of memory", history=[{"epoch": 1}])
    return store.get_run(key)


def snapshot(store):
    """Every run (its compared fields) and every metric row of a store."""
    return ({run.key: {name: getattr(run, name) for name in COMPARED}
             for run in store.find_runs()}, store.metrics())


@pytest.fixture
def source(tmp_path):
    store = ResultStore(tmp_path / "source" / "r.sqlite")
    finished(store, "aaa1")
    finished(store, "bbb2", config={"seed": 2, "lr": 0.05},
             metrics=[metric("mixed", "asr", 0.0), metric("detection", "auc", 1e-300)])
    failed(store, "ccc3")
    finished(store, "ddd4", status="evaluation-failed", error="evaluator crashed")
    store.claim("eee5", "setup-ee", {"seed": 5}, {}, None, "cpu")  # still running
    return store


def test_export_then_import_round_trips_every_field_and_metric(source, tmp_path):
    path = tmp_path / "results.jsonl"
    assert export_runs(source, path) == 4  # the running run is not exported
    target = ResultStore(tmp_path / "target.sqlite")
    summary = import_runs(target, path)
    assert (summary.added, summary.replaced, summary.unchanged, summary.kept) == (4, 0, 0, 0)
    assert summary.messages == []
    runs, metrics = snapshot(source)
    del runs["eee5"]
    assert snapshot(target) == (runs, metrics)  # metrics of the running run: none
    run = target.get_run("aaa1")
    assert run.checkpoint is None and run.attack_state is None  # files are not exported
    assert run.history[1]["loss"] == 1 / 3 and run.wall_seconds == 12.345678901234567
    assert run.extra == {"flipped_labels": 7, "note": "ünï"}
    assert run.versions == {"torch": "2.3.0", "python": "3.11"} and run.git_commit == "deadbeef"
    assert target.get_run("bbb2").config == {"seed": 2, "lr": 0.05}
    assert [m["value"] for m in target.metrics("bbb2")] == [1e-300, 0.0]
    assert [(m["protocol"], m["value"]) for m in target.metrics("aaa1")] == [
        ("mixed", 0.9123456789012345), ("mixed", 1 / 7), ("triggered", 2 / 3)]
    assert target.get_run("ccc3").status == "failed"
    assert target.get_run("ccc3").error == "CUDA out of memory"
    assert target.get_run("ddd4").error == "evaluator crashed"
    assert target.get_run("eee5") is None


def test_the_file_is_a_header_then_one_sorted_line_per_run(source, tmp_path):
    stream = io.StringIO()
    assert export_runs(source, stream) == 4
    lines = stream.getvalue().splitlines()
    assert json.loads(lines[0]) == {"format": "eigenguard-results", "version": 1,
                                    "eigenguard": eigenguard.__version__,
                                    "schema": SCHEMA_VERSION}
    assert lines[0] == ('{"eigenguard":"%s","format":"eigenguard-results","schema":%d,'
                        '"version":1}' % (eigenguard.__version__, SCHEMA_VERSION))
    records = [json.loads(line) for line in lines[1:]]
    assert [r["key"] for r in records] == ["aaa1", "bbb2", "ccc3", "ddd4"]
    first = records[0]
    assert sorted(first) == sorted(["key", "setup_key", "config", "status", "started",
                                    "finished", "heartbeat", "host", "pid", "wall_seconds",
                                    "history", "versions", "git_commit", "device", "error",
                                    "extra", "metrics"])
    assert first["config"] == {"seed": 1, "lr": 0.1}  # an object, not a string
    assert first["setup_key"] == "setup-aa" and first["pid"] is None
    assert [(m["split"], m["protocol"], m["metric"], m["eval_seed"]) for m in first["metrics"]] \
        == [("test", "mixed", "acc", 0), ("test", "mixed", "asr", 3),
            ("validation", "triggered", "asr", 0)]
    assert sorted(first["metrics"][0]) == ["created", "eval_seed", "metric", "protocol",
                                           "split", "value"]
    assert ", " not in lines[1] and '": ' not in lines[1]  # compact separators


def test_export_twice_gives_identical_bytes_and_replaces_the_file(source, tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    export_runs(source, first)
    export_runs(source, second)
    assert first.read_bytes() == second.read_bytes()
    second.write_text("stale\n")
    export_runs(source, second)  # overwritten whole
    assert first.read_bytes() == second.read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left
    assert export_runs(source, tmp_path / "one.jsonl", runs=[source.get_run("bbb2")]) == 1
    assert len((tmp_path / "one.jsonl").read_text().splitlines()) == 2


def test_importing_the_same_file_twice_changes_nothing_the_second_time(source, tmp_path):
    path = tmp_path / "results.jsonl"
    export_runs(source, path)
    target = ResultStore(tmp_path / "target.sqlite")
    import_runs(target, path)
    before = snapshot(target)
    summary = import_runs(target, [path])
    assert (summary.added, summary.replaced, summary.unchanged, summary.kept) == (0, 0, 4, 0)
    assert summary.describe() == "0 added, 0 replaced, 4 unchanged, 0 kept as stored (conflicts)"
    assert snapshot(target) == before
    summary = import_runs(source, path)  # into the store it came from
    assert (summary.added, summary.unchanged) == (0, 4)
    assert source.get_run("aaa1").checkpoint == "checkpoints/aaa1.safetensors"  # untouched


def test_a_conflicting_run_is_kept_unless_replace(tmp_path):
    theirs = ResultStore(tmp_path / "theirs.sqlite")
    finished(theirs, "aaa1", metrics=[metric("mixed", "asr", 0.75)])
    finished(theirs, "fff6", metrics=[metric("mixed", "asr", 0.5)])
    path = tmp_path / "theirs.jsonl"
    export_runs(theirs, path)
    ours = ResultStore(tmp_path / "ours.sqlite")
    checkpoint = ours.write_tensors("aaa1.safetensors", {"w": torch.ones(2)})
    finished(ours, "aaa1", metrics=[metric("mixed", "asr", 0.25)])
    assert ours.get_run("aaa1").checkpoint == checkpoint

    summary = import_runs(ours, path)
    assert (summary.added, summary.replaced, summary.unchanged, summary.kept) == (1, 0, 0, 1)
    assert [m["value"] for m in ours.metrics("aaa1")] == [0.25]
    assert ours.get_run("aaa1").checkpoint == checkpoint
    assert (tmp_path / checkpoint).is_file()
    assert len(summary.messages) == 1
    assert "aaa1" in summary.messages[0] and str(path) in summary.messages[0]
    assert "replace=True" in summary.messages[0]

    summary = import_runs(ours, path, replace=True)
    assert (summary.added, summary.replaced, summary.unchanged, summary.kept) == (0, 1, 1, 0)
    assert [m["value"] for m in ours.metrics("aaa1")] == [0.75]
    assert ours.get_run("aaa1").checkpoint is None
    assert not (tmp_path / checkpoint).exists()  # the replaced run's files go with it


def test_a_failed_stored_run_is_replaced_by_an_incoming_finished_one(tmp_path):
    theirs = ResultStore(tmp_path / "theirs.sqlite")
    finished(theirs, "aaa1", metrics=[metric("mixed", "asr", 0.125)])
    finished(theirs, "bbb2", metrics=[metric("mixed", "asr", 0.5)])
    path = tmp_path / "theirs.jsonl"
    export_runs(theirs, path)
    ours = ResultStore(tmp_path / "ours.sqlite")
    failed(ours, "aaa1")
    finished(ours, "bbb2", status="evaluation-failed", metrics=[])
    summary = import_runs(ours, path)
    assert (summary.added, summary.replaced, summary.unchanged, summary.kept) == (0, 2, 0, 0)
    assert ours.get_run("aaa1").status == "finished" and ours.get_run("aaa1").error is None
    assert [m["value"] for m in ours.metrics("aaa1")] == [0.125]
    assert ours.get_run("bbb2").status == "finished"
    assert summary.messages[0].startswith(f"{path}: run aaa1 replaced the stored one "
                                          "(failed there, finished here)")

    # but an incoming failed run does not replace a stored finished one
    failing = ResultStore(tmp_path / "failing.sqlite")
    failed(failing, "aaa1")
    export_runs(failing, tmp_path / "failing.jsonl")
    summary = import_runs(ours, tmp_path / "failing.jsonl")
    assert (summary.kept, summary.replaced) == (1, 0)
    assert ours.get_run("aaa1").status == "finished"


def test_running_runs_are_not_exported(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    store.claim("run1", "s", {"seed": 1}, {}, None, "cpu")
    finished(store, "zzz9")
    path = tmp_path / "results.jsonl"
    assert export_runs(store, path) == 1
    assert export_runs(store, tmp_path / "x.jsonl", runs=[store.get_run("run1")]) == 0
    keys = [json.loads(line)["key"] for line in path.read_text().splitlines()[1:]]
    assert keys == ["zzz9"]


def write_lines(path, *records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                            for r in records))
    return path


def test_another_version_is_refused_naming_it_and_the_file(source, tmp_path):
    target = ResultStore(tmp_path / "target.sqlite")
    finished(target, "zzz9")
    before = snapshot(target)
    path = tmp_path / "results.jsonl"
    export_runs(source, path)
    lines = path.read_text().splitlines()
    header = json.loads(lines[0]) | {"version": 2}
    newer = write_lines(tmp_path / "newer.jsonl", header, *lines[1:])
    with pytest.raises(EigenGuardError) as refused:
        import_runs(target, [path, newer])  # the good first file is not imported either
    message = str(refused.value)
    assert str(newer) in message and "version 2" in message and "reads version 1" in message
    assert "export it again" in message
    assert snapshot(target) == before


@pytest.mark.parametrize("content, expected", [
    (None, "no results file at"),
    ("", "is empty"),
    ('{"key": "aaa1"}\n', "does not start with an eigenguard-results header"),
    ("not json\n", "does not start with an eigenguard-results header"),
    ('{"format": "other-results", "version": 1}\n', "'other-results' file"),
])
def test_files_that_are_not_results_are_refused(tmp_path, content, expected):
    path = tmp_path / "results.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(EigenGuardError, match=expected) as refused:
        import_runs(ResultStore(tmp_path / "t.sqlite"), path)
    assert str(path) in str(refused.value)


def test_a_corrupt_line_is_refused_by_number_and_nothing_is_imported(source, tmp_path):
    path = tmp_path / "results.jsonl"
    export_runs(source, path)
    lines = path.read_text().splitlines()
    assert len(lines) == 5
    target = ResultStore(tmp_path / "target.sqlite")
    corrupt = write_lines(tmp_path / "corrupt.jsonl", *lines[:3], lines[3][:40], lines[4])
    with pytest.raises(EigenGuardError) as refused:
        import_runs(target, corrupt)
    assert f"{corrupt}, line 4: not valid JSON" in str(refused.value)
    assert target.find_runs() == [] and target.metrics() == []

    record = json.loads(lines[2])
    del record["status"]
    lacking = write_lines(tmp_path / "lacking.jsonl", *lines[:2], record)
    with pytest.raises(EigenGuardError, match=r"lacking.jsonl, line 3: the run lacks status"):
        import_runs(target, lacking)
    record = json.loads(lines[1])
    record["metrics"][0]["value"] = "high"
    typed = write_lines(tmp_path / "typed.jsonl", lines[0], record)
    with pytest.raises(EigenGuardError, match=r"line 2: metric row 1: value must be a number"):
        import_runs(target, typed)
    twice = write_lines(tmp_path / "twice.jsonl", lines[0], lines[1], lines[1])
    with pytest.raises(EigenGuardError, match=r"line 3: run aaa1 is already on line 2"):
        import_runs(target, twice)
    assert target.find_runs() == [] and target.metrics() == []


def test_open_results_reports_from_a_jsonl_file_or_a_folder_of_them(source, tmp_path):
    folder = tmp_path / "committed"
    export_runs(source, folder / "part1.jsonl", runs=[source.get_run("aaa1")])
    export_runs(source, folder / "part2.jsonl", runs=[source.get_run("bbb2")])
    store = open_results(folder / "part1.jsonl")
    assert [run.key for run in store.find_runs()] == ["aaa1"]
    assert [m["value"] for m in store.metrics("aaa1")] == [0.9123456789012345, 1 / 7, 2 / 3]
    assert store.path.parent != source.path.parent and store.path.is_file()
    both = open_results(folder)
    assert sorted(run.key for run in both.find_runs()) == ["aaa1", "bbb2"]
    assert both.evaluations("bbb2")[0]["asr"] == 0.0
    # reports name the files they read, not the temporary store they were imported into
    assert both.description == f"{folder} (JSON Lines: part1.jsonl, part2.jsonl)"
    assert open_results(source.path).path == source.path  # a store opens as itself
    assert open_results(source.path).description == str(source.path)
    with pytest.raises(EigenGuardError, match="no result store at"):
        open_results(tmp_path / "missing.sqlite")
    with pytest.raises(EigenGuardError, match="no results file at"):
        open_results(tmp_path / "missing.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EigenGuardError, match="without \\*.jsonl"):
        open_results(tmp_path / "empty")
