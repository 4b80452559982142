"""End to end on a small synthetic data set: run, store, cache, reproduce, re-evaluate, CLI."""
import pytest
import torch

from eigenguard.cli import main
from eigenguard.errors import DatasetNotFoundError, EigenGuardError, UnknownNameError
from eigenguard.experiment import RunConfig, load_data, load_run_model, run
from eigenguard.evaluate import evaluate
from eigenguard.store import ResultStore
from eigenguard.train import TrainConfig

# no augmentation: the synthetic classes are stripe orientations, which a flip would swap
FAST = TrainConfig(epochs=4, batch_size=32, lr=0.1, augment=False)


def config(**overrides):
    settings = dict(model="small_cnn", width=16, train=FAST, poison_ratio=0.1)
    settings.update(overrides)
    return RunConfig(**settings)


def by_protocol(result):
    return {e["protocol"]: e for e in result.evaluations}


def test_config_key_spells_out_defaults():
    assert config(defense="eigenguard").key() == \
        config(defense="eigenguard", defense_settings={"k": 32}).key()
    assert config(defense="eigenguard").key() != \
        config(defense="eigenguard", defense_settings={"k": 8}).key()
    assert config(seed=1).key() != config().key()
    guarded = config(defense="eigenguard")
    assert RunConfig.from_dict(guarded.resolved()).key() == guarded.key()


def test_bad_names_and_settings_fail_before_any_work(tmp_path):
    with pytest.raises(UnknownNameError, match="small_cnn"):
        run(config(model="resnet9000"), ResultStore(tmp_path / "r.sqlite"), progress=False)


def test_undefended_backdoor_works_and_runs_reproduce(tmp_path, synthetic_root):
    store = ResultStore(tmp_path / "r.sqlite")
    first = run(config(), store, data_root=synthetic_root, progress=False)
    metrics = by_protocol(first)["triggered"]
    assert metrics["acc"] > 0.9 and metrics["asr"] > 0.9  # calibration: the attack works
    assert list(by_protocol(first)) == ["triggered"]  # batch-independent model
    cached = run(config(), store, data_root=synthetic_root, progress=False)
    assert cached.cached and cached.evaluations == store.evaluations(first.key)
    again = run(config(), store, data_root=synthetic_root, progress=False, force=True)
    assert not again.cached
    assert {k: metrics[k] for k in ("acc", "asr", "ra")} == \
        {k: by_protocol(again)["triggered"][k] for k in ("acc", "asr", "ra")}
    stored = store.get_run(first.key)
    assert stored.status == "finished" and len(stored.history) == FAST.epochs
    assert stored.versions["torch"] == torch.__version__


def test_eigenguard_run_records_every_protocol_and_reloads(tmp_path, synthetic_root):
    store = ResultStore(tmp_path / "r.sqlite")
    cfg = config(defense="eigenguard", defense_settings={"k": 4, "after": "block2"})
    result = run(cfg, store, data_root=synthetic_root, progress=False)
    assert list(by_protocol(result)) == ["triggered", "mixed", "single", "running"]
    assert by_protocol(result)["single"]["batch_size"] == 1
    _, test = load_data(cfg, synthetic_root)
    model = load_run_model(store.get_run(result.key), test)
    for protocol in ("mixed", "running"):  # the checkpoint carries the running statistics
        again = evaluate(model, test, cfg.build_attack(), cfg.target, protocol, progress=False)
        assert again.asr == by_protocol(result)[protocol]["asr"]
        assert again.acc == by_protocol(result)[protocol]["acc"]


