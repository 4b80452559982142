"""Defenses behind one interface: ``create_defense(name, **settings).defend(context) -> model``."""
from . import eigenguard, none  # noqa: F401  (registration)
from .base import Defense, DefenseContext
from .registry import create_defense, list_defenses, register_defense

__all__ = ["Defense", "DefenseContext", "create_defense", "list_defenses", "register_defense"]
