"""Grids and sweeps: a grid file becomes validated configs; a sweep runs what the store lacks,
survives a kill, records failures and goes on."""
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eigenguard.cli import main
from eigenguard.grid import GridError, grid_from_dict, load_grid, parse_only
from eigenguard.store import ResultStore
from eigenguard.sweep import dry_run_lines, plan, sweep

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "benchmarks" / "grids" / "tiny.yaml"
CLI = [sys.executable, "-m", "eigenguard.cli"]


def tiny(**changes):
    """The tests' grid as data, with changes."""
    import yaml
    data = yaml.safe_load(TINY.read_text())
    data.update(changes)
    return grid_from_dict(data, "tiny")


def started_by_key(store):
    return {run.key: (run.started, run.wall_seconds) for run in store.find_runs()}


def test_a_grid_is_the_product_of_its_axes_plus_extra_rows():
    grid = grid_from_dict({
        "setup": {"model": "small_cnn", "width": 8, "train": {"epochs": 2}},
        "attacks": ["badnets", {"name": "blended", "settings": {"alpha": 0.1}}],
        "defenses": ["none", {"name": "eigenguard", "settings": {"k": 4, "after": "block1"}}],
        "poison_ratios": [0.01, 0.1], "seeds": [0, 1, 2],
        "extra": [{"defense": "eigenguard", "defense_settings": {"k": 2, "after": "block1"}},
                  {"attack": "badnets", "defense": "none", "poison_ratio": 0.01, "seed": 0}]})
    assert len(grid) == 2 * 2 * 2 * 3 + 1  # the second extra row repeats an axis row: once
    assert grid.sizes == {"attacks": 2, "defenses": 2, "poison_ratios": 2, "seeds": 3}
    blended = [c for c in grid.configs if c.attack == "blended"]
    assert len(blended) == 12 and all(dict(c.attack_settings) == {"alpha": 0.1} for c in blended)
    assert all(c.train.epochs == 2 and c.width == 8 for c in grid.configs)
    extra = grid.configs[-1]  # over the first value of each axis
    assert (extra.attack, extra.attack_settings, extra.poison_ratio, extra.seed) == \
        ("badnets", (), 0.01, 0)
    assert dict(extra.defense_settings) == {"k": 2, "after": "block1"}


def test_a_planned_run_names_the_attack_settings_the_grid_sets():
    from eigenguard.sweep import PlannedRun
    grid = grid_from_dict({
        "setup": {"model": "small_cnn", "width": 8},
        "attacks": ["wanet", {"name": "wanet", "settings": {"s": 1.0}}],
        "defenses": ["none"], "poison_ratios": [0.1], "seeds": [0]})
    names = [PlannedRun(c, "k", "s", "pending").describe().split()[7] for c in grid.configs]
    assert names == ["wanet", "wanet(s=1.0)"]


def test_blocks_add_products_that_inherit_the_axes_they_do_not_name():
    grid = grid_from_dict({
        "setup": {"model": "small_cnn", "width": 8},
        "attacks": ["badnets", "blended"], "defenses": ["none"], "seeds": [0, 1],
        "blocks": [{"defenses": ["ft", "ss"], "seeds": [0]},
                   {"attacks": ["sig"], "defenses": ["none", "ft"]}]})
    # 2 x 1 x 2 axis runs; block 1: 2 attacks x 2 defenses x 1 seed; block 2: 1 x 2 x 2 seeds
    assert len(grid) == 4 + 4 + 4
    assert {(c.attack, c.defense, c.seed) for c in grid.configs[4:8]} == {
        (a, d, 0) for a in ("badnets", "blended") for d in ("ft", "ss")}
    assert {(c.attack, c.defense) for c in grid.configs[8:]} == {("sig", "none"), ("sig", "ft")}
    assert all(c.width == 8 for c in grid.configs)


def test_only_keeps_a_slice_of_a_grid_and_names_what_exists():
    grid = grid_from_dict({
        "setup": {"model": "small_cnn", "width": 8},
        "attacks": ["badnets", "blended", "sig"], "defenses": ["none", "ft", "ss"],
        "poison_ratios": [0.01, 0.1], "seeds": [0, 1]})
    assert len(grid) == 36
    part = grid.only(parse_only(["attack=badnets,sig", "seed=0", "poison_ratio=0.1"]))
    assert len(part) == 6
    assert {(c.attack, c.defense) for c in part.configs} == {
        (a, d) for a in ("badnets", "sig") for d in ("none", "ft", "ss")}
    assert all(c.seed == 0 and c.poison_ratio == 0.1 for c in part.configs)
    with pytest.raises(GridError, match="its attack values are badnets, blended, sig"):
        grid.only(parse_only(["attack=wanet"]))
    with pytest.raises(GridError, match="runs have no field 'atack'"):
        grid.only(parse_only(["atack=badnets"]))
    with pytest.raises(GridError, match="FIELD=VALUE"):
        parse_only(["attack"])


