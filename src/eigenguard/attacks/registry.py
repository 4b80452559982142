"""Attack registry: ``create_attack("badnets", patch=3)``."""
import dataclasses

from ..errors import EigenGuardError
from ..registry import Registry
from ..settings import changed_settings

ATTACKS = Registry("attack")
register_attack = ATTACKS.register
create_attack = ATTACKS.create
list_attacks = ATTACKS.names


def attack_label(name: str, settings) -> str:
    """The attack's name with the settings that differ from its defaults (``wanet(s=1.0)``), so
    variants of one attack read apart in tables and figures; its name where it cannot be
    rebuilt (an attack not registered here, settings it no longer has)."""
    settings = dict(settings or {})
    try:
        attack_class = ATTACKS.get(name)
        known = {f.name for f in dataclasses.fields(attack_class)}
        changed = changed_settings(attack_class(**{k: v for k, v in settings.items()
                                                   if k in known}))
    except (EigenGuardError, KeyError, TypeError, ValueError):
        return name
    return f"{name}({', '.join(changed)})" if changed else name
