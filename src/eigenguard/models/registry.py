"""Name -> model factory lookup, so configs and the CLI can pick a network by string."""

from __future__ import annotations

import difflib
import fnmatch
import warnings
from typing import Any, Callable

from torch import nn

from eigenguard.errors import UnknownNameError

ModelFactory = Callable[..., nn.Module]

_REGISTRY: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator that files a factory under ``name``.

    A factory is called as ``factory(in_channels=..., num_classes=..., **kwargs)``, with
    ``width=...`` among the keyword arguments when the caller chose one; its own
    default for ``width`` is the architecture's standard width.
    Registering a taken name replaces the old factory but warns, because a silent
    overwrite usually means two modules picked the same name by accident.
    """

    def decorator(factory: ModelFactory) -> ModelFactory:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            warnings.warn(
                f"model {name!r} is already registered; the new factory replaces it",
                stacklevel=2,
            )
        _REGISTRY[name] = factory
        return factory

    return decorator


def is_model(name: str) -> bool:
    """True when ``name`` is a registered model."""
    return name in _REGISTRY


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted registered names, optionally filtered by an fnmatch pattern such as ``"resnet*"``."""
    names = sorted(_REGISTRY)
    if pattern is None:
        return names
    return [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def get_model_factory(name: str) -> ModelFactory:
    """The factory registered as ``name``; an unknown name lists the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = list_models()
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownNameError(
            f"unknown model {name!r}.{hint} Known models: {', '.join(known) or '(none)'}."
        ) from None


def create_model(
    name: str,
    *,
    in_channels: int = 3,
    num_classes: int = 10,
    width: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build the registered model ``name``.

    ``width`` is the channel count of the first stage; each architecture documents
    how later stages scale from it. ``None`` means the architecture's standard
    width (64 for the ResNets and VGG, 32 for MobileNetV2, whose standard stem is
    32 channels), so ``create_model("mobilenetv2")`` is the standard network.
    Raises :class:`UnknownNameError` with the known names and close matches when
    ``name`` is not registered.
    """
    factory = get_model_factory(name)
    if in_channels < 1 or num_classes < 1 or (width is not None and width < 1):
        raise ValueError(
            "in_channels, num_classes and width must all be positive, got "
            f"in_channels={in_channels}, num_classes={num_classes}, width={width}"
        )
    if width is not None:
        kwargs["width"] = width
    return factory(in_channels=in_channels, num_classes=num_classes, **kwargs)
