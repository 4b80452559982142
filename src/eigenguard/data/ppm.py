"""A minimal PPM (P6 binary, P3 ascii) reader, enough for the GTSRB images."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from ..errors import CorruptDataError

__all__ = ["read_ppm", "decode_ppm"]

_WHITESPACE = b" \t\r\n\v\f"
_COMMENT = re.compile(rb"#[^\r\n]*")
_INT = re.compile(rb"\d+")


def _header(data: bytes, source: str) -> tuple[bytes, int, int, int, int]:
    """Parse magic, width, height and maxval; return them and where the raster starts."""
    magic = data[:2]
    if magic not in (b"P6", b"P3"):
        raise CorruptDataError(
            f"{source}: starts with {magic!r}, not a P6/P3 PPM header; re-download it"
        )
    pos, fields = 2, []
    while len(fields) < 3:
        if pos >= len(data):
            raise CorruptDataError(f"{source}: PPM header ends early; re-download it")
        c = data[pos : pos + 1]
        if c in _WHITESPACE:
            pos += 1
        elif c == b"#":
            end = data.find(b"\n", pos)
            pos = len(data) if end < 0 else end + 1
        else:
            m = _INT.match(data, pos)
            if m is None:
                raise CorruptDataError(
                    f"{source}: unexpected {c!r} in the PPM header; re-download it"
                )
            fields.append(int(m.group()))
            pos = m.end()
    width, height, maxval = fields
    if width <= 0 or height <= 0 or not 0 < maxval < 256:
        raise CorruptDataError(
            f"{source}: PPM header gives {width}×{height} with maxval {maxval}; "
            "only 8-bit images of positive size are supported; re-download it"
        )
    # One whitespace byte separates the header from the raster.
    if pos >= len(data) or data[pos : pos + 1] not in _WHITESPACE:
        raise CorruptDataError(f"{source}: no raster after the PPM header; re-download it")
    return magic, width, height, maxval, pos + 1


def decode_ppm(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode PPM bytes into an H×W×3 uint8 array (scaled to 0..255 if maxval < 255)."""
    magic, width, height, maxval, start = _header(data, source)
    count = width * height * 3
    if magic == b"P6":
        available = min(count, len(data) - start)
        raster = np.frombuffer(data, dtype=np.uint8, count=available, offset=start)
    else:
        tokens = _COMMENT.sub(b" ", data[start:]).split()
        try:
            raster = np.array([int(t) for t in tokens[:count]], dtype=np.int64)
        except ValueError as exc:
            raise CorruptDataError(f"{source}: non-numeric P3 sample ({exc}); re-download it") from exc
        if raster.size and raster.max() > maxval:
            raise CorruptDataError(f"{source}: sample above maxval {maxval}; re-download it")
    if raster.size < count:
        raise CorruptDataError(
            f"{source}: header says {width}×{height} RGB ({count} samples) "
            f"but only {raster.size} follow; the file is truncated, re-download it"
        )
    if maxval != 255:
        raster = (raster.astype(np.float64) * (255.0 / maxval)).round()
    return raster.astype(np.uint8).reshape(height, width, 3)


def read_ppm(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a PPM file into an H×W×3 uint8 array."""
    path = Path(path)
    return decode_ppm(path.read_bytes(), str(path))
