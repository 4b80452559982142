"""Attack registry: ``create_attack("badnets", patch=3)``."""
from ..registry import Registry

ATTACKS = Registry("attack")
register_attack = ATTACKS.register
create_attack = ATTACKS.create
list_attacks = ATTACKS.names
