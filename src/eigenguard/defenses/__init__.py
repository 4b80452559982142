"""Defenses behind one interface: ``create_defense(name, **settings).defend(context)``."""
from . import eigenguard, none  # noqa: F401  (registration)
from .base import Defense, DefenseContext, DefenseResult, ThreatModelError
from .registry import create_defense, list_defenses, register_defense

__all__ = ["Defense", "DefenseContext", "DefenseResult", "ThreatModelError", "create_defense",
           "list_defenses", "register_defense"]
