"""The paper's tests: Test 1, Test 2, softmax error rate, confusion matrix, baselines.

Layers, as everywhere in afpx:

* **kernels** (numpy in, numpy out): :func:`tie_ranks`, :func:`optimality_score`,
  :func:`count_assignments`, :func:`confusion_counts`, :func:`error_rate`,
  :func:`likelihood_histogram`;
* **orchestration** on a :class:`~afpx.templates.TemplateLibrary` and the cube:
  :func:`test1`, :func:`test2`, :func:`confusion_matrix`,
  :func:`likelihood_histograms`, :func:`evaluate`;
* the CLI ``afpx evaluate`` (:mod:`afpx.commands.evaluate`) writes the report.

Conventions (see docs/evaluation.md for the full definitions):

* scores are log-likelihoods (sum of log site likelihoods over unique sites);
  higher is better; two scores within ``tie_tolerance`` are tied;
* ranks are 1-based; the **mid-rank** of an item is
  1 + (number strictly better) + (number of *other* items tied) / 2, the
  **optimistic** rank 1 + better, the **pessimistic** rank 1 + better + tied.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from afpx import AfpxError, schema

if TYPE_CHECKING:
    pass

# -- names of the report's dimensions and variables (report store, not the cube) --
TRUE_ELEMENT: Final = "true_element"
PREDICTED_ELEMENT: Final = "predicted_element"
MODEL: Final = "model"
KIND: Final = "kind"  # "true" / "other" element in the likelihood histograms
LIKELIHOOD_BIN: Final = "likelihood_bin"
TEST1_STRUCTURE: Final = "test1_structure"
TEST2_SET: Final = "test2_set"
VARIANT: Final = "variant"  # Test 2 with all templates / without the candidate's own formula

#: Test 2 variants: every template, or no template whose own reduced formula
#: equals the candidate's composition (no structure votes for its own composition).
VARIANTS: Final = ("all_templates", "no_own_formula")


@dataclass(frozen=True)
class EvaluateParams:
    """Parameters of an evaluation run (recorded in every report).

    Attributes
    ----------
    split : str
        The split whose structures (Test 1) and element sets (Test 2) are evaluated.
    set_sizes : tuple of int
        Sizes of the Test 2 element sets (the paper: binaries and ternaries).
    hit_k : tuple of int
        The k of hit@k.
    test1_cap : int
        Test 1 counts the candidates that beat or tie the true one exactly up
        to this many; beyond, the rank is reported as censored (at least
        ``test1_cap + 1``). Top-1 and top-10 rates are exact for any cap >= 10.
    test1_max_states : int
        Largest count grid (sites × remaining-count states) of the exact
        per-template counting DP; a template beyond it is counted by its best
        candidate only and flagged (see ``n_inexact`` in the report).
    tie_tolerance : float
        Two log-scores closer than this are tied.
    histogram_bins : int
        Bins of the likelihood histograms over [0, 1].
    baselines : tuple of str
        Baselines scored by the same code in the same run.
    case_study : tuple of tuple of str
        Element sets of the case study (the paper's Table 1).
    case_top : int
        Rows of each case-study ranking.
    """

    split: str = "test"
    set_sizes: tuple[int, ...] = (2, 3)
    hit_k: tuple[int, ...] = (1, 10)
    test1_cap: int = 1000
    test1_max_states: int = 5_000_000
    tie_tolerance: float = 1e-9
    histogram_bins: int = 50
    baselines: tuple[str, ...] = ("constant", "random", "frequency", "coordination")
    case_study: tuple[tuple[str, ...], ...] = (("Mn", "Ge"), ("Li", "Mn", "Ge"))
    case_top: int = 10

    def __post_init__(self) -> None:
        if self.split not in schema.SPLITS:
            raise AfpxError(
                f"unknown split {self.split!r}; choose one of {', '.join(schema.SPLITS)}"
            )
        if self.test1_cap < 10:
            raise AfpxError(
                f"test1_cap must be at least 10 (top-10 must be exact), got {self.test1_cap}"
            )
        if any(s < 1 for s in self.set_sizes) or any(k < 1 for k in self.hit_k):
            raise AfpxError("set_sizes and hit_k must be positive")

    def to_attrs(self) -> dict[str, Any]:
        """The parameters as a JSON-able dict."""
        d = asdict(self)
        return {k: ([list(v) for v in val] if k == "case_study" else val) for k, val in d.items()}


# =============================================================================
# kernels: ranks and the optimality score
# =============================================================================


def tie_ranks(
    scores: np.ndarray, *, tolerance: float = 1e-9
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mid, optimistic and pessimistic 1-based ranks, higher scores first.

    Parameters
    ----------
    scores : ndarray of shape (n,)
        Scores (e.g. log-likelihoods); higher is better. ``-inf`` is allowed.
    tolerance : float
        Scores closer than this (after sorting, chained) are tied.

    Returns
    -------
    mid : ndarray of shape (n,), float64
        1 + better + (tied others) / 2.
    optimistic : ndarray of shape (n,), int64
        1 + better.
    pessimistic : ndarray of shape (n,), int64
        1 + better + tied others.

    Notes
    -----
    The result does not depend on the order of the input: tied items get the
    same ranks.

    Examples
    --------
    >>> mid, opt, pes = tie_ranks(np.array([3.0, 1.0, 3.0, 2.0]))
    >>> mid.tolist(), opt.tolist(), pes.tolist()
    ([1.5, 4.0, 1.5, 3.0], [1, 4, 1, 3], [2, 4, 2, 3])
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise AfpxError(f"scores must be one-dimensional, got shape {s.shape}")
    n = s.size
    if np.isnan(s).any():
        raise AfpxError("scores contain NaN; ranks are undefined")
    order = np.argsort(-s, kind="stable")
    ss = s[order]
    # a new tie group starts where the sorted scores drop by more than the tolerance
    gap = np.ones(n, dtype=bool)
    if n > 1:
        with np.errstate(invalid="ignore"):  # -inf - -inf
            diff = ss[:-1] - ss[1:]
        both_inf = np.isneginf(ss[:-1]) & np.isneginf(ss[1:])
        gap[1:] = (diff > tolerance) & ~both_inf
    group = np.cumsum(gap) - 1
    starts = np.flatnonzero(gap)
    sizes = np.diff(np.append(starts, n))
    opt_sorted = starts[group] + 1
    pes_sorted = starts[group] + sizes[group]
    optimistic = np.empty(n, dtype=np.int64)
    pessimistic = np.empty(n, dtype=np.int64)
    optimistic[order] = opt_sorted
    pessimistic[order] = pes_sorted
    mid = 0.5 * (optimistic + pessimistic)
    return mid, optimistic, pessimistic


def known_positions(
    scores: np.ndarray, known: np.ndarray, *, tolerance: float = 1e-9
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions of the known items of a ranked list, three ways of breaking ties.

    Parameters
    ----------
    scores : ndarray of shape (n,)
        Scores of all n items; higher is better.
    known : ndarray of shape (n,), bool
        Which items are known.
    tolerance : float
        Scores closer than this are tied.

    Returns
    -------
    mid : ndarray of shape (Q,), float64
        Mid-ranks of the known items (:func:`tie_ranks`).
    optimistic : ndarray of shape (Q,), int64
        Distinct positions when, in every tie group, the known items come first.
    pessimistic : ndarray of shape (Q,), int64
        Distinct positions when, in every tie group, the known items come last.

    Notes
    -----
    The optimality score is linear in the sum of positions, so its value on
    the mid-ranks is the mean of its values on the optimistic and pessimistic
    positions.
    """
    known = np.asarray(known, dtype=bool)
    mid, opt, pes = tie_ranks(scores, tolerance=tolerance)
    if known.shape != mid.shape:
        raise AfpxError(f"known has shape {known.shape}, scores {mid.shape}")
    idx = np.flatnonzero(known)
    # items of one tie group share their optimistic rank; order known ones inside groups
    order = idx[np.argsort(opt[idx], kind="stable")]
    group_start = opt[order]
    _, first, n_in_group = np.unique(group_start, return_index=True, return_counts=True)
    offset = np.arange(order.size) - np.repeat(first, n_in_group)
    optimistic = np.empty(order.size, dtype=np.int64)
    pessimistic = np.empty(order.size, dtype=np.int64)
    optimistic_sorted = group_start + offset
    pessimistic_sorted = pes[order] - (np.repeat(n_in_group, n_in_group) - 1 - offset)
    # back to the order of ``idx``
    back = np.argsort(np.argsort(opt[idx], kind="stable"), kind="stable")
    optimistic[:] = optimistic_sorted[back]
    pessimistic[:] = pessimistic_sorted[back]
    return mid[idx], optimistic, pessimistic


def optimality_score(positions: np.ndarray, n_total: int) -> float:
    """The paper's optimality score of the known items in a ranked list.

    Parameters
    ----------
    positions : ndarray of shape (Q,)
        1-based positions (mid-ranks allowed) of the Q known items.
    n_total : int
        N, the length of the ranked list.

    Returns
    -------
    float
        ``OS = (N Q + Q - 2 Σ q_i) / (N Q - Q²)``: 1 when the known items fill
        the top Q positions, -1 when they fill the bottom Q, 0 in expectation
        for a random order. NaN when the score is undefined: Q = 0 (nothing
        known) or Q = N (every item known, so no order can be better than any
        other); these are counted apart in reports, never averaged in.

    Examples
    --------
    >>> optimality_score(np.array([1, 2]), 10)
    1.0
    >>> optimality_score(np.array([9, 10]), 10)
    -1.0
    """
    q = np.asarray(positions, dtype=np.float64)
    n_known = q.size
    if n_known and (q.min() < 1 or q.max() > n_total):
        raise AfpxError(f"positions must lie in 1..{n_total}, got {q.min()}..{q.max()}")
    if n_known == 0 or n_known >= n_total:
        return math.nan
    return float((n_total * n_known + n_known - 2.0 * q.sum()) / (n_total * n_known - n_known**2))


def first_known_metrics(positions: np.ndarray, hit_k: Iterable[int]) -> dict[str, float]:
    """Reciprocal rank and hit@k of the best-placed known item.

    Parameters
    ----------
    positions : ndarray of shape (Q,)
        1-based mid-ranks of the known items.
    hit_k : iterable of int
        The k of hit@k.

    Returns
    -------
    dict
        ``first_rank`` (the smallest position, NaN without known items),
        ``reciprocal_rank`` (1 / first_rank, 0 without known items) and
        ``hit@k`` (1.0 when first_rank <= k, else 0.0).
    """
    q = np.asarray(positions, dtype=np.float64)
    first = float(q.min()) if q.size else math.nan
    out = {"first_rank": first, "reciprocal_rank": 1.0 / first if q.size else 0.0}
    for k in hit_k:
        out[f"hit@{k}"] = float(q.size > 0 and first <= k)
    return out


# =============================================================================
# kernels: counting the assignments of one template that beat a score (Test 1)
# =============================================================================


@dataclass(frozen=True)
class AssignmentCount:
    """Assignments of one template to a target composition, relative to a score.

    Attributes
    ----------
    better : int
        Assignments scoring more than the threshold (+ tolerance).
    tied : int
        Assignments within the tolerance of the threshold.
    total : float
        Every assignment that yields the target counts (exact below 2**53).
    best : float
        The best score of any such assignment (-inf when there is none).
    truncated : bool
        Counting stopped at the cap: ``better + tied`` is a lower bound.
    """

    better: int
    tied: int
    total: float
    best: float
    truncated: bool


def _count_grid(multiplicity: np.ndarray, target: np.ndarray) -> tuple[int, ...]:
    # remaining counts of every element but the last (the last one is implied)
    return tuple(int(t) + 1 for t in target[:-1])


def count_states(multiplicity: np.ndarray, target: np.ndarray) -> int:
    """Size of the counting DP of :func:`count_assignments` (sites × count states)."""
    return (len(multiplicity) + 1) * int(np.prod(_count_grid(multiplicity, target), dtype=np.int64))


def count_assignments(
    log_likelihood: np.ndarray,
    multiplicity: np.ndarray,
    target: np.ndarray,
    threshold: float,
    *,
    tolerance: float = 1e-9,
    cap: int | None = None,
) -> AssignmentCount:
    """Count the assignments of a template's sites to k elements that beat a score.

    An assignment puts one of the k elements on every unique site; it yields
    the target when the multiplicities of the sites given element e sum to
    ``target[e]`` for every e. Its score is the sum of the sites' log
    likelihoods of their elements.

    Parameters
    ----------
    log_likelihood : ndarray of shape (n_sites, k)
        Log likelihood of each of the k elements on each unique site.
    multiplicity : ndarray of shape (n_sites,)
        Multiplicities of the unique sites.
    target : ndarray of shape (k,)
        Required multiplicity sum per element.
    threshold : float
        The score to compare with.
    tolerance : float
        Scores within this of the threshold are tied.
    cap : int, optional
        Stop once ``better + tied`` reaches this (``truncated`` is then True).

    Returns
    -------
    AssignmentCount

    Notes
    -----
    A backward max-plus DP over (site, remaining counts) gives, for every
    partial assignment, the exact best completion; a depth-first search then
    visits only partial assignments that can still reach the threshold, so
    the work is proportional to the number of assignments counted (times the
    number of sites), not to the number of assignments. A second DP (sum
    instead of max) counts every assignment exactly. The last element's
    remaining count is implied by the others', so the DP grid has
    ``prod(target[:-1] + 1)`` states per site.
    """
    logl = np.asarray(log_likelihood, dtype=np.float64)
    mult = np.asarray(multiplicity, dtype=np.int64)
    target = np.asarray(target, dtype=np.int64)
    n, k = logl.shape
    if mult.shape != (n,) or target.shape != (k,):
        raise AfpxError(
            f"shapes disagree: log_likelihood {logl.shape}, "
            f"multiplicity {mult.shape}, target {target.shape}"
        )
    if k == 0 or int(target.sum()) != int(mult.sum()) or (target < 0).any():
        return AssignmentCount(0, 0, 0.0, -math.inf, False)
    grid = _count_grid(mult, target)
    # best[j][r]: best score of sites j.. given remaining counts r (elements 0..k-2)
    best = np.full((n + 1, *grid), -np.inf)
    # float64 counts are exact below 2**53 (about 9e15 assignments)
    ways = np.zeros((n + 1, *grid))
    origin = (0,) * (k - 1)
    best[(n, *origin)] = 0.0
    ways[(n, *origin)] = 1
    for j in range(n - 1, -1, -1):
        m = int(mult[j])
        # element k-1 leaves the explicit counts unchanged
        best[j] = best[j + 1] + logl[j, k - 1]
        ways[j] = ways[j + 1].copy()
        for e in range(k - 1):
            if m >= grid[e]:
                continue
            dst: list[Any] = [j] + [slice(None)] * (k - 1)
            src: list[Any] = [j + 1] + [slice(None)] * (k - 1)
            dst[1 + e] = slice(m, None)
            src[1 + e] = slice(0, grid[e] - m)
            d, s = tuple(dst), tuple(src)
            best[d] = np.maximum(best[d], best[s] + logl[j, e])
            ways[d] = ways[d] + ways[s]
    root = tuple(int(t) for t in target[:-1])
    total = float(ways[(0, *root)])
    best_score = float(best[(0, *root)])
    if total == 0 or best_score < threshold - tolerance:
        return AssignmentCount(0, 0, total, best_score, False)

    better = tied = 0
    truncated = False
    suffix = np.concatenate([np.cumsum(mult[::-1])[::-1], [0]])
    stack: list[tuple[int, tuple[int, ...], float]] = [(0, root, 0.0)]
    floor = threshold - tolerance
    while stack:
        j, r, acc = stack.pop()
        if j == n:
            if acc > threshold + tolerance:
                better += 1
            else:
                tied += 1
            if cap is not None and better + tied >= cap:
                truncated = bool(stack)
                break
            continue
        m = int(mult[j])
        nxt = best[j + 1]
        for e in range(k):
            if e < k - 1:
                if r[e] < m:
                    continue
                r2 = (*r[:e], r[e] - m, *r[e + 1 :])
            else:
                if suffix[j] - sum(r) < m:
                    continue
                r2 = r
            gain = acc + logl[j, e]
            if gain + nxt[r2] >= floor:
                stack.append((j + 1, r2, gain))
    return AssignmentCount(better, tied, total, best_score, truncated)


# =============================================================================
# kernels: confusion matrix, error rate, likelihood histograms
# =============================================================================


def confusion_counts(true_z: np.ndarray, predicted_z: np.ndarray) -> np.ndarray:
    """Counts of (true element, predicted element) pairs.

    Parameters
    ----------
    true_z, predicted_z : ndarray of shape (n_sites,)
        Atomic numbers 1..118.

    Returns
    -------
    ndarray of shape (118, 118), int64
        Entry ``[Zt - 1, Zp - 1]`` counts sites of element Zt predicted as Zp.
    """
    t = np.asarray(true_z).astype(np.int64)
    p = np.asarray(predicted_z).astype(np.int64)
    if t.shape != p.shape:
        raise AfpxError(f"true and predicted elements differ in shape: {t.shape} vs {p.shape}")
    for name, a in (("true", t), ("predicted", p)):
        if a.size and (a.min() < 1 or a.max() > schema.N_ELEMENTS):
            raise AfpxError(
                f"{name} atomic numbers must lie in 1..{schema.N_ELEMENTS}, "
                f"got {a.min()}..{a.max()}"
            )
    flat = (t - 1) * schema.N_ELEMENTS + (p - 1)
    return np.bincount(flat, minlength=schema.N_ELEMENTS**2).reshape(
        schema.N_ELEMENTS, schema.N_ELEMENTS
    )


def error_rate(counts: np.ndarray) -> float:
    """Top-1 error rate of a confusion matrix: 1 - trace / total (NaN when empty)."""
    total = counts.sum()
    return float(1.0 - np.trace(counts) / total) if total else math.nan


def likelihood_histogram(
    likelihood: np.ndarray, z: np.ndarray, *, bins: int = 50
) -> tuple[np.ndarray, np.ndarray]:
    """Histograms of the likelihood of the true element and of every other element.

    Parameters
    ----------
    likelihood : ndarray of shape (n_sites, 118)
        Sigmoid likelihoods in [0, 1].
    z : ndarray of shape (n_sites,)
        True atomic numbers.
    bins : int
        Equal bins over [0, 1].

    Returns
    -------
    true : ndarray of shape (bins,), int64
        Counts of the n_sites true-element likelihoods.
    other : ndarray of shape (bins,), int64
        Counts of the n_sites × 117 other likelihoods.
    """
    lk = np.asarray(likelihood, dtype=np.float64)
    zi = np.asarray(z).astype(np.int64) - 1
    if lk.ndim != 2 or lk.shape[0] != zi.size:
        raise AfpxError(f"likelihood {lk.shape} does not match {zi.size} sites")
    idx = np.clip((lk * bins).astype(np.int64), 0, bins - 1)
    all_counts = np.bincount(idx.ravel(), minlength=bins)
    true_idx = idx[np.arange(zi.size), zi]
    true = np.bincount(true_idx, minlength=bins)
    return true, all_counts - true
