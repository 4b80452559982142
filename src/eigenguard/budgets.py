"""Budgets that fall short of the papers': declared beside the settings, shown in the tables.

An attack or defense whose paper trains longer than the 2-core machine allows (helper epochs,
PGD steps, SimCLR epochs) declares ``paper_budget``: setting name -> the paper's value. A run
whose setting is below it is *reduced*, and the report marks it (:data:`REDUCED_MARK` with a
footnote naming each reduced setting and the paper's value), so a weak baseline or attack is
never mistaken for the method at full strength.
"""
from __future__ import annotations

REDUCED_MARK = "°"


def reduced_budget(component) -> dict[str, tuple[float, float]]:
    """Setting -> (value, the paper's value) for each declared budget the component falls short
    of (empty for a component at its paper's budget or declaring none)."""
    paper = getattr(type(component), "paper_budget", None) or {}
    return {name: (getattr(component, name), value) for name, value in paper.items()
            if getattr(component, name) < value}


def reduced_text(name: str, reduced: dict[str, tuple[float, float]]) -> str:
    """``"dbd: ssl_epochs 8 (paper 100), semi_epochs 4 (paper 190)"``."""
    return f"{name}: " + ", ".join(f"{setting} {value:g} (paper {paper:g})"
                                   for setting, (value, paper) in reduced.items())


def reduced_note(entries: list[str]) -> str:
    return (f"{REDUCED_MARK} reduced budget, below the paper's to fit the 2-core CPU (the "
            "method at full strength may do better): " + "; ".join(entries))
