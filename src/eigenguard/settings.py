"""Typed ``SECTION.NAME=VALUE`` settings from the command line, checked against the dataclass
that declares them (an attack's, a defense's or the trainer's), so every setting has one home
and the command line needs no per-defense flags.
"""
from __future__ import annotations

import dataclasses
import types
import typing

from .errors import EigenGuardError

NONE_WORDS = ("none", "null")
TRUE_WORDS = ("true", "yes", "1", "on")
FALSE_WORDS = ("false", "no", "0", "off")


class SettingError(EigenGuardError, ValueError):
    """A ``--set`` that names no setting, or a value of the wrong type."""


def changed_settings(instance) -> list[str]:
    """``name=value`` for every dataclass setting of ``instance`` that differs from its default
    (what a table's label shows of an attack's or a defense's settings)."""
    return [f"{f.name}={getattr(instance, f.name)}" for f in dataclasses.fields(instance)
            if f.default is not dataclasses.MISSING and getattr(instance, f.name) != f.default]


def declared_types(cls) -> dict[str, object]:
    """Each dataclass field of ``cls`` with its declared type (string annotations resolved)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, str) for f in dataclasses.fields(cls)}


def coerce(text: str, annotation, where: str):
    """Read ``text`` as a value of ``annotation`` (int, float, bool, str, or X | None)."""
    options = typing.get_args(annotation) if isinstance(
        annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union \
        else (annotation,)
    if type(None) in options and text.strip().lower() in NONE_WORDS:
        return None
    for kind in (o for o in options if o is not type(None)):
        if kind is bool:
            word = text.strip().lower()
            if word in TRUE_WORDS or word in FALSE_WORDS:
                return word in TRUE_WORDS
        elif kind is int:
            try:
                return int(text)
            except ValueError:
                pass
        elif kind is float:
            try:
                return float(text)
            except ValueError:
                pass
        elif kind is str:
            return text
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise SettingError(f"{where}={text!r}: expected {names}")


def parse_assignment(text: str, sections: dict[str, type]) -> tuple[str, str, object]:
    """``"defense.k=8"`` -> ("defense", "k", 8), typed by the field of ``sections["defense"]``."""
    path, sep, value = text.partition("=")
    section, dot, name = path.partition(".")
    if not sep or not dot or not name:
        raise SettingError(f"--set expects SECTION.NAME=VALUE (sections: "
                           f"{', '.join(sections)}), for example defense.k=8; got {text!r}")
    if section not in sections:
        raise SettingError(f"--set {text!r}: unknown section {section!r}; sections are "
                           f"{', '.join(sections)}")
    fields = declared_types(sections[section])
    if name not in fields:
        owner = getattr(sections[section], "registered_name", sections[section].__name__)
        known = ", ".join(fields) or "none"
        raise SettingError(f"--set {text!r}: {owner} has no setting {name!r}; its settings are "
                           f"{known}")
    return section, name, coerce(value, fields[name], path)
