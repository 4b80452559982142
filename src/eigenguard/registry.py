"""A small name -> factory registry shared by attacks and defenses (models keep their own)."""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import warnings
from typing import Callable, Generic, TypeVar

from .errors import EigenGuardError, UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to classes; ``create`` builds one, and an unknown name lists the known ones."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable:
        def decorate(factory):
            if name in self._entries:
                warnings.warn(f"{self.kind} {name!r} registered twice; the later one wins")
            self._entries[name] = factory
            factory.registered_name = name
            return factory
        return decorate

    def get(self, name: str) -> Callable[..., T]:
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(str(name), self._entries, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UnknownNameError(f"unknown {self.kind} {name!r}: known {self.kind}s are "
                                   f"{', '.join(self.names())}{hint}") from None

    def create(self, name: str, **settings) -> T:
        return self.get(name)(**settings)

    def rebuild(self, name: str, settings) -> T | None:
        """The instance a stored config names, from the settings its class still has (a stored
        run may hold settings since removed); None where it cannot be built (a name not
        registered here, a value its class now refuses): tables then show the bare name."""
        try:
            factory = self.get(name)
            known = {f.name for f in dataclasses.fields(factory)}
            settings = self.stored_settings(name, settings)
            return factory(**{k: v for k, v in settings.items() if k in known})
        except (EigenGuardError, KeyError, TypeError, ValueError):
            return None

    def stored_settings(self, name: str, settings) -> dict:
        """A stored config's settings with each setting added since (``later_settings``) at the
        earlier value its run used: a key leaves such a value out, so a stored config lacks it,
        and reading it as the current default would misname the run and change its key."""
        settings = dict(settings or {})
        try:
            factory = self.get(name)
        except EigenGuardError:
            return settings
        for setting, earlier in getattr(factory, "later_settings", {}).items():
            settings.setdefault(setting, earlier)
        return settings

    def names(self, pattern: str | None = None) -> list[str]:
        names = sorted(self._entries)
        return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names
