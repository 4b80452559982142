"""Every registered attack and defense passes the same conformance checks."""
import pytest
import torch

from eigenguard.attacks import create_attack, list_attacks
from eigenguard.data import ImageSet
from eigenguard.defenses import create_defense, list_defenses
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
def test_defense_declarations(name):
    """Every registered defense declares what the harness needs; only EigenGuard adds a layer.

    Running each defense through the harness is tests/test_defense_conformance.py's job.
    """
    defense = create_defense(name, **({"after": "block2", "k": 4} if name == "eigenguard" else {}))
    model = defense.prepare_model(create_model("small_cnn", in_channels=1, num_classes=10,
                                               width=4))
    assert bool(find_guards(model)) == (name == "eigenguard")
    assert isinstance(defense.settings(), dict) and isinstance(defense.label(), str)
    assert defense.starts_from in STARTS_FROM and "triggered" in defense.protocols
    assert set(defense.protocols) <= set(PROTOCOLS)
    assert isinstance(defense.clean_data, bool)


def test_unknown_defense_lists_the_known_ones():
    with pytest.raises(UnknownNameError, match="eigenguard"):
        create_defense("eigengaurd")
    with pytest.raises(ValueError, match="k must be"):
        create_defense("eigenguard", k=0)


def test_defense_labels_name_the_settings_that_differ_from_the_defaults():
    assert create_defense("eigenguard").label() == "eigenguard(k=16)"
    assert create_defense("eigenguard", scale="zero", k=8).label() == "eigenguard(k=8, scale=zero)"
    assert create_defense("ft").label() == "ft"
    assert create_defense("ft", epochs=3).label() == "ft(epochs=3)"
