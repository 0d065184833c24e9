"""The engine's raw result: best candidate per (template, counts), as arrays."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

import numpy as np

from afpx.templates.compositions import scale_rows

if TYPE_CHECKING:
    from afpx.templates.library import TemplateLibrary

__all__ = ["CandidateResult", "DeferredAssignments"]


class _Backtrackable(Protocol):
    def assignments(self, rows: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True, eq=False)
class DeferredAssignments:
    """Assignments of an enumeration's candidates, worked out when asked for.

    Part ``i`` serves the enumeration's rows ``starts[i]:starts[i + 1]``:
    an int8 array of their assignments (brute force knows them all at no
    cost), or the kept tables of a block of the programme
    (:class:`~afpx.templates.maxplus.KeptTables`), which backtracks only
    the rows asked for. ``origin`` maps the rows of a filtered result back
    to the enumeration's.
    """

    starts: np.ndarray  # (n_parts + 1,) int64
    parts: tuple[np.ndarray | _Backtrackable, ...]
    origin: np.ndarray | None = None

    def take(self, idx: np.ndarray) -> DeferredAssignments:
        """The same for the rows ``idx`` of the result (as :meth:`CandidateResult.take`)."""
        idx = np.asarray(idx, dtype=np.int64)
        return replace(self, origin=idx if self.origin is None else self.origin[idx])

    def __call__(self, rows: np.ndarray, width: int) -> np.ndarray:
        """(len(rows), width) int8: index into the elements per unique site, -1 padding."""
        rows = np.asarray(rows, dtype=np.int64)
        src = rows if self.origin is None else self.origin[rows]
        out = np.full((rows.size, width), -1, dtype=np.int8)
        part = np.searchsorted(self.starts, src, side="right") - 1
        for i in np.unique(part).tolist():
            sel = np.flatnonzero(part == i)
            local = src[sel] - self.starts[i]
            p = self.parts[i]
            a = p[local] if isinstance(p, np.ndarray) else p.assignments(local)
            w = min(a.shape[1], width)  # beyond a template's sites: padding only
            out[sel, :w] = a[:, :w]
        return out


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
    deferred: DeferredAssignments | None = None  # see enumerate_candidates(keep_tables=)

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
            None if self.deferred is None else self.deferred.take(idx),
        )

    def cell_counts(self, library: TemplateLibrary, rows: np.ndarray | None = None) -> np.ndarray:
        """(N, k) int64 atoms of each element in the template's cell (of ``rows`` if given)."""
        counts = self.counts if rows is None else self.counts[rows]
        g = library.reduced_multiplicities[0][
            self.template if rows is None else self.template[rows]
        ]
        return scale_rows(counts, g)
