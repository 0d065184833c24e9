"""The only module that knows about CuPy.

Kernels are written against an array namespace ``xp`` (numpy or cupy) obtained
from :func:`get_array_namespace`; nothing else in afpx imports CuPy.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from afpx import AfpxError

DEVICES = ("cpu", "cuda")


def cupy_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        import cupy
    except ImportError:
        return False
    try:
        return bool(cupy.cuda.runtime.getDeviceCount() > 0)
    except Exception:  # CUDA driver missing or broken
        return False


def namespace_for_device(device: str) -> ModuleType:
    """Return numpy for ``"cpu"`` and cupy for ``"cuda"``, with a clear error."""
    if device == "cpu":
        return np
    if device == "cuda":
        try:
            import cupy
        except ImportError as exc:
            raise AfpxError(
                "device 'cuda' needs CuPy: install it with `pip install afpx[gpu]` "
                "(or the cupy-cudaXXx wheel matching your CUDA), or use --device cpu"
            ) from exc
        if not cupy_available():
            raise AfpxError(
                "device 'cuda': CuPy is installed but sees no CUDA device; use --device cpu"
            )
        return cupy
    raise AfpxError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")


def get_array_namespace(*arrays: Any) -> ModuleType:
    """The namespace (numpy or cupy) of the given arrays; numpy for none."""
    for a in arrays:
        if type(a).__module__.split(".")[0] == "cupy":
            import cupy

            return cupy
    return np


def to_numpy(a: Any) -> np.ndarray:
    """Bring an array to host memory as numpy."""
    if type(a).__module__.split(".")[0] == "cupy":
        return a.get()
    return np.asarray(a)
