"""Every registered attack and defense passes the same conformance checks."""
import pytest
import torch

from eigenguard.attacks import create_attack, list_attacks
from eigenguard.data import ImageSet
from eigenguard.defenses import DefenseContext, DefenseResult, create_defense, list_defenses
from eigenguard.defenses.base import STARTS_FROM
from eigenguard.evaluate import PROTOCOLS
from eigenguard.errors import UnknownNameError
from eigenguard.layer import find_guards
from eigenguard.models import create_model


def toy_set(n=64):
    g = torch.Generator().manual_seed(0)
    return ImageSet(torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8),
                    torch.randint(0, 10, (n,), generator=g), tuple(map(str, range(10))),
                    (0.5,), (0.25,), "toy")


@pytest.mark.parametrize("name", list_attacks())
def test_attack_conformance(name):
    attack = create_attack(name)
    data = toy_set()
    assert attack.fit(data) is attack
    out = attack.apply(data.images)
    assert out.dtype == torch.uint8 and out.shape == data.images.shape
    # deterministic, and a fresh attack given the fitted state applies the same trigger
    fresh = create_attack(name).load_fitted_state(attack.fitted_state())
    assert torch.equal(out, fresh.apply(data.images))
    assert not torch.equal(out, data.images)  # the trigger changes something
    ratio = 0.0625 if attack.clean_label else 0.25  # a clean-label attack: the target class only
    poisoned = attack.poison(data, ratio, 3, seed=0)
    assert len(poisoned.poison_indices) == round(ratio * len(data))
    assert (poisoned.data.labels[poisoned.poison_indices] == 3).all()
    assert isinstance(attack.settings(), dict)


@pytest.mark.parametrize("name", list_defenses())
def test_defense_conformance(name):
    """Every registered defense works from what its threat model grants, and no more."""
    defense = create_defense(name, **({"after": "block2", "k": 4} if name == "eigenguard" else {}))
    poisoned = create_attack("badnets").poison(toy_set(), 0.1, 0, seed=0)
    trained = []

    def build():
        return create_model("small_cnn", in_channels=1, num_classes=10, width=4)

    def train_model(model, data, hooks=(), **overrides):
        trained.append(len(data))
        return [{"epoch": 1}]

    reserve = toy_set().subset(list(range(16)))
    context = DefenseContext(poisoned.data, build, train_model, seed=0, device="cpu",
                             clean_reserve=reserve, clean_rights=defense.clean_data,
                             backdoored_model=build if defense.starts_from == "backdoored"
                             else None)
    result = defense.defend(context)
    model = result.model if isinstance(result, DefenseResult) else result
    assert trained and all(size in (64, 16) or size < 64 for size in trained)
    assert bool(find_guards(model)) == (name == "eigenguard")
    rebuilt = defense.prepare_model(build())
    rebuilt.load_state_dict(model.state_dict())  # a checkpoint reloads into the rebuilt model
    assert isinstance(defense.settings(), dict) and isinstance(defense.label(), str)
    assert defense.starts_from in STARTS_FROM and "triggered" in defense.protocols
    assert set(defense.protocols) <= set(PROTOCOLS)


def test_unknown_defense_lists_the_known_ones():
    with pytest.raises(UnknownNameError, match="eigenguard"):
        create_defense("eigengaurd")
    with pytest.raises(ValueError, match="k must be"):
        create_defense("eigenguard", k=0)
