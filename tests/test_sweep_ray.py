"""Sweeps on Ray: each run a task, only the driver writes the store, post-training defenses after
the undefended run of their setup; the same results as the in-process executor."""
import importlib
import logging
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

import extension_examples  # noqa: F401  (registers example-finetune, a post-training defense)
from eigenguard.cli import main
from eigenguard.errors import EigenGuardError
from eigenguard.experiment import execute, record
from eigenguard.grid import grid_from_dict
from eigenguard.store import ResultStore
from eigenguard.sweep import plan, sweep
from eigenguard.sweep_ray import Heartbeats, RayExecutor, schedule
from eigenguard.transfer import export_runs, import_runs

TESTS = Path(__file__).resolve().parent
TINY = TESTS.parent / "benchmarks" / "grids" / "tiny.yaml"
#: lets a fresh Ray worker import the test-only extensions (a cluster would install them)
SHIP_TESTS = {"env_vars": {"PYTHONPATH": str(TESTS)}}


def tiny(**changes):
    data = yaml.safe_load(TINY.read_text())
    data.update(changes)
    return grid_from_dict(data, "tiny")


def quiet(*_):
    pass


def contents(store):
    """Run keys with their status, and every metric row but the cost (wall time) ones."""
    runs = {run.key: run.status for run in store.find_runs()}
    metrics = {(m["run_key"], m["split"], m["protocol"], m["metric"], m["eval_seed"]): m["value"]
               for m in store.metrics() if m["protocol"] != "cost"}
    return runs, metrics


