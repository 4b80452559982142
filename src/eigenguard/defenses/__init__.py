"""Defenses behind one interface: ``create_defense(name, **settings).defend(context)``."""
from . import (abl, activation_clustering, anp, dbd, eigenguard, fineprune,  # noqa: F401
               finetune, nad, neural_cleanse, none, sieve, spectral_signatures, spectre)
# (the imports register the defenses)
from .base import Defense, DefenseContext, DefenseResult, ThreatModelError
from .registry import create_defense, list_defenses, register_defense

__all__ = ["Defense", "DefenseContext", "DefenseResult", "ThreatModelError", "create_defense",
           "list_defenses", "register_defense"]
