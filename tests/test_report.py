"""Report tables from a synthetic store: selection, ordering, DER against the same setup."""
import pytest

from eigenguard.report import config_matches, parse_condition, result_rows, select_runs, \
    summary_rows
from eigenguard.store import ResultStore


def test_report_where_conditions_read_json_values_and_dotted_paths():
    config = {"poison_ratio": 0.01, "seed": 1, "defense_settings": {"after": "layer1", "k": 32},
              "width": None, "train": {"augment": True}}
    assert config_matches(config, [parse_condition("poison_ratio=0.01"),
                                   parse_condition("defense_settings.after=layer1"),
                                   parse_condition("defense_settings.k=32")])
    assert config_matches(config, [parse_condition("width=null")])
    assert config_matches(config, [parse_condition("train.augment=true")])
    assert not config_matches(config, [parse_condition("seed=0")])
    assert not config_matches(config, [parse_condition("seed=true")])  # True == 1 in Python
    assert not config_matches({"seed": 0}, [parse_condition("seed=false")])
    assert not config_matches(config, [parse_condition("defense_settings.k=32.5")])
    assert not config_matches(config, [parse_condition("defense_settings.missing=1")])
    assert not config_matches(config, [parse_condition("seed.inner=1")])


def _claim(store, key, config, setup_key="s"):
    return store.claim(key, setup_key, config, {}, None, "cpu").token


def test_report_sorts_runs_by_config_values(tmp_path):
    store = ResultStore(tmp_path / "s.sqlite")
    settings = [("a", {"k": 8, "after": "layer2"}), ("b", None), ("c", {"k": 32, "after": "layer1"}),
                ("d", {"k": 4, "after": "layer2"})]
    for key, defense in settings:
        _claim(store, key, {"defense_settings": defense} if defense else {})

    def keys(*args, **kwargs):
        return [run.key for run in select_runs(*args, **kwargs)]

    assert keys(store) == ["a", "b", "c", "d"]
    assert keys(store, sort=["defense_settings.k"]) == ["b", "d", "a", "c"]
    assert keys(store, sort=["defense_settings.after", "defense_settings.k"]) == \
        ["b", "c", "d", "a"]
    assert keys(store, prefixes=["c", "a"], sort=["defense_settings.k"]) == ["a", "c"]


def _stored_run(store, key, seed, defense, evaluations, attack=("badnets", {})):
    setup = {"dataset": "d", "model": "m", "width": 8, "attack": attack[0],
             "attack_settings": attack[1], "poison_ratio": 0.1, "seed": seed,
             "train": {"epochs": 1}}
    config = {**setup, "defense": defense,
              "defense_settings": {} if defense == "none" else {"k": 4, "after": "layer1"}}
    token = _claim(store, key, config, setup_key=f"setup-{seed}")
    metrics = [dict(split="test", protocol=protocol, metric=name, value=value, eval_seed=0)
               for protocol, acc, asr in evaluations
               for name, value in (("acc", acc), ("asr", asr), ("ra", 0.0), ("batch_size", 128))]
    store.complete(key, token, status="finished", history=[], metrics=metrics, wall_seconds=1.0,
                   checkpoint=None, attack_state=None)


EG = "eigenguard(k=4)"


def test_report_der_against_the_undefended_run_of_the_same_setup(tmp_path):
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
    assert [row[4:7] for row in rows] == [("none", "1", "0,1"), (EG, "1", "0,1")]
    undefended, defended = rows
    assert undefended[7] == "85.00 / 95.00 (90.00-100.00) / -"
    assert defended[7] == "80.00 / 30.00 (10.00-50.00) / 80.00"   # DER (0.9 + 0.7) / 2
    assert defended[-1] == "75.00 / 15.00 (0.00-30.00) / 85.00"
    assert defended[8] == "-"                                    # no mixed evaluation
    everything = summary_rows(store)
    assert everything[-1][6] == "0,1,2" and everything[-1][-1].endswith(" / -")
    assert everything[-1][7] == "80.00 / 30.00 (10.00-50.00) / 80.00 [2 of 3 seeds]"


def test_a_defense_label_comes_from_the_defense(tmp_path):
    store = ResultStore(tmp_path / "s.sqlite")
    _stored_run(store, "x", 0, "unknown-defense", [("triggered", 0.5, 0.5)])
    assert result_rows(store)[0][6] == "unknown-defense"  # not registered here: its name


def test_an_attack_label_names_the_settings_that_differ_from_its_defaults(tmp_path):
    store = ResultStore(tmp_path / "s.sqlite")
    _stored_run(store, "a", 0, "none", [("triggered", 0.5, 0.5)],
                attack=("wanet", {"k": 4, "s": 1.0, "cross_ratio": 2.0}))
    _stored_run(store, "b", 0, "none", [("triggered", 0.5, 0.5)],
                attack=("wanet", {"k": 4, "s": 0.5, "cross_ratio": 2.0}))
    _stored_run(store, "c", 0, "none", [("triggered", 0.5, 0.5)], attack=("gone", {"x": 1}))
    assert [row[4] for row in result_rows(store)] == ["wanet(s=1.0)", "wanet", "gone"]


@pytest.mark.parametrize("status, shown", [("finished", True), ("evaluation-failed", True),
                                           ("failed", False)])
def test_runs_with_metrics_are_reported(tmp_path, status, shown):
    store = ResultStore(tmp_path / "s.sqlite")
    token = _claim(store, "k", {"dataset": "d", "model": "m", "width": 8, "attack": "a",
                                "poison_ratio": 0.1, "seed": 0, "train": {"epochs": 1},
                                "defense": "none"})
    metrics = [dict(split="test", protocol="triggered", metric=m, value=0.5)
               for m in ("acc", "asr", "ra", "batch_size")]
    if status == "failed":
        store.fail("k", token, "boom")
    else:
        store.complete("k", token, status=status, history=[], metrics=metrics, wall_seconds=1,
                       checkpoint=None, attack_state=None)
    assert bool(result_rows(store)) == shown


def test_the_validation_split_is_reported_apart(tmp_path):
    store = ResultStore(tmp_path / "s.sqlite")
    _stored_run(store, "none0", 0, "none", [("triggered", 0.9, 1.0)])
    token = _claim(store, "eg0", {**store.get_run("none0").config, "defense": "eigenguard",
                                  "defense_settings": {"k": 4}}, setup_key="setup-0")
    metrics = [dict(split=split, protocol="triggered", metric=name, value=value)
               for split, acc, asr in (("test", 0.8, 0.2), ("validation", 0.7, 0.4))
               for name, value in (("acc", acc), ("asr", asr), ("ra", 0.0), ("batch_size", 128))]
    store.complete("eg0", token, status="finished", history=[], metrics=metrics,
                   wall_seconds=1.0, checkpoint=None, attack_state=None)
    test = {row[0]: row[11:] for row in result_rows(store)}
    assert test["eg0"] == ("80.00", "20.00", "0.00", "85.00")
    validation = {row[0]: row[11:] for row in result_rows(store, split="validation")}
    assert validation == {"eg0": ("70.00", "40.00", "0.00", "-")}  # no validation reference


def test_a_subset_run_names_its_size_in_the_dataset_cell():
    from eigenguard.report import _dataset_cell
    assert _dataset_cell({"dataset": "fashion-mnist", "train_size": None}) == "fashion-mnist"
    assert _dataset_cell({"dataset": "fashion-mnist", "train_size": 12000}) == \
        "fashion-mnist (12000 images)"
