"""Every registered defense declares what the harness needs; unknown names list the known ones.

The attacks' conformance suite is tests/test_attack_suite.py, the defenses' (through the harness)
tests/test_defense_conformance.py."""
import pytest

from eigenguard.defenses import create_defense, list_defenses
from eigenguard.defenses.base import STARTS_FROM
from eigenguard.evaluate import PROTOCOLS
from eigenguard.errors import UnknownNameError
from eigenguard.layer import find_guards
from eigenguard.models import create_model
from eigenguard.sieve import find_sieves


@pytest.mark.parametrize("name", list_defenses())
def test_defense_declarations(name):
    """Every registered defense declares what the harness needs; only EigenGuard and the sieve
    add a layer.

    Running each defense through the harness is tests/test_defense_conformance.py's job.
    """
    settings = {"eigenguard": {"after": "block2", "k": 4}, "sieve": {"after": "block2"}}
    defense = create_defense(name, **settings.get(name, {}))
    model = defense.prepare_model(create_model("small_cnn", in_channels=1, num_classes=10,
                                               width=4))
    assert bool(find_guards(model)) == (name == "eigenguard")
    assert bool(find_sieves(model)) == (name == "sieve")
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
