"""Every registered defense passes the same checks (the conformance suite of the defenses).

On a tiny synthetic poisoned set, through the harness's own ``execute``: the defense returns a
model that predicts; it respects its threat model (a defense that claims the clean reserve fails
loudly without the right, every other one runs without it); it is deterministic under a seed;
its settings are validated before any data loads; a detector's flags are scored by the harness.

A new defense adds its entry to FAST (settings small enough for this suite) and BAD (one invalid
setting); the first test fails until it does.
"""
import pytest
import torch

from eigenguard.defenses import ThreatModelError, create_defense, list_defenses
from eigenguard.experiment import RunConfig, execute
from eigenguard.models import create_model
from eigenguard.train import TrainConfig

#: per defense: settings that make it cheap on the tiny set (its defining behaviour is tested in
#: its own test file; here only the contract)
FAST = {
    "none": {},
    "eigenguard": {"k": 4, "after": "block1"},
    "ft": {"epochs": 1},
    "fp": {"epochs": 1},
    "nad": {"teacher_epochs": 1, "epochs": 1},
    "anp": {"iterations": 3},
    "nc": {"epochs": 1, "unlearn_epochs": 1},
    "ss": {},
    "ac": {"restarts": 2},
    "spectre": {"max_dims": 4},
    "abl": {"isolation_epochs": 1, "finetune_epochs": 1, "unlearning_epochs": 1},
    "dbd": {"ssl_epochs": 1, "head_epochs": 1, "semi_epochs": 1},
    "sieve": {"after": "block1", "warmup": 2},
}

#: per defense: one invalid setting and a word its error must contain
BAD = {
    "none": None,  # no settings
    "eigenguard": ({"k": 0}, "k"),
    "ft": ({"epochs": 0}, "epochs"),
    "fp": ({"max_prune_ratio": 1.5}, "max_prune_ratio"),
    "nad": ({"p": 0}, "p"),
    "anp": ({"eps": -0.4}, "eps"),
    "nc": ({"anomaly_threshold": -1}, "anomaly_threshold"),
    "ss": ({"expected_poison_ratio": 0}, "expected_poison_ratio"),
    "ac": ({"size_threshold": 0.9}, "size_threshold"),
    "spectre": ({"alpha": -1}, "alpha"),
    "abl": ({"isolation_ratio": 0}, "isolation_ratio"),
    "dbd": ({"temperature": 0}, "temperature"),
    "sieve": ({"threshold": 0}, "threshold"),
}

DEFENSES = sorted(set(list_defenses()) - {n for n in list_defenses() if n.startswith("example")})


def tiny(name: str, settings: dict | None = None) -> RunConfig:
    """The whole synthetic set (1,700 training, 200 validation, 100 reserve images), 200 test
    images (the mixed protocol needs 128), one epoch of a width-4 small CNN."""
    return RunConfig(model="small_cnn", width=4, test_size=200,
                     train=TrainConfig(epochs=1, batch_size=32, lr=0.05, augment=False),
                     defense=name, defense_settings=FAST.get(name, {}) if settings is None
                     else settings)


def run(config, root):
    return execute(config, data_root=root, progress=False, log=lambda *a: None)


def scores(result) -> list[dict]:
    """The metrics without the measured seconds, which vary from run to run."""
    return [row for row in result.metrics if row["protocol"] != "cost"]


def test_every_registered_defense_has_conformance_entries():
    missing = [name for name in DEFENSES if name not in FAST or name not in BAD]
    assert not missing, f"add FAST and BAD entries for {missing}"


@pytest.mark.parametrize("name", DEFENSES)
def test_defense_returns_a_model_that_predicts_and_is_deterministic(name, synthetic_root):
    first, second = run(tiny(name), synthetic_root), run(tiny(name), synthetic_root)
    assert first.status == "finished", first.error
    acc = [row["value"] for row in first.metrics
           if row["split"] == "test" and row["metric"] == "acc"]
    assert acc and all(0.0 <= value <= 1.0 for value in acc)
    assert scores(first) == scores(second)
    assert first.model_state.keys() == second.model_state.keys()
    for key, tensor in first.model_state.items():
        assert torch.equal(tensor, second.model_state[key]), key
    rebuilt = create_defense(name, **FAST[name]).prepare_model(
        create_model("small_cnn", in_channels=1, num_classes=10, width=4))
    rebuilt.load_state_dict(first.model_state)  # the checkpoint reloads into the rebuilt model
    flagged = [row for row in first.metrics if row["protocol"] == "detection"]
    if flagged:  # a detector: the harness scored its flags
        assert {row["metric"] for row in flagged} == {"tpr", "fpr", "flagged"}


@pytest.mark.parametrize("name", DEFENSES)
def test_defense_claims_the_clean_reserve_only_by_right(name, synthetic_root, monkeypatch):
    defense_class = type(create_defense(name, **FAST.get(name, {})))
    if not defense_class.clean_data:
        return  # it ran without the right in the test above: the context refuses the reserve
    monkeypatch.setattr(defense_class, "clean_data", False)
    with pytest.raises(ThreatModelError, match="clean-data rights"):
        run(tiny(name), synthetic_root)


@pytest.mark.parametrize("name", DEFENSES)
def test_bad_settings_fail_before_any_data_loads(name, tmp_path):
    if BAD.get(name) is None:
        with pytest.raises(TypeError):
            create_defense(name, no_such_setting=1)
        return
    settings, word = BAD[name]
    config = tiny(name, {**FAST.get(name, {}), **settings})
    with pytest.raises(ValueError, match=word):
        run(config, tmp_path / "no-data-here")
