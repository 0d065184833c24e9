"""The engine's raw result: best candidate per (template, counts), as arrays."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from afpx.templates.compositions import scale_rows

if TYPE_CHECKING:
    from afpx.templates.library import TemplateLibrary

__all__ = ["CandidateResult"]


@dataclass
class CandidateResult:
    """Best candidate of every (template, counts) found, one row each."""

    template: np.ndarray  # (N,) int64
    counts: np.ndarray  # (N, k) int64, in units of the template's multiplicity gcd
    log_score: np.ndarray  # (N,) float64
    method: np.ndarray  # (N,) int8
    assignment: np.ndarray | None  # (N, width) int8, library site order
    n_bruteforce: int = 0
    n_dp_updates: int = 0

    def take(self, idx: np.ndarray) -> CandidateResult:
        return CandidateResult(
            self.template[idx],
            self.counts[idx],
            self.log_score[idx],
            self.method[idx],
            None if self.assignment is None else self.assignment[idx],
            self.n_bruteforce,
            self.n_dp_updates,
        )

    def cell_counts(self, library: TemplateLibrary, rows: np.ndarray | None = None) -> np.ndarray:
        """(N, k) int64 atoms of each element in the template's cell (of ``rows`` if given)."""
        counts = self.counts if rows is None else self.counts[rows]
        g = library.reduced_multiplicities[0][
            self.template if rows is None else self.template[rows]
        ]
        return scale_rows(counts, g)
