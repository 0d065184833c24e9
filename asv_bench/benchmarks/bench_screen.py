"""``afpx screen`` against ranking the same sets one by one with ``rank_table``.

Timed, in-process on the synchronous scheduler with the built-in library
loaded (its enumeration plans built by a first screen): all 10 binaries of
Li, Mn, Ge, O, Si (top 50) screened into a zarr store, against the baseline
measured in the same run — :func:`afpx.rank.rank_table` called on each set
in a loop, results kept in memory. The ratio is the screen's own overhead
(Dask tasks, zarr writes of every chunk, done flags). Parallel speed (sets
per second on 1 and 2 worker processes) is measured by
``scripts/measure_screen.py``.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path
from typing import ClassVar

import dask

from afpx import AfpxWarning
from afpx.rank import load_library, rank_table
from afpx.screen import element_sets, screen
from afpx.templates import TemplateLibrary

ELEMENTS = ["Li", "Mn", "Ge", "O", "Si"]


class Screen:
    """Ten binaries: ``screen`` (zarr store) against a ``rank_table`` loop."""

    params: ClassVar[list[int]] = [1, 5]
    param_names: ClassVar[list[str]] = ["batch_size"]
    timeout = 600

    def setup(self, batch_size: int) -> None:
        warnings.simplefilter("ignore", AfpxWarning)
        self.library: TemplateLibrary = load_library(None)
        self.tmp = Path(tempfile.mkdtemp())
        self.n = 0
        self.time_screen(batch_size)  # builds the plans of the binaries

    def teardown(self, batch_size: int) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def time_screen(self, batch_size: int) -> None:
        self.n += 1
        with dask.config.set(scheduler="synchronous"):
            screen(
                ELEMENTS,
                2,
                self.tmp / f"s{self.n}.zarr",
                library=self.library,
                batch_size=batch_size,
            )

    def time_rank_table_loop(self, batch_size: int) -> None:
        for symbols in element_sets(ELEMENTS, 2):
            rank_table(list(symbols), library=self.library, top=50)
