"""afpx: crystal structure prediction from multi-perspective atomic fingerprints.

A re-implementation, on open data, of Ryan, Lengyel and Shatruk, "Crystal
Structure Prediction via Deep Learning", J. Am. Chem. Soc. 2018, 140, 10158.

Importing :mod:`afpx` is cheap: heavy dependencies (torch, pymatgen, dask) are
imported by the modules that need them.
"""

from __future__ import annotations

from typing import Any

from afpx._version import __version__


class AfpxWarning(UserWarning):
    """Base class of every warning afpx emits (errors in afpx's own tests)."""


class AfpxError(Exception):
    """An error in user input or data that afpx explains in its message."""


_LAZY = {
    "open_cube": ("afpx.cube", "open_cube"),
    "build_cube": ("afpx.cube", "build_cube"),
    "rank": ("afpx.rank", "rank"),
}


def __getattr__(name: str) -> Any:
    # Lazy top-level API so that ``import afpx`` does not import the stack.
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'afpx' has no attribute {name!r}")


__all__ = ["AfpxError", "AfpxWarning", "__version__", "build_cube", "open_cube", "rank"]
