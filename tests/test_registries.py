"""Every registered attack and defense passes the same conformance checks."""
import pytest
import torch

from eigenguard.attacks import create_attack, list_attacks
from eigenguard.data import ImageSet
from eigenguard.defenses import DefenseContext, create_defense, list_defenses
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
    assert torch.equal(out, create_attack(name).apply(data.images))  # deterministic
    assert not torch.equal(out, data.images)  # the trigger changes something
    poisoned = attack.poison(data, 0.25, 3, seed=0)
    assert len(poisoned.poison_indices) == 16
    assert (poisoned.data.labels[poisoned.poison_indices] == 3).all()
    assert isinstance(attack.settings(), dict)


@pytest.mark.parametrize("name", list_defenses())
def test_defense_conformance(name):
    defense = create_defense(name, **({"after": "block2", "k": 4} if name == "eigenguard" else {}))
    poisoned = create_attack("badnets").poison(toy_set(), 0.1, 0, seed=0)
    trained = []

    def build():
        return create_model("small_cnn", in_channels=1, num_classes=10, width=4)

    def train_model(model, data):
        trained.append(len(data))
        return [{"epoch": 1}]

    model = defense.defend(DefenseContext(poisoned, build, train_model))
    assert trained == [64]
    assert bool(find_guards(model)) == (name == "eigenguard")
    rebuilt = defense.prepare_model(build())
    rebuilt.load_state_dict(model.state_dict())  # a checkpoint reloads into the rebuilt model
    assert isinstance(defense.settings(), dict)


def test_unknown_defense_lists_the_known_ones():
    with pytest.raises(UnknownNameError, match="eigenguard"):
        create_defense("eigengaurd")
    with pytest.raises(ValueError, match="k must be"):
        create_defense("eigenguard", k=0)