def test_missing_data_names_the_place_and_the_fix(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        run(config(), ResultStore(tmp_path / "r.sqlite"), data_root=tmp_path / "nowhere",
            progress=False)


def test_cli_run_report_list_and_errors(tmp_path, synthetic_root, capsys):
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
    assert main(["report", "--store", store, "--wide", "--markdown"]) == 0
    wide = capsys.readouterr().out.splitlines()
    assert wide[0].startswith("| run | commit |") and "running ACC/ASR" in wide[0]
    assert "| 0 | 1 |" in wide[2]  # seed 0, 1 epoch
    assert len(wide) == 3 and wide[2].endswith("| - | - | - |")  # unguarded: triggered only
    assert main(["report", "--store", store, "--over-seeds", "--markdown"]) == 0
    summary = capsys.readouterr().out.splitlines()
    assert "running ACC / ASR (range) / DER" in summary[0] and "| small_cnn/8 |" in summary[2]
    with pytest.raises(SystemExit):
        main(["report", "--store", store, "--over-seeds", "--wide"])
    assert "not allowed with argument" in capsys.readouterr().err
    assert main(["report", "--store", store, "--where", "train.epochs=1", "--where",
                 "model=small_cnn"]) == 0
    assert "small_cnn/8" in capsys.readouterr().out
    key = ResultStore(store).find_runs()[0].key
    assert main(["report", "--store", store, "--run", "zzz", "--run", key[:4]]) == 0
    assert key[:8] in capsys.readouterr().out
    assert main(["report", "--store", store, "--run", "zzz"]) == 1
    assert "no stored run matches key prefix 'zzz'" in capsys.readouterr().out
    assert main(["report", "--store", store, "--where", "poison_ratio=0.01"]) == 1
    assert "no stored run matches poison_ratio=0.01" in capsys.readouterr().out
    missing = tmp_path / "typo.sqlite"
    assert main(["report", "--store", str(missing)]) == 2
    assert f"no result store at {missing}" in capsys.readouterr().err and not missing.exists()
    assert main(["evaluate", "--run", "abc", "--store", str(missing)]) == 2
    assert "no result store" in capsys.readouterr().err and not missing.exists()
    assert main(["report", "--store", store, "--where", "poison_ratio"]) == 2
    assert "PATH=VALUE" in capsys.readouterr().err
    key = ResultStore(store).find_runs()[0].key
    assert main(["evaluate", "--run", key[:6], "--protocol", "triggered", *common]) == 0
    assert key[:8] in capsys.readouterr().out
    assert main(["evaluate", "--run", "zzzz", *common]) == 2
    assert "matches 0 finished runs" in capsys.readouterr().err
    assert main(["list"]) == 0
    assert "preact_resnet18" in capsys.readouterr().out
    assert main(["run", "--model", "resnet9000", *common]) == 2
    assert "unknown model 'resnet9000'" in capsys.readouterr().err
    assert main(["run", "--defense", "eigenguard", "--k", "0", *common]) == 2
    assert "k must be >= 1" in capsys.readouterr().err
    assert main(["run", "--k", "4", *common]) == 2
    assert "--defense eigenguard" in capsys.readouterr().err


def test_report_where_conditions_read_json_values_and_dotted_paths():
    from eigenguard.report import config_matches, parse_condition
    config = {"poison_ratio": 0.01, "seed": 1, "defense_settings": {"after": "layer1", "k": 32},
              "width": None}
    assert config_matches(config, [parse_condition("poison_ratio=0.01"),
                                   parse_condition("defense_settings.after=layer1"),
                                   parse_condition("defense_settings.k=32")])
    assert config_matches(config, [parse_condition("width=null")])
    assert not config_matches(config, [parse_condition("seed=0")])
    assert not config_matches(config, [parse_condition("defense_settings.k=32.5")])
    assert not config_matches(config, [parse_condition("defense_settings.missing=1")])
    assert not config_matches(config, [parse_condition("seed.inner=1")])


def test_report_sorts_runs_by_config_values(tmp_path):
    from eigenguard.report import select_runs
    store = ResultStore(tmp_path / "s.sqlite")
    settings = [("a", {"k": 8, "after": "layer2"}), ("b", None), ("c", {"k": 32, "after": "layer1"}),
                ("d", {"k": 4, "after": "layer2"})]
    for key, defense in settings:
        store.start_run(key, {"defense_settings": defense} if defense else {}, {}, None)

    def keys(*args, **kwargs):
        return [run.key for run in select_runs(*args, **kwargs)]

    assert keys(store) == ["a", "b", "c", "d"]
    assert keys(store, sort=["defense_settings.k"]) == ["b", "d", "a", "c"]
    assert keys(store, sort=["defense_settings.after", "defense_settings.k"]) == \
        ["b", "c", "d", "a"]
    assert keys(store, prefixes=["c", "a"], sort=["defense_settings.k"]) == ["a", "c"]


def test_cli_eigenguard_flags_reach_the_layer_settings():
    from eigenguard.cli import build_parser, config_from_args
    args = build_parser().parse_args(["run", "--defense", "eigenguard", "--k", "8", "--after",
                                      "layer2", "--eval-mode", "batch", "--stats-every", "1"])
    settings = config_from_args(args).resolved()["defense_settings"]
    assert (settings["k"], settings["after"], settings["eval_mode"], settings["stats_every"]) == \
        (8, "layer2", "batch", 1)
    default = config_from_args(build_parser().parse_args(["run", "--defense", "eigenguard"]))
    assert default.resolved()["defense_settings"]["stats_every"] == 2
    with pytest.raises(EigenGuardError, match="--eval-mode, --stats-every set EigenGuard"):
        config_from_args(build_parser().parse_args(["run", "--eval-mode", "batch",
                                                    "--stats-every", "3"]))


def _stored_run(store, key, seed, defense, evaluations):
    setup = {"dataset": "d", "model": "m", "width": 8, "attack": "badnets", "poison_ratio": 0.1,
             "seed": seed, "train": {"epochs": 1}}
    config = {**setup, "defense": defense,
              "defense_settings": {} if defense == "none" else {"k": 4, "after": "layer1"}}
    store.start_run(key, config, {}, None)
    store.finish_run(key, [], {}, 1.0, None)
    for protocol, acc, asr in evaluations:
        store.add_evaluation(key, {"protocol": protocol, "batch_size": 128, "acc": acc, "asr": asr,
                                   "ra": 0.0, "n_clean": 10, "n_triggered": 9}, seed=0)


def test_report_der_against_the_undefended_run_of_the_same_setup(tmp_path):
    from eigenguard.report import result_rows, summary_rows
    store = ResultStore(tmp_path / "s.sqlite")
    _stored_run(store, "none0", 0, "none", [("triggered", 0.9, 1.0)])
    _stored_run(store, "none1", 1, "none", [("triggered", 0.8, 0.9)])
    _stored_run(store, "eg0", 0, "eigenguard", [("triggered", 0.8, 0.1), ("running", 0.7, 0.0)])
    _stored_run(store, "eg1", 1, "eigenguard", [("triggered", 0.8, 0.5), ("running", 0.8, 0.3)])
    _stored_run(store, "eg2", 2, "eigenguard", [("running", 0.6, 0.2)])  # no undefended seed 2
    der_of = {(row[0], row[9]): row[-1] for row in result_rows(store)}
    assert der_of["none0", "triggered"] == "-"
    assert der_of["eg0", "triggered"] == "90.00"      # (0.9 - 0.1 + 1) / 2
    assert der_of["eg0", "running"] == "90.00"        # (1.0 - 0.2 + 1) / 2
    assert der_of["eg1", "running"] == "80.00"        # against seed 1: (0.6 - 0 + 1) / 2
    assert der_of["eg2", "running"] == "-"
    rows = summary_rows(store, [run for run in store.find_runs() if run.key != "eg2"])
    assert [row[4:7] for row in rows] == [("none", "1", "0,1"),
                                          ("eigenguard(k=4, after=layer1, tail=None, scale=None, "
                                           "eval=None, stats_every=1)", "1", "0,1")]
    undefended, defended = rows
    assert undefended[7] == "85.00 / 95.00 (90.00-100.00) / -"
    assert defended[7] == "80.00 / 30.00 (10.00-50.00) / 80.00"   # DER (0.9 + 0.7) / 2
    assert defended[-1] == "75.00 / 15.00 (0.00-30.00) / 85.00"
    assert defended[8] == "-"                                    # no mixed evaluation
    everything = summary_rows(store)
    assert everything[-1][6] == "0,1,2" and everything[-1][-1].endswith(" / -")
    assert everything[-1][7] == "80.00 / 30.00 (10.00-50.00) / 80.00 [2 of 3 seeds]"
