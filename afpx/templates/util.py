"""Small shared helpers of the template engine: element symbols, index ranges, JSON attrs."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from afpx import AfpxError, schema
from afpx.templates.elements import SYMBOLS

__all__ = ["check_elements", "element_symbol", "element_symbols", "index_ranges", "jsonable"]


def element_symbols() -> tuple[str, ...]:
    """The 118 element symbols, ``element_symbols()[z - 1]`` for atomic number z."""
    return SYMBOLS


def element_symbol(z: int) -> str:
    """Symbol of atomic number ``z``."""
    return element_symbols()[z - 1]


def check_elements(elements: Sequence[int]) -> np.ndarray:
    """Distinct atomic numbers as an int64 array; :class:`AfpxError` otherwise."""
    zs = np.asarray(list(elements))
    if zs.ndim != 1 or zs.size < 1:
        raise AfpxError("give at least one element")
    if not np.issubdtype(zs.dtype, np.integer):
        raise AfpxError(f"elements must be atomic numbers (int), got {list(elements)!r}")
    zs = zs.astype(np.int64)
    if zs.min() < 1 or zs.max() > schema.N_ELEMENTS:
        raise AfpxError(f"atomic numbers must lie in 1..{schema.N_ELEMENTS}, got {zs.tolist()}")
    if np.unique(zs).size != zs.size:
        raise AfpxError(f"repeated element in {zs.tolist()}")
    if zs.size > 127:
        raise AfpxError("at most 127 elements per set")
    return zs


def index_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(s, s + n)`` for each (start, length) pair."""
    starts = np.asarray(starts, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    return np.arange(total, dtype=np.int64) + offsets


def jsonable(value: Any) -> Any:
    """A JSON-able copy of attrs (numpy scalars and arrays become Python values)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)
