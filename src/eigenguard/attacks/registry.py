"""Attack registry: ``create_attack("badnets", patch=3)``."""
from ..registry import Registry
from ..settings import changed_settings

ATTACKS = Registry("attack")
register_attack = ATTACKS.register
create_attack = ATTACKS.create
list_attacks = ATTACKS.names


def attack_label(name: str, settings) -> str:
    """The attack's name with the settings that differ from its defaults (``wanet(s=1.0)``), so
    variants of one attack read apart in tables and figures; its name where it cannot be
    rebuilt."""
    attack = ATTACKS.rebuild(name, settings)
    changed = changed_settings(attack) if attack is not None else []
    return f"{name}({', '.join(changed)})" if changed else name
