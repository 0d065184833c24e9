"""The engine's raw result: best candidate per (template, counts), as arrays."""

from __future__ import annotations

from collections.abc import Sequence
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

    @classmethod
    def concat(cls, parts: Sequence[CandidateResult], k: int) -> CandidateResult:
        """The rows of ``parts`` one after the other (work counters summed)."""
        if not parts:
            return cls(
                np.zeros(0, np.int64),
                np.zeros((0, k), np.int64),
                np.zeros(0),
                np.zeros(0, np.int8),
                None,
            )
        assign = None
        if all(p.assignment is not None for p in parts):
            width = max(p.assignment.shape[1] for p in parts if p.assignment is not None)
            assign = np.full((sum(p.template.size for p in parts), width), -1, dtype=np.int8)
            row = 0
            for p in parts:
                assert p.assignment is not None
                assign[row : row + p.template.size, : p.assignment.shape[1]] = p.assignment
                row += p.template.size
        return cls(
            np.concatenate([p.template for p in parts]),
            np.concatenate([p.counts for p in parts]).reshape(-1, k),
            np.concatenate([p.log_score for p in parts]),
            np.concatenate([p.method for p in parts]),
            assign,
            n_bruteforce=sum(p.n_bruteforce for p in parts),
            n_dp_updates=sum(p.n_dp_updates for p in parts),
        )

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
