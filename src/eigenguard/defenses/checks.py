"""Settings checks shared by the defenses.

Every defense validates its settings in ``__post_init__``, so a bad setting fails before any data
loads, and every refusal reads the same way: ``"<name> must be <what is allowed>, got <value>"``,
with a short meaning in parentheses where the bound alone does not explain itself. Booleans are
refused where a number is expected (``True`` is an ``int`` to Python, never a sensible epoch
count or rate), and so are strings, NaN and infinities.
"""
from __future__ import annotations

import math


def invalid(name: str, value, allowed: str, meaning: str | None = None) -> ValueError:
    """The one refusal message; returned, not raised, so that callers read ``raise invalid(...)``
    (cross-setting checks use it too)."""
    note = f" ({meaning})" if meaning else ""
    return ValueError(f"{name} must be {allowed}{note}, got {value!r}")


def is_finite_number(value) -> bool:
    """An ``int`` or ``float`` that is neither a bool nor NaN nor infinite."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def check_integer(name: str, value, *, low: int = 1, optional: bool = False,
                  meaning: str | None = None) -> None:
    """An integer >= ``low`` (counts: epochs, iterations, dimensions); None too if ``optional``."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        allowed = f"an integer >= {low}" + (" or None" if optional else "")
        raise invalid(name, value, allowed, meaning)


def interval(low: float | None, high: float | None, open_low: bool, open_high: bool) -> str:
    """How the allowed range reads: ``a number in (0, 1]``, ``a finite number >= 0``, ..."""
    if low is not None and high is not None:
        return f"a number in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
    if low is not None:
        return f"a finite number {'>' if open_low else '>='} {low}"
    if high is not None:
        return f"a finite number {'<' if open_high else '<='} {high}"
    return "a finite number"


def check_number(name: str, value, *, low: float | None = None, high: float | None = None,
                 open_low: bool = True, open_high: bool = True, optional: bool = False,
                 meaning: str | None = None) -> None:
    """A finite real number between optional bounds, each open (the default: rates, factors and
    temperatures must be strictly positive) or closed; None too if ``optional``. The bounds are
    written in the message as given, so ``low=0.0`` reads ``(0.0, ...``."""
    if optional and value is None:
        return
    ok = is_finite_number(value)
    if ok and low is not None:
        ok = value > low if open_low else value >= low
    if ok and high is not None:
        ok = value < high if open_high else value <= high
    if not ok:
        allowed = interval(low, high, open_low, open_high) + (" or None" if optional else "")
        raise invalid(name, value, allowed, meaning)


def check_fraction(name: str, value, *, low: float = 0.0, high: float = 1.0,
                   open_low: bool = True) -> None:
    """A share or a ratio: a number in (low, high] (or [low, high] when not ``open_low``); the
    upper bound is always allowed (a share of 1 is everything, a tolerance of 1 is any drop)."""
    check_number(name, value, low=low, high=high, open_low=open_low, open_high=False)
