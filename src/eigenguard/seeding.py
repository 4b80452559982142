"""Independent random streams from one seed.

A run draws several kinds of randomness (the train/validation/reserve split, the poisoned samples,
the epoch order, the augmentations, the weights' initialisation, the mixed-protocol batches).
Deriving them as offsets of one seed (seed, seed + 1, ...) makes the poison set of seed s + 1 the
same draw as the epoch order of seed s. Here every stream is a child of
``numpy.random.SeedSequence(seed)`` with its own spawn key, named by its purpose, so streams of
one seed and streams of different seeds are independent, and adding a stream shifts no other.
"""
from __future__ import annotations

import zlib

import numpy
import torch


def stream_seed(seed: int, name: str) -> int:
    """A 63-bit integer seed for the stream ``name`` of ``seed`` (the same on every machine)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, numpy.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    sequence = numpy.random.SeedSequence(int(seed), spawn_key=(zlib.crc32(name.encode()),))
    return int(sequence.generate_state(1, numpy.uint64)[0] >> numpy.uint64(1))


def generator(seed: int, name: str) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`stream_seed`."""
    return torch.Generator().manual_seed(stream_seed(seed, name))
