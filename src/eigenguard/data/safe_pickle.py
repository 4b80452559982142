"""Unpickling for CIFAR batches that cannot run code.

A pickle may name any importable callable and have it called while loading;
a CIFAR batch only ever needs numpy's array reconstruction, so everything
else is refused before it is imported.
"""

from __future__ import annotations

import codecs
import io
import pickle
from typing import Any

import numpy as np

from ..errors import CorruptDataError

__all__ = ["restricted_load"]

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct


def _dtype(*args: Any) -> np.dtype:
    """``numpy.dtype`` minus object dtypes, which would hold arbitrary Python objects."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError(f"object dtype {dtype} is not allowed")
    return dtype


def _latin1_encode(text: str = "", encoding: str = "latin1", *rest: Any) -> bytes:
    """How Python 3 spells a ``bytes`` value at pickle protocol 2; only latin-1 is needed."""
    if rest or not isinstance(text, str) or codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError("only _codecs.encode(text, 'latin1') is allowed")
    return text.encode("latin1")


def _empty_bytes(*args: Any) -> bytes:
    """How Python 3 spells ``b''`` at protocol 2."""
    if args:
        raise pickle.UnpicklingError("only bytes() with no arguments is allowed")
    return b""


# (module, name) -> the object handed back. The real files (pickled by Python 2)
# use numpy.core.*; files re-pickled under numpy 2 use numpy._core.*; files
# written by Python 3 at protocol 2 spell their bytes values with _codecs.encode.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _latin1_encode,
    ("builtins", "bytes"): _empty_bytes,
    ("__builtin__", "bytes"): _empty_bytes,
}


class _CifarUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, source: str) -> None:
        super().__init__(file, encoding="bytes")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise CorruptDataError(
                f"refusing to load {self._source}: the file asks for {module}.{name}, "
                "which a CIFAR batch never contains"
            ) from None


def restricted_load(data: bytes, source: str) -> Any:
    """Unpickle ``data`` (read from ``source``, named in errors) with the allow-list."""
    try:
        return _CifarUnpickler(io.BytesIO(data), source).load()
    except CorruptDataError:
        raise
    except Exception as exc:  # truncated or garbled pickles raise many types
        raise CorruptDataError(
            f"{source} is not a readable CIFAR batch ({type(exc).__name__}: {exc}); "
            "re-download and unpack it"
        ) from exc
