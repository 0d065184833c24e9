"""Enumerate only the templates that can reach the top rows of a ranking, and stay exact.

For the first ``top`` rows of a ranking, a template matters only when some
candidate of it could score at least as well as those rows. Every template
has a cheap upper bound on its candidates' scores
(:func:`~afpx.templates.candidates.upper_bounds`), so:

1. enumerate the templates of highest bound until ``top`` compositions are
   found; the ``top``-th best score found, ``theta``, is at most the true
   ``top``-th best (found scores are lower bounds of the true best scores);
2. enumerate every template whose bound reaches the cut-off
   ``theta - tie width``: every composition scoring at least the cut-off is
   then known with its exact best score, and every composition above it
   (the rows shown and every row better than them) is among them;
3. the tie group of the last row shown must be whole: when it reaches down
   to the cut-off, lower the cut-off below it and repeat step 2.

The ranks of the rows shown count only better and tied compositions, all of
which are known exactly; the number of compositions and the templates that
can take each composition come from the score-free census
(:mod:`afpx.templates.census`). Options that drop candidates by score
(``min_likelihood``, ``min_site_likelihood``) or per template
(``exclude_own_formula``) change what the census counts, so with them
:func:`top_candidates` declines and the caller enumerates everything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import numpy as np

from afpx.templates.candidates import (
    CandidateOptions,
    enumerate_candidates,
    select_templates,
    upper_bounds,
)
from afpx.templates.census import Census, census
from afpx.templates.compositions import reduce_compositions
from afpx.templates.plan import site_log_likelihood
from afpx.templates.result import CandidateResult
from afpx.templates.ties import tie_ranks, tie_width

if TYPE_CHECKING:
    from afpx.templates.library import TemplateLibrary

__all__ = ["TopCandidates", "prunable", "top_candidates"]

#: Templates of highest bound enumerated first: at least this many, and
#: :data:`PER_ROW` per row asked for.
FIRST_BATCH: Final = 256
PER_ROW: Final = 4


@dataclass(frozen=True, eq=False)
class TopCandidates:
    """Candidates that decide the first rows of a ranking, with the census for the rest.

    Attributes
    ----------
    result : CandidateResult
        Every enumerated candidate whose composition's best score reaches
        ``cutoff`` (those compositions' best scores are exact).
    selected : ndarray of shape (T,), int64
        Templates the options allow.
    enumerated : int
        How many of them were enumerated.
    cutoff : float
        Every composition scoring at least this is in ``result``.
    census : Census
    """

    result: CandidateResult
    selected: np.ndarray
    enumerated: int
    cutoff: float
    census: Census

    @property
    def n_compositions(self) -> int:
        """Distinct reduced compositions over all selected templates (exact)."""
        return self.census.n_compositions(self.selected)

    @property
    def n_candidates(self) -> int:
        """Candidates over all selected templates (exact)."""
        return self.census.n_candidates(self.selected)

    def n_templates(self, counts: np.ndarray) -> np.ndarray:
        """Selected templates that can take each composition of ``counts`` (n, k)."""
        return self.census.n_templates(self.selected, counts)


def prunable(opts: CandidateOptions) -> bool:
    """Whether the options leave the census exact (see the module docstring)."""
    return (
        opts.min_likelihood is None
        and opts.min_site_likelihood is None
        and not opts.exclude_own_formula
    )


def top_candidates(
    library: TemplateLibrary,
    zs: np.ndarray,
    opts: CandidateOptions,
    *,
    top: int,
    tie_tolerance: float,
) -> TopCandidates | None:
    """The candidates that decide the first ``top`` rows of the ranking of ``zs``.

    Returns None when pruning cannot help or cannot stay exact: options that
    filter by score, a census that cannot be coded, or ``top`` at least the
    number of compositions.
    """
    k = int(zs.size)
    if not prunable(opts) or top < 1:
        return None
    cen = census(library, k)
    if cen is None:
        return None
    selected = select_templates(library, k, opts)
    if top >= cen.n_compositions(selected):
        return None
    logl = site_log_likelihood(library, zs, None)
    if not np.isfinite(logl).all():
        return None
    ub = upper_bounds(logl, library, selected)
    order = np.argsort(-ub, kind="stable")
    neg_ub = -ub[order]  # ascending
    parts: list[CandidateResult] = []
    done = 0
    want = min(selected.size, max(FIRST_BATCH, PER_ROW * top))
    cutoff = np.inf
    while True:
        if want > done:
            batch = np.sort(selected[order[done:want]])
            parts.append(
                enumerate_candidates(library, zs, batch, opts, assignments=False, cache=False)
            )
            done = want
        res = CandidateResult.concat(parts, k)
        inverse, unique = reduce_compositions(res.counts)
        best = np.full(unique.shape[0], -np.inf)
        np.maximum.at(best, inverse, res.log_score)
        if done == selected.size:
            cutoff = -np.inf  # everything enumerated
            break
        if best.size < top:
            want = min(selected.size, 2 * done)
            continue
        ranked = np.sort(best)[::-1]
        if not np.isfinite(cutoff):
            theta = float(ranked[top - 1])
            cutoff = theta - tie_width(theta, tie_tolerance)
        need = int(np.searchsorted(neg_ub, -cutoff, side="right"))  # bounds >= cutoff
        if need > done:
            want = need
            continue
        # every composition scoring >= cutoff is known exactly; is the last row's group whole?
        known = ranked[ranked >= cutoff]
        group = tie_ranks(known, tolerance=tie_tolerance).group  # known is sorted
        last = int(np.flatnonzero(group == group[top - 1])[-1])
        low = float(known[last])
        if last + 1 < known.size or low - cutoff >= tie_width(low, tie_tolerance):
            break
        cutoff = low - 2.0 * tie_width(low, tie_tolerance) - np.spacing(abs(low))
    keep = np.flatnonzero(best[inverse] >= cutoff)
    return TopCandidates(res.take(keep), selected, done, float(cutoff), cen)