@pytest.mark.parametrize("data, message", [
    ({"attacks": ["badnets"], "blocks": [{"defences": ["ft"]}]}, "block 1 must be a mapping"),
    ({"attacks": ["badnets"], "blocks": [{"defenses": ["fx"]}]}, "block 1"),
    ({"attacks": ["badnet"]}, "badnet"),
    ({"attacks": ["badnets"], "defences": ["none"]}, "unknown key(s) ['defences']"),
    ({"attacks": ["badnets"], "defenses": [{"name": "eigenguard", "settings": {"k": 0}}]},
     "k"),
    ({"attacks": ["badnets"], "poison_ratios": [1.5]}, "poison ratio"),
    ({"setup": {"train": {"epoch": 3}}, "attacks": ["badnets"]}, "unknown train setting"),
    ({"attacks": ["badnets"], "protocols": ["running", "mixd"]}, "mixd"),
    ({"attacks": []}, "non-empty list"),
    ({}, "holds no run"),
])
def test_a_bad_grid_fails_before_anything_runs_naming_the_problem(data, message):
    with pytest.raises(GridError) as error:
        grid_from_dict(data, "g.yaml")
    assert message in str(error.value) and "g.yaml" in str(error.value)


def test_a_missing_or_invalid_grid_file_is_named(tmp_path):
    with pytest.raises(GridError, match="no grid file"):
        load_grid(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("attacks: [badnets\n")
    with pytest.raises(GridError, match="not valid YAML"):
        load_grid(bad)


def test_the_ready_grids_parse():
    for path in sorted((ROOT / "benchmarks" / "grids").glob("*.yaml")):
        assert len(load_grid(path)) >= 1, path


def test_a_sweep_runs_what_is_missing_and_a_second_sweep_runs_nothing(tmp_path, synthetic_root):
    store = ResultStore(tmp_path / "r.sqlite")
    grid = tiny(seeds=[0])
    first = sweep(grid, store, data_root=synthetic_root, progress=False, log=lambda *_: None)
    assert (first.total, first.finished, first.stored_before, first.failed) == (4, 4, 0, [])
    before = started_by_key(store)
    lines = []
    second = sweep(grid, store, data_root=synthetic_root, progress=False, log=lines.append)
    assert (second.finished, second.stored_before) == (0, 4)
    assert started_by_key(store) == before
    planned, _ = plan(grid, store, data_root=synthetic_root)
    listing = dry_run_lines(grid, planned)
    assert listing[-1] == "to run: 0; estimated compute: unknown (no run of this kind measured)"
    assert "4 stored" in listing[-2]


def test_a_grid_is_exported_and_reported_from_its_json_lines(tmp_path, synthetic_root, capsys):
    store_path = tmp_path / "r.sqlite"
    common = ["--grid", str(TINY), "--data-root", str(synthetic_root)]
    grid = tiny(seeds=[0])
    sweep(grid, ResultStore(store_path), data_root=synthetic_root, progress=False,
          log=lambda *_: None)
    results = tmp_path / "results" / "tiny.jsonl"
    assert main(["export", str(results), "--store", str(store_path), *common]) == 0
    assert "exported 4 runs" in capsys.readouterr().out  # seed 1 is not stored
    html = tmp_path / "tiny.html"
    assert main(["report", "--store", str(results), *common, "--source-layout",
                 "--html", str(html), "--figures", str(tmp_path / "figures")]) == 0
    out = capsys.readouterr().out
    assert "badnets†" in out and "blended†" not in out and "[running]" in out
    page = html.read_text()
    assert page.count("<img") >= 3 and "badnets" in page
    assert sorted(p.name for p in (tmp_path / "figures").glob("*.png"))[:2] == [
        "acc_vs_asr.png", "protocol_gap.png"]


def test_grid_protocols_limit_the_evaluation(tmp_path, synthetic_root):
    store = ResultStore(tmp_path / "r.sqlite")
    grid = tiny(protocols=["running"], attacks=["badnets"], seeds=[0])
    sweep(grid, store, data_root=synthetic_root, progress=False, log=lambda *_: None)
    protocols = {run.config["defense"]: {m["protocol"] for m in store.metrics(run.key)}
                 for run in store.find_runs()}
    # "none" declares only the triggered protocol: it keeps it
    assert protocols == {"none": {"triggered", "cost"}, "eigenguard": {"running", "cost"}}


def test_a_failed_run_is_recorded_skipped_on_resume_and_retried_on_request(tmp_path,
                                                                           synthetic_root):
    store = ResultStore(tmp_path / "r.sqlite")
    # small_cnn has no stage called layer1: the run fails when the layer is inserted
    grid = tiny(attacks=["badnets"], seeds=[0], defenses=[
        "none", {"name": "eigenguard", "settings": {"k": 8, "after": "layer1"}}])
    first = sweep(grid, store, data_root=synthetic_root, progress=False, log=lambda *_: None)
    assert first.finished == 1 and len(first.failed) == 1
    failed = store.get_run(first.failed[0])
    assert failed.status == "failed" and "no such module" in failed.error
    lines = []
    second = sweep(grid, store, data_root=synthetic_root, progress=False, log=lines.append)
    assert second.skipped == first.failed and second.finished == 0 and second.failed == []
    assert any("--retry-failed" in line for line in lines)
    assert store.get_run(first.failed[0]).started == failed.started
    third = sweep(grid, store, data_root=synthetic_root, progress=False, log=lambda *_: None,
                  retry_failed=True)
    assert third.failed == first.failed  # tried again, failed again, recorded again
    assert store.get_run(first.failed[0]).status == "failed"


def test_a_killed_sweep_resumes_without_losing_or_repeating_a_finished_run(tmp_path,
                                                                           synthetic_root):
    store_path = tmp_path / "r.sqlite"
    store = ResultStore(store_path)
    grid_file = tmp_path / "slow.yaml"
    grid_file.write_text(TINY.read_text().replace("epochs: 1", "epochs: 3")
                         .replace("seeds: [0, 1]", "seeds: [0]"))
    proc = subprocess.Popen(CLI + ["sweep", str(grid_file), "--store", str(store_path),
                                   "--data-root", str(synthetic_root), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        runs = store.find_runs()
        if sum(r.status == "finished" for r in runs) >= 1 and any(
                r.status == "running" for r in runs):
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    runs = store.find_runs()
    finished = {r.key: r.started for r in runs if r.status == "finished"}
    killed = [r for r in runs if r.status == "running"]
    assert len(finished) >= 1 and len(killed) == 1 and killed[0].pid == proc.pid
    assert main(["sweep", str(grid_file), "--store", str(store_path), "--data-root",
                 str(synthetic_root), "--quiet"]) == 0
    after = store.find_runs()
    assert len(after) == 4 and all(r.status == "finished" for r in after)
    assert {r.key: r.started for r in after if r.key in finished} == finished  # not repeated
    assert store.get_run(killed[0].key).pid is None  # the killed one was run again


def test_cli_dry_run_lists_states_and_estimates(tmp_path, synthetic_root, capsys):
    store = str(tmp_path / "r.sqlite")
    common = ["--store", store, "--data-root", str(synthetic_root), "--quiet"]
    grid_file = tmp_path / "g.yaml"
    grid_file.write_text(TINY.read_text().replace("seeds: [0, 1]", "seeds: [0]"))
    assert main(["sweep", str(grid_file), "--dry-run", *common]) == 0
    out = capsys.readouterr().out
    assert "grid tiny: 4 runs" in out and "4 pending" in out and "to run: 4" in out
    assert main(["sweep", str(grid_file), *common]) == 0
    capsys.readouterr()
    grid_file.write_text(TINY.read_text())  # seed 1 added: estimated from seed 0's runs
    assert main(["sweep", str(grid_file), "--dry-run", *common]) == 0
    out = capsys.readouterr().out
    assert "4 stored, 4 pending" in out and "to run: 4; estimated compute: " in out
    assert "unknown" not in out
    # a slice of the grid: seed 1 only, then one defense of it
    assert main(["sweep", str(grid_file), "--dry-run", "--only", "seed=1", *common]) == 0
    assert "grid tiny: 4 runs" in capsys.readouterr().out
    assert main(["sweep", str(grid_file), "--only", "seed=1", "--only", "defense=none",
                 *common]) == 0
    assert "2 to run" in capsys.readouterr().out
    assert main(["sweep", str(grid_file), "--dry-run", *common]) == 0
    assert "6 stored, 2 pending" in capsys.readouterr().out


def test_costs_come_from_runs_of_the_same_kind_else_scale_with_images_and_epochs():
    from eigenguard.experiment import RunConfig
    from eigenguard.store import StoredRun
    from eigenguard.sweep import CostModel
    from eigenguard.train import TrainConfig

    measured = RunConfig(model="small_cnn", width=8, train_size=1000, train=TrainConfig(epochs=2))
    stored = StoredRun("k", "s", measured.resolved(), "finished", "", None, 100.0, [], {}, None,
                       None, None, None, None, {"split_sizes": {"train": 850}})
    costs = CostModel([stored])
    assert costs.estimate(measured.with_defense("eigenguard"), 60000) == 100.0
    bigger = RunConfig(model="small_cnn", width=8, train_size=2000, train=TrainConfig(epochs=4))
    # 100 s / (850 images x 2 epochs), times 4 epochs x 2000 x (1 - 0.1 - 0.05) images
    assert costs.estimate(bigger, 60000) == pytest.approx(100 / 1700 * 4 * 1700)
    assert costs.estimate(RunConfig(model="small_cnn", width=16), 60000) is None
    # a run slowed tenfold (paused, or beside other work) does not set the estimate: the median
    for seconds in (110.0, 120.0, 1000.0):
        costs.add(measured.with_defense("eigenguard"), seconds, 850)
    assert costs.estimate(measured.with_defense("eigenguard"), 60000) == 120.0
