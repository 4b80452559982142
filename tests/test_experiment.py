"""End to end on a small synthetic data set: splits, keys, the threat model, the store's
guarantees, re-evaluation, and an example of every kind of attack and defense through the CLI."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import extension_examples  # noqa: F401  (registers the example attacks and defenses)
from eigenguard import experiment
from eigenguard.cli import main
from eigenguard.defenses import ThreatModelError, register_defense
from eigenguard.defenses.registry import DEFENSES
from eigenguard.errors import DatasetNotFoundError, EigenGuardError, UnknownNameError
from eigenguard.evaluate import predict
from eigenguard.experiment import RunConfig, execute, run, run_splits
from eigenguard.seeding import generator, stream_seed
from eigenguard.splits import load_data
from eigenguard.store import ResultStore
from eigenguard.train import TrainConfig
from eigenguard.transfer import export_runs, import_runs

# no augmentation: the synthetic classes are stripe orientations, which a flip would swap
FAST = TrainConfig(epochs=4, batch_size=32, lr=0.1, augment=False)
TESTS = Path(__file__).resolve().parent


def config(**overrides):
    settings = dict(model="small_cnn", width=16, train=FAST, poison_ratio=0.1)
    settings.update(overrides)
    return RunConfig(**settings)


def by_protocol(result):
    return {e["protocol"]: e for e in result.evaluations}


def test_config_key_spells_out_defaults_and_includes_the_data():
    assert config(defense="eigenguard").key("d") == \
        config(defense="eigenguard", defense_settings={"k": 16}).key("d")
    assert config(defense="eigenguard").key("d") != \
        config(defense="eigenguard", defense_settings={"k": 8}).key("d")
    assert config(seed=1).key("d") != config().key("d")
    assert config().key("d") != config().key("other data")
    guarded = config(defense="eigenguard")
    assert RunConfig.from_dict(guarded.resolved()).key("d") == guarded.key("d")
    assert guarded.setup_key("d") == config().setup_key("d")  # the defense is not the setup
    assert config(poison_ratio=0.05).setup_key("d") != config().setup_key("d")


@pytest.mark.parametrize("overrides, message", [
    (dict(poison_ratio=1.5), "poison ratio"), (dict(train_size=-5), "train_size"),
    (dict(test_size=0), "test_size"), (dict(target=10), "target class"),
    (dict(validation_fraction=0.95), "validation_fraction"),
    (dict(validation_fraction=0.5, reserve_fraction=0.45), "leaves the victim"),
    (dict(poison_pool="some"), "poison_pool"), (dict(seed=-1), "seed"),
])
def test_bad_settings_fail_before_the_data_loads(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):  # not DatasetNotFoundError
        run(config(**overrides), ResultStore(tmp_path / "r.sqlite"),
            data_root=tmp_path / "nowhere", progress=False)
    with pytest.raises(UnknownNameError, match="small_cnn"):
        run(config(model="resnet9000"), ResultStore(tmp_path / "r.sqlite"), progress=False)


def test_missing_data_names_the_place_and_the_fix(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        run(config(), ResultStore(tmp_path / "r.sqlite"), data_root=tmp_path / "nowhere",
            progress=False)


def test_splits_are_disjoint_seeded_fractions(synthetic_root):
    loaded = load_data("fashion-mnist", synthetic_root)
    splits = run_splits(config(), loaded)
    assert (len(splits.validation), len(splits.reserve), len(splits.train)) == (200, 100, 1700)
    rows = {tuple(x.flatten()[:64].tolist()) for part in (splits.train, splits.validation,
                                                          splits.reserve) for x in part.images}
    assert len(rows) == 2000  # every training image lands in exactly one split
    again = run_splits(config(), loaded)
    assert torch.equal(again.validation.images, splits.validation.images)
    other = run_splits(config(seed=1), loaded)
    assert not torch.equal(other.validation.images, splits.validation.images)
    small = run_splits(config(train_size=1000, test_size=150, reserve_fraction=0.0), loaded)
    assert (len(small.train), len(small.validation), len(small.reserve), len(small.test)) == \
        (900, 100, 0, 150)


def test_random_streams_of_neighbouring_seeds_are_independent():
    names = ("split", "poison", "epoch-order", "augment", "init", "train")
    seeds = {stream_seed(seed, name) for seed in range(5) for name in names}
    assert len(seeds) == 5 * len(names)
    # the old defect: the poison draw of seed s + 2 equalled the epoch order of seed s
    first = torch.randperm(1000, generator=generator(0, "epoch-order"))
    assert not torch.equal(first, torch.randperm(1000, generator=generator(2, "poison")))
    assert stream_seed(3, "poison") == stream_seed(3, "poison")
    with pytest.raises(ValueError, match="seed"):
        stream_seed(-1, "poison")


def test_undefended_backdoor_works_and_runs_reproduce(tmp_path, synthetic_root):
    store = ResultStore(tmp_path / "r.sqlite")
    first = run(config(), store, data_root=synthetic_root, progress=False)
    metrics = by_protocol(first)["triggered"]
    assert metrics["acc"] > 0.9 and metrics["asr"] > 0.9  # calibration: the attack works
    assert list(by_protocol(first)) == ["triggered"]  # batch-independent model
    cached = run(config(), store, data_root=synthetic_root, progress=False)
    assert cached.cached and cached.evaluations == store.evaluations(first.key)
    again = run(config(), store, data_root=synthetic_root, progress=False, force=True)
    assert not again.cached and again.key == first.key
    assert {k: metrics[k] for k in ("acc", "asr", "ra")} == \
        {k: by_protocol(again)["triggered"][k] for k in ("acc", "asr", "ra")}
    stored = store.get_run(first.key)
    assert stored.status == "finished" and len(stored.history) == FAST.epochs
    assert stored.versions["torch"] == torch.__version__ and stored.device.startswith("cpu")
    assert stored.extra["threads"] == torch.get_num_threads()
    assert stored.checkpoint == f"checkpoints/{first.key}.safetensors"
    # the validation split is evaluated too (for tuning); the detection rows only for detectors
    assert store.evaluations(first.key, split="validation")[0]["n_clean"] == 200
    # dirty-label draws from every class: the ones already in the target keep their label
    assert stored.extra["poisoned"] == 170
    assert 0 < stored.extra["poisoned"] - stored.extra["flipped_labels"] < 40
    # the cost rows: wall seconds per stage, and the processor seconds of the whole run
    cost = {row["metric"]: row["value"] for row in store.metrics(first.key)
            if row["protocol"] == "cost"}
    assert set(cost) == {"seconds.poison", "seconds.defend", "seconds.evaluate", "cpu_seconds"}
    assert cost["cpu_seconds"] > 0.5 * cost["seconds.defend"] > 0  # it trained on the processor


def test_a_rebuilt_run_is_the_one_that_was_trained(tmp_path, synthetic_root):
    """Probes and analyses read a stored run through ``rebuild_run``: the same poisoned rows
    and a model that scores the recorded clean accuracy again."""
    store = ResultStore(tmp_path / "r.sqlite")
    first = run(config(), store, data_root=synthetic_root, progress=False)
    rebuilt = experiment.rebuild_run(store, store.get_run(first.key), data_root=synthetic_root)
    assert len(rebuilt.poisoned.poison_indices) == store.get_run(first.key).extra["poisoned"]
    assert not rebuilt.model.training
    test = rebuilt.splits.test
    accuracy = float((predict(rebuilt.model, test.images, rebuilt.splits.train)
                      == test.labels).double().mean())
    assert accuracy == pytest.approx(by_protocol(first)["triggered"]["acc"], abs=1e-9)


def test_poisoning_from_the_non_target_classes_flips_every_label(synthetic_root):
    loaded = load_data("fashion-mnist", synthetic_root)
    splits = run_splits(config(), loaded)
    from eigenguard.attacks import create_attack
    poisoned = create_attack("badnets").poison(splits.train, 0.1, 0, 0, pool="non-target")
    assert poisoned.flipped_labels == len(poisoned.poison_indices) == 170


def test_a_clean_label_ratio_beyond_the_target_class_names_the_largest(synthetic_root):
    from eigenguard.attacks import create_attack
    splits = run_splits(config(), load_data("fashion-mnist", synthetic_root))
    attack = create_attack("badnets")
    attack.clean_label = True
    largest = int((splits.train.labels == 0).sum()) / len(splits.train)
    with pytest.raises(ValueError, match=f"largest possible poison ratio here is {largest:.4f}"):
        attack.poison(splits.train, 0.5, 0, 0)
    assert len(attack.poison(splits.train, largest, 0, 0).poison_indices) == \
        int((splits.train.labels == 0).sum())


def test_a_defense_without_rights_sees_neither_the_reserve_nor_the_ground_truth(
        synthetic_root, monkeypatch):
    seen = {}
    original = extension_examples.FloodedTraining.defend

    def spy(self, context):
        seen.update(vars(context))
        return original(self, context)

    monkeypatch.setattr(extension_examples.FloodedTraining, "defend", spy)
    execute(config(defense="example-training-time", train=TrainConfig(
        epochs=1, batch_size=64, augment=False)), data_root=synthetic_root, progress=False)
    assert seen["_clean_reserve"] is None and seen["_backdoored_model"] is None
    held = [value for value in seen.values() if isinstance(value, torch.Tensor)]
    assert held == []  # no poison indices, no original labels
    assert len(seen["train_set"]) == 1700
    register_defense("example-greedy")(extension_examples.Greedy)
    try:
        with pytest.raises(ThreatModelError, match="no clean-data rights"):
            execute(config(defense="example-greedy"), data_root=synthetic_root, progress=False)
    finally:
        DEFENSES._entries.pop("example-greedy")


def test_post_training_defense_reuses_the_stored_backdoored_model(tmp_path, synthetic_root,
                                                                   monkeypatch):
    store = ResultStore(tmp_path / "r.sqlite")
    undefended = run(config(), store, data_root=synthetic_root, progress=False)
    calls = []
    original = experiment.execute

    def counting(cfg, **kwargs):
        calls.append(cfg.defense)
        return original(cfg, **kwargs)

    monkeypatch.setattr(experiment, "execute", counting)
    repaired = run(config(defense="example-finetune"), store, data_root=synthetic_root,
                   progress=False)
    assert calls == ["example-finetune"]  # no second backdoored model
    assert repaired.setup_key == undefended.setup_key
    assert store.get_run(undefended.key).started == store.get_run(undefended.key).started
    # the repair's own cost is recorded apart from the backdoored model's
    assert len(store.get_run(repaired.key).history) == 2  # its own two fine-tuning epochs
    assert by_protocol(repaired)["triggered"]["acc"] > 0.5


def test_post_training_defense_trains_the_missing_backdoored_model_once(tmp_path,
                                                                        synthetic_root):
    store = ResultStore(tmp_path / "r.sqlite")
    repaired = run(config(defense="example-finetune"), store, data_root=synthetic_root,
                   progress=False)
    defenses = sorted(run.config["defense"] for run in store.runs_of_setup(repaired.setup_key))
    assert defenses == ["example-finetune", "none"]


def test_post_training_defense_retrains_an_imported_backdoored_model(tmp_path, synthetic_root):
    # a store rebuilt from an export holds the undefended run's metrics but not its weights:
    # the repair trains that model again (deterministic: same metrics) instead of failing
    source = ResultStore(tmp_path / "source.sqlite")
    undefended = run(config(), source, data_root=synthetic_root, progress=False)
    export_runs(source, tmp_path / "runs.jsonl")
    store = ResultStore(tmp_path / "imported.sqlite")
    import_runs(store, [tmp_path / "runs.jsonl"])
    assert store.get_run(undefended.key).checkpoint is None
    lines = []
    repaired = run(config(defense="example-finetune"), store, data_root=synthetic_root,
                   progress=False, log=lines.append)
    assert store.get_run(repaired.key).status == "finished"
    retrained = store.get_run(undefended.key)
    assert store.resolve(retrained.checkpoint).is_file()
    assert any("training it again for its weights" in line for line in lines)
    def scores(held):
        return {(m["split"], m["protocol"], m["metric"]): m["value"]
                for m in held.metrics(undefended.key) if m["metric"] in ("acc", "asr")}

    assert len(scores(source)) >= 4 and scores(store) == pytest.approx(scores(source), abs=1e-6)


def test_an_interrupted_retraining_keeps_the_imported_record(tmp_path, synthetic_root,
                                                             monkeypatch):
    """Stopping `eigenguard analyze` while it trains an imported run again for its weights
    loses nothing: the run stays finished with its metrics, and the next call trains it."""
    source = ResultStore(tmp_path / "source.sqlite")
    undefended = run(config(), source, data_root=synthetic_root, progress=False)
    export_runs(source, tmp_path / "runs.jsonl")
    store = ResultStore(tmp_path / "imported.sqlite")
    import_runs(store, [tmp_path / "runs.jsonl"])
    recorded = store.metrics(undefended.key)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment, "execute", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(config(), store, data_root=synthetic_root, progress=False, need_checkpoint=True)
    kept = store.get_run(undefended.key)
    assert kept.status == "finished" and store.metrics(undefended.key) == recorded
    monkeypatch.undo()
    again = run(config(), store, data_root=synthetic_root, progress=False, need_checkpoint=True)
    assert store.resolve(store.get_run(again.key).checkpoint).is_file()


def test_a_run_trained_again_uses_its_recorded_thread_count(tmp_path, synthetic_root,
                                                            monkeypatch):
    # the thread count changes the order of floating-point sums: a retraining on another count
    # does not reproduce the record, so it is done on the recorded one, then the count restored
    source = ResultStore(tmp_path / "source.sqlite")
    undefended = run(config(), source, data_root=synthetic_root, progress=False)
    export_runs(source, tmp_path / "runs.jsonl")
    text = (tmp_path / "runs.jsonl").read_text()
    recorded = torch.get_num_threads()
    assert f'"threads":{recorded}' in text
    (tmp_path / "runs.jsonl").write_text(text.replace(f'"threads":{recorded}', '"threads":1')
                                         .replace(f"{recorded} threads", "1 threads"))
    store = ResultStore(tmp_path / "imported.sqlite")
    import_runs(store, [tmp_path / "runs.jsonl"])
    assert experiment.recorded_threads(store.get_run(undefended.key)) == 1
    seen, original = [], experiment.execute

    def spy(cfg, **kwargs):
        seen.append((cfg.defense, torch.get_num_threads()))
        return original(cfg, **kwargs)

    monkeypatch.setattr(experiment, "execute", spy)
    torch.set_num_threads(2)
    try:
        lines = []
        run(config(defense="example-finetune"), store, data_root=synthetic_root,
            progress=False, log=lines.append)
        assert seen == [("none", 1), ("example-finetune", 2)]
        assert torch.get_num_threads() == 2  # restored
        assert any("on its recorded 1 CPU threads" in line for line in lines)
        assert experiment.recorded_threads(store.get_run(undefended.key)) == 1
    finally:
        torch.set_num_threads(recorded)


def test_a_fitted_attack_state_is_saved_and_used_again(tmp_path, synthetic_root):
    store = ResultStore(tmp_path / "r.sqlite")
    result = run(config(attack="example-fitted"), store, data_root=synthetic_root,
                 progress=False)
    assert by_protocol(result)["triggered"]["asr"] > 0.9
    stored = store.get_run(result.key)
    state = store.read_tensors(stored.attack_state, "fitted attack state", stored.key)
    assert state["patch_"].shape == (1, 4, 4)
    attack = experiment.load_run_attack(store, stored)
    assert torch.equal(attack.patch_, state["patch_"])
    store.record_evaluation(result.key, [])  # drop nothing; re-evaluate from the files
    again = experiment.reevaluate(store, stored, data_root=synthetic_root, progress=False)
    asr = [m["value"] for m in again if m["metric"] == "asr" and m["split"] == "test"]
    assert asr == [by_protocol(result)["triggered"]["asr"]]
    # an unfitted copy would draw nothing: using it is an error, not a fresh random patch
    with pytest.raises(EigenGuardError, match="call fit"):
        RunConfig(attack="example-fitted").build_attack().apply(
            torch.zeros(1, 1, 28, 28, dtype=torch.uint8))


def test_an_evaluation_that_fails_keeps_the_model_and_is_repeatable_elsewhere(
        tmp_path, synthetic_root, monkeypatch):
    store = ResultStore(tmp_path / "a" / "r.sqlite")
    cfg = config(defense="eigenguard", defense_settings={"k": 4, "after": "block2"},
                 test_size=100, train=TrainConfig(epochs=1, batch_size=64, augment=False))
    result = run(cfg, store, data_root=synthetic_root, progress=False)
    assert result.status == "evaluation-failed" and "needs at least 128 test images" in \
        result.error
    assert {"triggered", "single", "running"} <= set(by_protocol(result))  # the rest recorded
    shutil.move(tmp_path / "a", tmp_path / "b")  # the store and its checkpoints move together
    monkeypatch.chdir(tmp_path)
    moved = str(tmp_path / "b" / "r.sqlite")
    assert main(["evaluate", "--run", result.key[:8], "--protocol", "running", "--store", moved,
                 "--data-root", str(synthetic_root), "--quiet"]) == 0
    stored = ResultStore(moved).get_run(result.key)
    assert stored.status == "finished" and stored.error is None


def test_force_leaves_no_stale_evaluation(tmp_path, synthetic_root):
    store = ResultStore(tmp_path / "r.sqlite")
    cfg = config(train=TrainConfig(epochs=1, batch_size=64, augment=False))
    first = run(cfg, store, data_root=synthetic_root, progress=False)
    experiment.reevaluate(store, store.get_run(first.key), data_root=synthetic_root,
                          eval_seed=7, progress=False)
    assert {m["eval_seed"] for m in store.metrics(first.key)} == {0, 7}
    run(cfg, store, data_root=synthetic_root, progress=False, force=True)
    assert {m["eval_seed"] for m in store.metrics(first.key)} == {0}


CLI = [sys.executable, "-m", "eigenguard.cli"]


def _cli_args(store, root, *extra):
    return ["run", "--model", "small_cnn", "--width", "8", "--epochs", "2", "--batch-size", "32",
            "--no-augment", "--store", str(store), "--data-root", str(root), "--quiet", *extra]


def test_two_processes_on_one_key_train_it_once(tmp_path, synthetic_root):
    store = tmp_path / "r.sqlite"
    ResultStore(store)
    procs = [subprocess.Popen(CLI + _cli_args(store, synthetic_root), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    assert sum("finished in" in out for out in outputs) == 1, outputs
    assert sum("already in" in out for out in outputs) == 1, outputs
    (stored,) = ResultStore(store).find_runs()
    assert stored.status == "finished"


def test_a_killed_run_is_restarted(tmp_path, synthetic_root):
    store_path = tmp_path / "r.sqlite"
    store = ResultStore(store_path)
    proc = subprocess.Popen(CLI + _cli_args(store_path, synthetic_root, "--epochs", "30"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not store.find_runs() and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    (stale,) = store.find_runs()
    assert stale.status == "running" and stale.pid == proc.pid  # killed: no chance to clean up
    assert main(_cli_args(store_path, synthetic_root, "--epochs", "30")) == 0
    (restarted,) = store.find_runs()
    assert restarted.status == "finished" and restarted.pid is None


def test_cli_run_report_list_set_and_errors(tmp_path, synthetic_root, capsys):
    store = str(tmp_path / "cli.sqlite")
    common = ["--store", store, "--data-root", str(synthetic_root), "--quiet"]
    args = ["run", "--model", "small_cnn", "--width", "8", "--epochs", "1", "--batch-size", "64",
            "--no-augment", *common]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "finished" in out and "triggered" in out
    assert main(args) == 0
    assert "already in" in capsys.readouterr().out
    assert main(["report", "--store", store]) == 0
    assert "small_cnn/8" in capsys.readouterr().out
    key = ResultStore(store).find_runs()[0].key
    assert main(["evaluate", "--run", key[:6], "--protocol", "triggered", *common]) == 0
    assert key[:8] in capsys.readouterr().out
    assert main(["evaluate", "--run", "zzzz", *common]) == 2
    assert "matches 0 trained runs" in capsys.readouterr().err
    assert main(["list"]) == 0
    listing = capsys.readouterr().out
    assert "preact_resnet18" in listing and "eigenguard [triggered, mixed, single, running]" in \
        listing
    assert main(["run", "--model", "resnet9000", *common]) == 2
    assert "unknown model 'resnet9000'" in capsys.readouterr().err
    assert main(["run", "--defense", "eigenguard", "--k", "0", *common]) == 2
    assert "k must be >= 1" in capsys.readouterr().err
    assert main(["run", "--k", "4", *common]) == 2
    assert "add --defense eigenguard" in capsys.readouterr().err
    assert main(["run", "--set", "defense.k=4", *common]) == 2
    assert "none has no setting 'k'" in capsys.readouterr().err
    assert main(["run", "--defense", "eigenguard", "--set", "defense.k=four", *common]) == 2
    assert "defense.k='four': expected int" in capsys.readouterr().err
    assert main(["run", "--train-size", "-5", *common]) == 2
    assert "train_size must be an integer >= 1" in capsys.readouterr().err


def test_cli_settings_are_typed_by_their_declaration():
    from eigenguard.cli import build_parser, config_from_args

    def resolved(*flags):
        return config_from_args(build_parser().parse_args(["run", *flags])).resolved()

    settings = resolved("--defense", "eigenguard", "--k", "8", "--after", "layer2",
                        "--eval-mode", "batch", "--stats-every", "1",
                        "--set", "defense.sketch_rank=none", "--set", "defense.tail_scale=0.01",
                        "--set", "defense.track_running_stats=false", "--set",
                        "defense.eval_mode=identity")["defense_settings"]
    assert (settings["k"], settings["after"], settings["eval_mode"], settings["stats_every"]) == \
        (8, "layer2", "identity", 1)  # --set comes after the shortcuts
    assert settings["sketch_rank"] is None and settings["tail_scale"] == 0.01
    assert settings["track_running_stats"] is False
    assert resolved("--defense", "eigenguard")["defense_settings"]["stats_every"] == 2
    blended = resolved("--attack", "blended", "--set", "attack.alpha=0.1", "--set",
                       "train.epochs=2")
    assert blended["attack_settings"]["alpha"] == 0.1 and blended["train"]["epochs"] == 2
    with pytest.raises(EigenGuardError, match="SECTION.NAME=VALUE"):
        resolved("--set", "k=3")
    with pytest.raises(EigenGuardError, match="unknown section 'model'"):
        resolved("--set", "model.k=3")


@pytest.mark.parametrize("attack, defense, extra", [
    ("example-static", "none", []),
    ("example-fitted", "none", []),
    ("example-training", "none", ["--poison-ratio", "0"]),
    ("badnets", "example-training-time", []),
    ("badnets", "example-finetune", []),
    ("badnets", "example-detector", []),
])
def test_every_kind_of_extension_runs_through_the_cli(tmp_path, synthetic_root, capsys, attack,
                                                      defense, extra):
    store = tmp_path / "r.sqlite"
    assert main(["run", "--attack", attack, "--defense", defense, "--model", "small_cnn",
                 "--width", "16", "--epochs", "4", "--batch-size", "32", "--lr", "0.1",
                 "--no-augment", "--store", str(store), "--data-root", str(synthetic_root),
                 "--quiet", *extra]) == 0
    runs = {r.config["defense"]: r for r in ResultStore(store).find_runs()}
    (evaluation,) = ResultStore(store).evaluations(runs[defense].key)
    assert evaluation["acc"] > 0.5
    if defense == "none":
        assert evaluation["asr"] > 0.8  # each kind of attack plants its backdoor
    if defense == "example-detector":
        rows = {m["metric"]: m["value"] for m in ResultStore(store).metrics(runs[defense].key)
                if m["protocol"] == "detection"}
        assert set(rows) == {"tpr", "fpr", "flagged"} and rows["flagged"] == 255
        assert rows["tpr"] > 0.5 > rows["fpr"]  # flipped labels stand out after one epoch
