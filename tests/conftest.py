"""Shared fixtures and reusable physics assertions."""

from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


@pytest.fixture
def data_dir() -> Path:
    """Folder of test inputs (real COD CIFs under their ids, made-up bad files)."""
    return DATA