def in_process(grid, store, root):
    """The in-process sweep with one torch thread, as each Ray task has (cpus_per_run=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return sweep(grid, store, data_root=root, progress=False, log=quiet)
    finally:
        torch.set_num_threads(threads)


# -- without Ray, and without a cluster ------------------------------------------------------

def test_without_ray_the_executor_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    monkeypatch.delitem(sys.modules, "eigenguard.sweep_ray")
    module = importlib.import_module("eigenguard.sweep_ray")  # importing needs no Ray
    with pytest.raises(EigenGuardError, match=r"pip install 'eigenguard\[ray\]'"):
        module.RayExecutor()


def test_post_training_runs_wait_for_the_undefended_run_of_their_setup(tmp_path,
                                                                       synthetic_root):
    store = ResultStore(tmp_path / "r.sqlite")
    grid = tiny(seeds=[0], defenses=["none", "eigenguard", "example-finetune"],
                attacks=["badnets", {"name": "blended", "settings": {"alpha": 0.2}}])
    pending, loaded = plan(grid, store, data_root=synthetic_root)
    fingerprints = {name: data.fingerprint for name, data in loaded.items()}
    result = schedule(pending, fingerprints)
    assert {item.config.defense for item in result.train} == {"none", "eigenguard"}
    assert result.reevaluate == [] and result.outside == []
    for key, waiting in result.after.items():  # each post-training run waits for its own setup
        assert [item.config.defense for item in waiting] == ["example-finetune"]
        reference = result.references[key]
        assert reference in result.train  # the grid's own undefended run: trained once
        assert reference.config == waiting[0].config.with_defense("none")
    assert len(result.after) == 2

    # without the undefended runs in the grid, they are added (once per setup), not trained
    # by each defense itself
    grid = tiny(seeds=[0], defenses=["example-finetune", {"name": "example-finetune",
                                                          "settings": {"epochs": 1}}])
    pending, _ = plan(grid, store, data_root=synthetic_root)
    result = schedule(pending, fingerprints)
    assert result.train == [] and len(result.after) == 2 and len(result.outside) == 2
    assert all(len(waiting) == 2 for waiting in result.after.values())
    for key in result.outside:
        added = result.references[key]
        assert added.config.defense == "none" and added.key == key and added.state == "pending"


def test_one_thread_keeps_every_claim_fresh(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    claims = {key: store.claim(key, "setup", {"n": key}, {}, None, "cpu").token
              for key in ("a", "b")}
    before = {key: store.get_run(key).heartbeat for key in claims}
    with Heartbeats(store, every=0.05) as beats:
        for key, token in claims.items():
            beats.add(key, token)
        time.sleep(0.3)
        beats.remove("b")
        after_b = store.get_run("b").heartbeat
        time.sleep(0.3)
    assert all(store.get_run(key).heartbeat > before[key] for key in claims)
    assert store.get_run("a").heartbeat > after_b  # b no longer beaten, a still


def test_the_cli_sweeps_on_a_ray_instance_of_its_own(tmp_path, synthetic_root, capsys):
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()
    grid_file = tmp_path / "g.yaml"
    grid_file.write_text(TINY.read_text().replace("seeds: [0, 1]", "seeds: [0]")
                         .replace("defenses: [none, {name: eigenguard, settings: {k: 8, "
                                  "after: block1}}]", "defenses: [none]"))
    store = tmp_path / "r.sqlite"
    assert main(["sweep", str(grid_file), "--store", str(store), "--data-root",
                 str(synthetic_root), "--device", "cpu", "--quiet", "--executor", "ray",
                 "--cpus-per-run", "1"]) == 0
    assert not ray.is_initialized()  # the local instance it started is stopped
    out = capsys.readouterr().out
    assert "2 to run with the ray executor" in out and "2/2 done; " in out
    assert [run.status for run in ResultStore(store).find_runs()] == ["finished"] * 2


# -- on a local Ray instance -----------------------------------------------------------------

@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR)
    yield ray
    ray.shutdown()


def test_a_ray_sweep_records_what_an_in_process_sweep_does(tmp_path, synthetic_root,
                                                           local_ray):
    grid = tiny()
    reference = ResultStore(tmp_path / "in-process.sqlite")
    assert in_process(grid, reference, synthetic_root).finished == 8
    store = ResultStore(tmp_path / "ray.sqlite")
    lines = []
    summary = sweep(grid, store, executor=RayExecutor(cpus_per_run=1), data_root=synthetic_root,
                    progress=False, log=lines.append)
    assert (summary.total, summary.finished, summary.failed, summary.skipped) == (8, 8, [], [])
    assert summary.seconds > 0
    # the same keys, statuses, metric rows and values, bit for bit: on the CPU a run is a
    # pure function of its config and data at a given thread count
    assert contents(store) == contents(reference)
    runs = store.find_runs()
    assert all(run.versions["threads"] == 1 and run.pid is None for run in runs)
    assert sum("started" in line for line in lines) == 8
    finished = [line for line in lines if " finished in " in line]
    assert len(finished) == 8 and finished[-1].startswith("[sweep] 8/8 done; ")
    assert all("time left about" in line for line in finished)

    started = {run.key: run.started for run in runs}
    again = sweep(grid, store, executor=RayExecutor(), data_root=synthetic_root,
                  progress=False, log=quiet)
    assert (again.finished, again.stored_before, again.failed) == (0, 8, [])
    assert {run.key: run.started for run in store.find_runs()} == started


def test_a_post_training_defense_trains_the_undefended_model_once(tmp_path, synthetic_root,
                                                                  local_ray):
    # the undefended run is not in the grid: the executor adds it, trains it first, records it,
    # and hands its stored checkpoint to the defense
    grid = tiny(seeds=[0], attacks=["badnets"], defenses=["example-finetune"])
    store = ResultStore(tmp_path / "ray.sqlite")
    executor = RayExecutor(cpus_per_run=1, runtime_env=SHIP_TESTS)
    summary = sweep(grid, store, executor=executor, data_root=synthetic_root, progress=False,
                    log=quiet)
    assert (summary.total, summary.finished, summary.failed) == (1, 1, [])
    runs = {run.config["defense"]: run for run in store.find_runs()}
    assert set(runs) == {"none", "example-finetune"}
    undefended, defended = runs["none"], runs["example-finetune"]
    assert undefended.status == defended.status == "finished"
    assert undefended.setup_key == defended.setup_key
    # submitted once each, in order, the defense with the stored model
    assert executor.submissions == [(undefended.key, False), (defended.key, True)]
    assert defended.started >= undefended.finished
    # the defense repaired the very model an in-process sweep trains
    reference = ResultStore(tmp_path / "in-process.sqlite")
    in_process(grid, reference, synthetic_root)
    assert contents(store) == contents(reference)

    # with the undefended run in the store, a second defense starts from it at once
    grid = tiny(seeds=[0], attacks=["badnets"],
                defenses=[{"name": "example-finetune", "settings": {"epochs": 1}}])
    executor = RayExecutor(cpus_per_run=1, runtime_env=SHIP_TESTS)
    summary = sweep(grid, store, executor=executor, data_root=synthetic_root, progress=False,
                    log=quiet)
    assert summary.finished == 1 and [given for _, given in executor.submissions] == [True]
    assert store.get_run(undefended.key).started == undefended.started  # not trained again


def test_an_imported_undefended_run_is_trained_again_for_its_weights(tmp_path, synthetic_root,
                                                                      local_ray):
    # a store rebuilt from an export has the undefended run's metrics but no checkpoint: the
    # executor trains it again (same key) and hands the new weights to the defense
    undefended_only = tiny(seeds=[0], attacks=["badnets"], defenses=["none"])
    source = ResultStore(tmp_path / "source.sqlite")
    in_process(undefended_only, source, synthetic_root)
    export_runs(source, tmp_path / "runs.jsonl")
    # recorded on two threads: the one-CPU executor trains it again on two, as recorded
    text = (tmp_path / "runs.jsonl").read_text()
    recorded = source.find_runs()[0].extra["threads"]
    (tmp_path / "runs.jsonl").write_text(text.replace(f'"threads":{recorded}', '"threads":2'))
    store = ResultStore(tmp_path / "imported.sqlite")
    import_runs(store, [tmp_path / "runs.jsonl"])
    (imported,) = store.find_runs()
    assert imported.checkpoint is None and imported.extra["threads"] == 2
    grid = tiny(seeds=[0], attacks=["badnets"], defenses=["example-finetune"])
    executor = RayExecutor(cpus_per_run=1, runtime_env=SHIP_TESTS)
    summary = sweep(grid, store, executor=executor, data_root=synthetic_root, progress=False,
                    log=quiet)
    assert (summary.finished, summary.failed) == (1, [])
    assert executor.submissions[0] == (imported.key, False)  # trained again, first
    retrained = store.get_run(imported.key)
    assert retrained.status == "finished" and store.resolve(retrained.checkpoint).is_file()
    assert retrained.extra["threads"] == 2  # as recorded; the defense on the executor's one
    (defended,) = [run for run in store.find_runs() if run.key != imported.key]
    assert defended.extra["threads"] == 1
    assert contents(store)[1] == pytest.approx(contents(reference_store(
        grid, tmp_path, synthetic_root))[1], abs=1e-6)


def reference_store(grid, tmp_path, root):
    store = ResultStore(tmp_path / "in-process-reference.sqlite")
    in_process(grid, store, root)
    return store


def test_post_training_runs_wait_for_the_undefended_run_another_process_trains(
        tmp_path, synthetic_root, local_ray):
    grid = tiny(seeds=[0], attacks=["badnets"], defenses=["example-finetune"])
    store = ResultStore(tmp_path / "r.sqlite")
    (defended,), loaded = plan(grid, store, data_root=synthetic_root)
    config = defended.config.with_defense("none")
    fingerprint = loaded[config.dataset].fingerprint
    # this (live) process claims the undefended run, as another sweep would
    claim = store.claim(config.key(fingerprint), config.setup_key(fingerprint),
                        config.resolved(), {}, None, "cpu")
    executor = RayExecutor(runtime_env=SHIP_TESTS, poll_seconds=0.1)
    lines, outcome = [], {}
    driver = threading.Thread(target=lambda: outcome.update(summary=sweep(
        grid, store, executor=executor, data_root=synthetic_root, progress=False,
        log=lines.append)))
    driver.start()
    deadline = time.monotonic() + 60
    while not any("wait for it" in line for line in lines) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any("wait for it" in line for line in lines) and executor.submissions == []
    record(store, execute(config, data_root=synthetic_root, progress=False, log=quiet),
           claim.token)
    driver.join(120)
    assert outcome["summary"].finished == 1
    assert executor.submissions == [(defended.key, True)]  # the other process's model
    assert store.get_run(defended.key).status == "finished"


def test_a_failing_run_is_recorded_and_the_sweep_goes_on(tmp_path, synthetic_root, local_ray):
    store = ResultStore(tmp_path / "r.sqlite")
    # small_cnn has no stage called layer1: that run fails in the worker; and without
    # runtime_env the workers cannot import the module that registers example-finetune
    grid = tiny(attacks=["badnets"], seeds=[0], defenses=[
        "none", {"name": "eigenguard", "settings": {"k": 8, "after": "layer1"}},
        "example-finetune"])
    lines = []
    summary = sweep(grid, store, executor=RayExecutor(), data_root=synthetic_root,
                    progress=False, log=lines.append)
    assert summary.finished == 1 and len(summary.failed) == 2
    errors = {store.get_run(key).config["defense"]: store.get_run(key).error
              for key in summary.failed}
    assert "no such module" in errors["eigenguard"]
    assert errors["example-finetune"].startswith(
        "ModuleNotFoundError: No module named 'extension_examples' (the worker cannot import")
    for key in summary.failed:
        assert store.get_run(key).status == "failed" and store.get_run(key).pid is None
        assert any(line.startswith(f"[sweep] {key[:8]} failed: ") for line in lines)
    again = sweep(grid, store, executor=RayExecutor(), data_root=synthetic_root,
                  progress=False, log=quiet)
    assert sorted(again.skipped) == sorted(summary.failed) and again.finished == 0


def test_an_interrupted_ray_sweep_marks_its_claims_failed(tmp_path, synthetic_root, local_ray):
    store = ResultStore(tmp_path / "r.sqlite")
    grid = tiny(seeds=[0])

    def interrupt_when_two_run(line):
        if "(2 running)" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sweep(grid, store, executor=RayExecutor(), data_root=synthetic_root, progress=False,
              log=interrupt_when_two_run)
    runs = store.find_runs()
    assert len(runs) == 2 and all(run.status == "failed" and run.error == "interrupted"
                                  for run in runs)
    # nothing is left claimed: a sweep retrying the interrupted runs would run all four
    planned, _ = plan(grid, store, data_root=synthetic_root, retry_failed=True)
    assert [item.state for item in planned] == ["pending"] * 4
