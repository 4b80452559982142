"""Backdoor attacks behind one interface: ``apply`` adds a trigger, ``poison`` builds a PoisonedSet."""
from . import badnets, blended, bpp, inputaware, sig, wanet  # noqa: F401  (registration)
from . import adaptive, highrank, refool, ssba  # noqa: F401  (registration)
from . import lc, lf, trojannn  # noqa: F401  (registration)
from .base import POISON_POOLS, Attack, NotFittedError, PoisonedSet
from .registry import create_attack, list_attacks, register_attack

__all__ = ["Attack", "NotFittedError", "POISON_POOLS", "PoisonedSet", "create_attack",
           "list_attacks", "register_attack"]
