"""Brute force: every surjective assignment of k elements to a template's sites.

:func:`surjections` lists the assignments; :func:`bruteforce_group` and
:func:`bruteforce_best` give the best candidate of every (template, counts) of
a group of templates with the same number of sites, vectorised;
:func:`assignment_tables` serves the thresholded and counting variants
(:mod:`afpx.templates.counting`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Final

import numpy as np

from afpx.templates.compositions import RowFilter
from afpx.templates.result import CandidateResult

__all__ = [
    "COUNT_BF_MAX_ASSIGNMENTS",
    "BruteForceGroup",
    "assignment_tables",
    "bruteforce_best",
    "bruteforce_group",
    "bruteforce_limit",
    "surjections",
]

#: Templates with at most this many assignments are enumerated outright by the
#: thresholded and counting variants (:mod:`afpx.templates.counting`).
COUNT_BF_MAX_ASSIGNMENTS: Final = 8192


@functools.lru_cache(maxsize=64)
def surjections(k: int, n: int) -> np.ndarray:
    """Every assignment of k elements to n sites that uses each element.

    Returns
    -------
    ndarray of shape (n_assignments, n), int8
        Element index (0..k-1) per site, in lexicographic order.
    """
    if k == 1:
        grid = np.zeros((1, n), dtype=np.int8)
    else:
        grid = np.indices((k,) * n, dtype=np.int8).reshape(n, -1).T
    used = np.zeros((grid.shape[0], k), dtype=bool)
    for j in range(n):
        used[np.arange(grid.shape[0]), grid[:, j]] = True
    out = np.ascontiguousarray(grid[used.all(axis=1)])
    out.flags.writeable = False
    return out


@functools.lru_cache(maxsize=64)
def assignment_tables(k: int, n: int, base: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Surjections, their one-hot matrix (n k, A) and per-site count weights (A, n)."""
    A = surjections(k, n).astype(np.int64)
    onehot = np.zeros((n, k, A.shape[0]))
    onehot[np.arange(n)[None, :], A, np.arange(A.shape[0])[:, None]] = 1.0
    # weight of site j in the code of the counts of elements 0..k-2 (element k-1: none)
    powers = np.asarray([base ** (k - 2 - e) for e in range(k - 1)] + [0], dtype=np.int64)
    weight = powers[A]
    for arr in (A, onehot, weight):
        arr.flags.writeable = False
    return A, onehot.reshape(n * k, A.shape[0]), weight


def bruteforce_limit(k: int) -> int:
    """Largest number of unique sites whose k**n assignments are enumerated outright."""
    if k <= 1:
        return 1 << 30
    return math.floor(math.log(COUNT_BF_MAX_ASSIGNMENTS) / math.log(k) + 1e-9)


# =============================================================================
@dataclass(frozen=True, eq=False)
class BruteForceGroup:
    """Templates with ``n`` sites each, enumerated outright.

    The composition of every assignment depends on multiplicities only, so
    the grouping of assignments by (template, counts) is precomputed:
    ``perm`` lists the flat (template, assignment) indices sorted by
    (template, counts), ``seg_start`` starts each (template, counts) segment.
    """

    templates: np.ndarray  # (T,)
    rows: np.ndarray  # (T, n) library site rows
    assign: np.ndarray  # (A, n) int8
    perm: np.ndarray  # (T * A,) int64
    seg_start: np.ndarray  # (n_seg,) int64
    seg_template: np.ndarray  # (n_seg,) int64, local template index
    seg_counts: np.ndarray  # (n_seg, k) int64, reduced multiplicity units


def bruteforce_group(
    mr: np.ndarray, start: np.ndarray, total: np.ndarray, templates: np.ndarray, n: int, k: int
) -> BruteForceGroup:
    A = surjections(k, n)
    n_assign = A.shape[0]
    T = templates.size
    rows = start[templates][:, None] + np.arange(n)[None, :]
    m = mr[rows]
    counts = np.stack([(m[:, None, :] * (A[None, :, :] == e)).sum(axis=2) for e in range(k)], -1)
    # lexicographic code of (c_0, ..., c_{k-2}); c_{k-1} is the rest
    B = int(total[templates].max()) + 1
    d = k - 1
    weights = np.asarray([B ** (d - 1 - e) for e in range(d)], dtype=np.int64)
    code = counts[:, :, :d] @ weights if d else np.zeros((T, n_assign), dtype=np.int64)
    key = (np.arange(T)[:, None] * B**d + code).ravel()
    perm = np.argsort(key, kind="stable")
    sk = key[perm]
    seg_start = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
    first = perm[seg_start]
    return BruteForceGroup(
        templates=templates,
        rows=rows,
        assign=A,
        perm=perm,
        seg_start=seg_start,
        seg_template=first // n_assign,
        seg_counts=counts.reshape(T * n_assign, k)[first],
    )


def bruteforce_best(
    logl: np.ndarray,
    grp: BruteForceGroup,
    k: int,
    *,
    assignments: bool,
    only: RowFilter | None = None,
) -> CandidateResult:
    """Enumerate every surjective assignment of a group of templates.

    ``only`` (library templates, counts in reduced units) keeps just those candidates.
    """
    A = grp.assign
    T, n = grp.rows.shape
    L = logl[grp.rows]  # (T, n, k)
    # sequential sum over sites: the same additions, in the same order, as the programme
    score = np.zeros((T, A.shape[0]))
    for s in range(n):
        score += L[:, s, :][:, A[:, s]]
    flat = score.ravel()[grp.perm]
    best = np.maximum.reduceat(flat, grp.seg_start)
    seg_len = np.diff(np.r_[grp.seg_start, flat.size])
    # the first assignment (in enumeration order) reaching each segment's maximum
    pos = np.flatnonzero(flat == np.repeat(best, seg_len))
    seg_of = np.repeat(np.arange(grp.seg_start.size), seg_len)[pos]
    first = pos[np.r_[True, seg_of[1:] != seg_of[:-1]]]
    ok = np.isfinite(best)
    if only is not None:
        ok &= only.contains(grp.templates[grp.seg_template], grp.seg_counts)
    a = grp.perm[first[ok]] % A.shape[0]
    tl = grp.seg_template[ok]
    return CandidateResult(
        template=grp.templates[tl],
        counts=grp.seg_counts[ok],
        log_score=best[ok],
        method=np.zeros(tl.size, dtype=np.int8),
        assignment=A[a] if assignments else None,
        n_bruteforce=T * A.shape[0],
    )
