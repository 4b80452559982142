"""Defense registry: ``create_defense("eigenguard", k=32)``."""
from ..registry import Registry

DEFENSES = Registry("defense")
register_defense = DEFENSES.register
create_defense = DEFENSES.create
list_defenses = DEFENSES.names
