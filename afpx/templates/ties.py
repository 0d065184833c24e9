"""The one tie rule of afpx: tie groups of scores and the ranks they give.

Scores are log-likelihoods (higher is better). Sorted in decreasing order,
two consecutive scores ``a >= b`` belong to one tie group when
``a - b <= tolerance * max(1, |a|)`` (:func:`tie_width`); groups chain. Every
item gets

* ``rank`` — the mid-rank, 1 + (number better) + (number of others tied) / 2;
* ``optimistic`` — 1 + (number better);
* ``pessimistic`` — (number better) + (size of its tie group).

``afpx rank``, Test 1, Test 2 and the case study all use this rule.
"""

from __future__ import annotations

from typing import Final, NamedTuple

import numpy as np

from afpx import AfpxError

__all__ = ["DEFAULT_TIE_TOLERANCE", "TIE_RULE", "TieRanks", "tie_ranks", "tie_width"]

#: Log-scores closer than this (relative to max(1, |score|)) are tied.
DEFAULT_TIE_TOLERANCE: Final = 1e-9

TIE_RULE: Final = (
    "rank = 1 + better + (tied - 1) / 2 (mid-rank); rank_optimistic = 1 + better; "
    "rank_pessimistic = better + tied; scores within {tol:g} x max(1, |log score|) are tied; "
    "tied rows are listed by formula for display only"
)


class TieRanks(NamedTuple):
    """Tie-aware ranks of n scores (see the module docstring)."""

    rank: np.ndarray  # (n,) float64 mid-rank
    optimistic: np.ndarray  # (n,) int64
    pessimistic: np.ndarray  # (n,) int64
    group: np.ndarray  # (n,) int64 tie group, 0 for the best, in decreasing score


def tie_width(score: float, tolerance: float = DEFAULT_TIE_TOLERANCE) -> float:
    """How far below (or above) ``score`` another score still ties with it.

    ``tolerance * max(1, |score|)``; 0 for an infinite score (``-inf`` ties
    only with ``-inf``).
    """
    if not np.isfinite(score):
        return 0.0
    return float(tolerance * max(1.0, abs(float(score))))


def tie_ranks(log_score: np.ndarray, *, tolerance: float = DEFAULT_TIE_TOLERANCE) -> TieRanks:
    """Tie-aware 1-based ranks of scores (higher is better).

    Parameters
    ----------
    log_score : ndarray of shape (n,), float
        ``-inf`` allowed (ties with ``-inf`` only); NaN is refused.
    tolerance : float
        Consecutive sorted scores ``a >= b`` with ``a - b <= tolerance *
        max(1, |a|)`` belong to one tie group.

    Returns
    -------
    TieRanks
        ``rank`` (mid-rank), ``optimistic``, ``pessimistic``, ``group``. The
        result does not depend on the order of the input.

    Examples
    --------
    >>> r = tie_ranks(np.array([0.0, -1.0, 0.0, -3.0]))
    >>> r.rank.tolist(), r.optimistic.tolist(), r.pessimistic.tolist()
    ([1.5, 3.0, 1.5, 4.0], [1, 3, 1, 4], [2, 3, 2, 4])
    """
    s = np.asarray(log_score, dtype=np.float64)
    if s.ndim != 1:
        raise AfpxError(f"scores must be one-dimensional, got shape {s.shape}")
    n = s.size
    if n == 0:
        e = np.zeros(0, dtype=np.int64)
        return TieRanks(np.zeros(0), e, e, e)
    if np.isnan(s).any():
        raise AfpxError("scores contain NaN; ranks are undefined")
    order = np.argsort(-s, kind="stable")
    ss = s[order]
    finite = np.isfinite(ss[:-1]) & np.isfinite(ss[1:])
    with np.errstate(invalid="ignore"):  # inf - inf where not finite (masked below)
        gap = ss[:-1] - ss[1:]
    scale = np.maximum(1.0, np.abs(np.where(np.isfinite(ss[:-1]), ss[:-1], 0.0)))
    new = np.where(finite, gap > tolerance * scale, ss[:-1] != ss[1:])
    group_sorted = np.concatenate([[0], np.cumsum(new)]).astype(np.int64)
    sizes = np.bincount(group_sorted)
    better = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    group = np.empty(n, dtype=np.int64)
    group[order] = group_sorted
    optimistic = (better[group] + 1).astype(np.int64)
    pessimistic = (better[group] + sizes[group]).astype(np.int64)
    rank = better[group] + (sizes[group] + 1) / 2.0
    return TieRanks(rank, optimistic, pessimistic, group)
