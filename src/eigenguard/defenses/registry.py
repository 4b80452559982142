"""Defense registry: ``create_defense("eigenguard", k=16)``."""
from ..registry import Registry

DEFENSES = Registry("defense")
register_defense = DEFENSES.register
create_defense = DEFENSES.create
list_defenses = DEFENSES.names
