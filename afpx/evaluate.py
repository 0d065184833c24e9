"""The paper's tests: Test 1, Test 2, softmax error rate, confusion matrix, baselines.

Layers, as everywhere in afpx:

* **kernels** (numpy in, numpy out): :func:`tie_ranks`, :func:`known_positions`,
  :func:`optimality_score`, :func:`set_positions`, :func:`count_assignments`,
  :func:`small_template_counts`, :func:`true_candidate_rank`,
  :func:`candidates_above`, :func:`best_for_composition`,
  :func:`confusion_counts`, :func:`error_rate`, :func:`likelihood_histogram`;
  likelihood-free indexes of the templates: :class:`TemplateIndex`,
  :class:`CompositionTable`;
* **orchestration** on the cube: :func:`per_site_metrics`,
  :func:`with_model_likelihoods`, :func:`evaluate` (Test 1, Test 2 and the case
  study for the model and every baseline of :mod:`afpx.baselines`),
  :func:`write_report`;
* the CLI ``afpx evaluate`` (:mod:`afpx.commands.evaluate`) writes the report.

Conventions (see docs/evaluation.md for the full definitions):

* scores are log-likelihoods (sum of log site likelihoods over unique sites);
  higher is better; two scores within ``tie_tolerance`` are tied;
* ranks are 1-based; the **mid-rank** of an item is
  1 + (number strictly better) + (number of *other* items tied) / 2, the
  **optimistic** rank 1 + better, the **pessimistic** rank 1 + better + tied.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from afpx import AfpxError, schema

if TYPE_CHECKING:
    import xarray as xr

    from afpx.baselines import BaselineParams
    from afpx.templates import TemplateLibrary

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
        per-template counting DP; a template beyond it is skipped and flagged
        (``n_inexact_templates`` in the report).
    table_max_elements : int
        Element-set sizes up to this (and every Test 2 size) get a
        :class:`CompositionTable`: exact template and candidate counts for
        Test 1. Larger sets (Test 1 only) are ranked exactly too, but their
        numbers of candidates are not counted (NaN).
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
    test2_max_sets : int or None
        Evaluate Test 2 on at most this many element sets of each size: a
        seeded random sample (``test2_seed``) of the split's sets, drawn
        before anything is scored, so every model and baseline sees the same
        sets. None: every set. Test 1 always covers every structure.
    test2_seed : int
        Seed of that sample.
    """

    split: str = "test"
    set_sizes: tuple[int, ...] = (2, 3)
    hit_k: tuple[int, ...] = (1, 10)
    test1_cap: int = 100
    test1_max_states: int = 5_000_000
    table_max_elements: int = 4
    tie_tolerance: float = 1e-9
    histogram_bins: int = 50
    baselines: tuple[str, ...] = ("constant", "random", "frequency", "coordination")
    case_study: tuple[tuple[str, ...], ...] = (("Mn", "Ge"), ("Li", "Mn", "Ge"))
    case_top: int = 10
    test2_max_sets: int | None = None
    test2_seed: int = 0

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
        if self.test2_max_sets is not None and self.test2_max_sets < 1:
            raise AfpxError(f"test2_max_sets must be positive or None, got {self.test2_max_sets}")

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
    strict: bool = False,
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
    strict : bool
        Count only the assignments that are better (``tied`` is then 0); with
        a cap, this gives the exact optimistic rank when ties are many.

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
    floor = threshold + tolerance if strict else threshold - tolerance
    if total == 0 or best_score < floor or (strict and best_score == floor):
        return AssignmentCount(0, 0, total, best_score, False)

    better = tied = 0
    truncated = False
    suffix = np.concatenate([np.cumsum(mult[::-1])[::-1], [0]])
    stack: list[tuple[int, tuple[int, ...], float]] = [(0, root, 0.0)]
    while stack:
        j, r, acc = stack.pop()
        if j == n:
            if strict or acc > threshold + tolerance:
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
            bound = gain + nxt[r2]
            if bound > floor or (bound == floor and not strict):
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


# =============================================================================
# compositions of templates and candidates
# =============================================================================


def reduce_counts(counts: np.ndarray) -> np.ndarray:
    """Divide every row of element counts by its greatest common divisor.

    Parameters
    ----------
    counts : ndarray of shape (n, k), int
        Multiplicity sums per element.

    Returns
    -------
    ndarray of shape (n, k), int64
        The reduced composition of each row (rows of zeros stay zero).
    """
    c = np.asarray(counts).astype(np.int64)
    if c.ndim != 2:
        raise AfpxError(f"counts must be two-dimensional, got shape {c.shape}")
    if c.shape[1] == 0:
        return c
    g = np.gcd.reduce(c, axis=1)
    g[g == 0] = 1
    return c // g[:, None]


@dataclass(frozen=True)
class TemplateCompositions:
    """Element set and reduced composition of every template of a library.

    Attributes
    ----------
    element_set : list of tuple of int
        Sorted atomic numbers of each template's true elements.
    counts : list of tuple of int
        Its reduced composition, aligned with ``element_set``.
    site_start : ndarray of shape (n_templates + 1,), int64
        Template t owns library sites ``site_start[t]:site_start[t + 1]``.
    """

    element_set: list[tuple[int, ...]]
    counts: list[tuple[int, ...]]
    site_start: np.ndarray

    def known(self) -> dict[tuple[int, ...], set[tuple[int, ...]]]:
        """The reduced compositions present among the templates, by element set."""
        out: dict[tuple[int, ...], set[tuple[int, ...]]] = {}
        for es, c in zip(self.element_set, self.counts, strict=True):
            out.setdefault(es, set()).add(c)
        return out


def template_compositions(
    site_template: np.ndarray, z: np.ndarray, multiplicity: np.ndarray
) -> TemplateCompositions:
    """Element sets and reduced compositions of templates from their sites.

    Parameters
    ----------
    site_template : ndarray of shape (n_sites,), int
        Template of each site, non-decreasing, covering 0..n_templates-1.
    z : ndarray of shape (n_sites,), int
        True atomic number of each site.
    multiplicity : ndarray of shape (n_sites,), int
        Multiplicity of each site.

    Returns
    -------
    TemplateCompositions
    """
    t = np.asarray(site_template).astype(np.int64)
    if t.size and (np.diff(t) < 0).any():
        raise AfpxError("site_template must be non-decreasing (sites grouped by template)")
    n_templates = int(t[-1]) + 1 if t.size else 0
    site_start = np.searchsorted(t, np.arange(n_templates + 1))
    key = t * (schema.N_ELEMENTS + 1) + np.asarray(z).astype(np.int64)
    uk, inv = np.unique(key, return_inverse=True)
    sums = np.bincount(inv, weights=np.asarray(multiplicity, dtype=np.float64)).astype(np.int64)
    tt, zz = np.divmod(uk, schema.N_ELEMENTS + 1)
    bounds = np.searchsorted(tt, np.arange(n_templates + 1))
    sets: list[tuple[int, ...]] = []
    counts: list[tuple[int, ...]] = []
    for i in range(n_templates):
        a, b = bounds[i], bounds[i + 1]
        c = sums[a:b]
        g = int(np.gcd.reduce(c)) if c.size else 1
        sets.append(tuple(int(v) for v in zz[a:b]))
        counts.append(tuple(int(v) // g for v in c))
    return TemplateCompositions(sets, counts, site_start)


def _row_keys(rows: np.ndarray, base: int) -> np.ndarray:
    # one int64 per row of small non-negative ints (callers check base**k < 2**62)
    key = np.zeros(rows.shape[0], dtype=np.int64)
    for col in range(rows.shape[1]):
        key = key * base + rows[:, col]
    return key


def _decode(keys: np.ndarray, base: int, k: int) -> np.ndarray:
    # inverse of _row_keys
    out = np.empty((keys.size, k), dtype=np.int64)
    rest = np.asarray(keys, dtype=np.int64).copy()
    for col in range(k - 1, -1, -1):
        rest, out[:, col] = np.divmod(rest, base)
    return out


def _match_rows(rows: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Index of each query row among ``rows`` (-1 where absent); rows are unique."""
    if rows.shape[0] == 0 or queries.shape[0] == 0:
        return np.full(queries.shape[0], -1, dtype=np.int64)
    k = rows.shape[1]
    base = int(max(rows.max(), queries.max())) + 1
    if k * math.log2(max(base, 2)) < 62:
        rk, qk = _row_keys(rows, base), _row_keys(queries, base)
        order = np.argsort(rk)
        pos = np.searchsorted(rk, qk, sorter=order)
        pos = np.clip(pos, 0, rk.size - 1)
        hit = rk[order[pos]] == qk
        return np.where(hit, order[pos], -1)
    lookup = {tuple(r): i for i, r in enumerate(rows.tolist())}
    return np.asarray([lookup.get(tuple(q), -1) for q in queries.tolist()], dtype=np.int64)


@dataclass(frozen=True)
class CompositionRanking:
    """Unique reduced compositions of an element set with their best candidate.

    Attributes
    ----------
    counts : ndarray of shape (N, k), int64
        Reduced composition (aligned with the element set).
    log_score : ndarray of shape (N,), float64
        Best log-score of any candidate yielding it.
    template : ndarray of shape (N,), int64
        Template of that best candidate (the lowest index among exact ties).
    row : ndarray of shape (N,), int64
        Its row in the candidate table.
    """

    counts: np.ndarray
    log_score: np.ndarray
    template: np.ndarray
    row: np.ndarray


def rank_candidates(
    template: np.ndarray,
    reduced: np.ndarray,
    log_score: np.ndarray,
    *,
    keep: np.ndarray | None = None,
) -> CompositionRanking:
    """Best candidate per unique reduced composition.

    Parameters
    ----------
    template : ndarray of shape (n_candidates,), int
        Template of each candidate.
    reduced : ndarray of shape (n_candidates, k), int
        Reduced composition of each candidate.
    log_score : ndarray of shape (n_candidates,), float
        Log-score of each candidate.
    keep : ndarray of shape (n_candidates,), bool, optional
        Candidates to consider (all by default).

    Returns
    -------
    CompositionRanking
        Compositions in the order of their first appearance in ``np.unique``
        (sorted rows), not ranked: rank them with :func:`tie_ranks`.
    """
    rows = np.arange(template.size) if keep is None else np.flatnonzero(keep)
    k = reduced.shape[1]
    if rows.size == 0:
        return CompositionRanking(
            np.zeros((0, k), np.int64), np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64)
        )
    red = np.asarray(reduced, dtype=np.int64)[rows]
    base = int(red.max(initial=0)) + 1
    if k * math.log2(max(base, 2)) < 62:
        key = _row_keys(red, base)
    else:  # very large counts: let numpy number the rows
        key = np.unique(red, axis=0, return_inverse=True)[1].ravel()
    order = np.argsort(key, kind="stable")
    sk = key[order]
    starts = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
    s = np.asarray(log_score, dtype=np.float64)[rows][order]
    best = np.maximum.reduceat(s, starts)
    sizes = np.diff(np.r_[starts, sk.size])
    # the lowest template index among the rows reaching each composition's best score
    t = np.asarray(template, dtype=np.int64)[rows][order]
    big = np.iinfo(np.int64).max
    tie_t = np.where(s == np.repeat(best, sizes), t, big)
    best_t = np.minimum.reduceat(tie_t, starts)
    pos = np.where(tie_t == np.repeat(best_t, sizes))[0]
    group = np.repeat(np.arange(starts.size), sizes)[pos]
    first = pos[np.r_[True, group[1:] != group[:-1]]]
    return CompositionRanking(red[order[starts]], best, best_t, rows[order[first]])


def set_positions(
    scores: np.ndarray,
    known_index: np.ndarray,
    n_total: int,
    *,
    hit_k: Sequence[int] = (1, 10),
    tolerance: float = 1e-9,
) -> dict[str, float]:
    """Test 2 numbers of one element set from the top of its ranked list.

    Parameters
    ----------
    scores : ndarray of shape (n_found,)
        Best log-scores of the compositions found; every composition not
        among them scores less than all of them.
    known_index : ndarray of shape (Q,), int
        Row of each known composition in ``scores``; -1 for a known
        composition that is not generated at all (placed at the bottom of the
        list, tied with the other missing ones).
    n_total : int
        N, every composition generated for the set (including the missing known ones).
    hit_k : sequence of int
        The k of hit@k.
    tolerance : float
        Log-scores closer than this are tied.

    Returns
    -------
    dict
        ``n_compositions`` (N), ``n_known`` (Q), ``n_known_missing``, ``os``,
        ``os_optimistic``, ``os_pessimistic`` (NaN when Q = 0 or Q = N),
        ``first_rank`` (mid-rank), ``first_rank_optimistic``,
        ``first_rank_pessimistic``, ``reciprocal_rank``, ``hit@k``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    known_index = np.asarray(known_index, dtype=np.int64)
    found = known_index[known_index >= 0]
    n_missing = int((known_index < 0).sum())
    if found.size + n_missing and scores.size + n_missing > n_total:
        raise AfpxError(f"{scores.size} compositions found, {n_missing} missing, but N = {n_total}")
    is_known = np.zeros(scores.size, dtype=bool)
    is_known[found] = True
    if scores.size:
        q_mid, q_opt, q_pes = known_positions(scores, is_known, tolerance=tolerance)
    else:
        q_mid = q_opt = q_pes = np.zeros(0)
    bottom = np.arange(n_total - n_missing + 1, n_total + 1, dtype=np.float64)
    q_mid = np.concatenate([q_mid, np.full(n_missing, bottom.mean() if n_missing else 0.0)])
    q_opt = np.concatenate([q_opt, bottom])
    q_pes = np.concatenate([q_pes, bottom])
    out: dict[str, float] = {
        "n_compositions": float(n_total),
        "n_known": float(known_index.size),
        "n_known_missing": float(n_missing),
        "os": optimality_score(q_mid, n_total),
        "os_optimistic": optimality_score(q_opt, n_total),
        "os_pessimistic": optimality_score(q_pes, n_total),
    }
    out.update(first_known_metrics(q_mid, hit_k))
    out["first_rank_optimistic"] = float(q_opt.min()) if q_opt.size else math.nan
    out["first_rank_pessimistic"] = float(q_pes.min()) if q_pes.size else math.nan
    return out


# =============================================================================
# the evaluation engine: every candidate above a score, shared by models and sets
# =============================================================================

#: Templates with at most this many assignments are enumerated outright.
BF_MAX_ASSIGNMENTS: Final = 8192
#: Scored (template, assignment) pairs held in memory at once by the enumeration.
_BF_CHUNK: Final = 2_000_000


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
def _assignment_tables(k: int, n: int, base: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
    return math.floor(math.log(BF_MAX_ASSIGNMENTS) / math.log(k) + 1e-9)


@dataclass(frozen=True, eq=False)
class TemplateIndex:
    """What evaluation needs of a template library, independent of likelihoods.

    Attributes
    ----------
    site_start : ndarray of shape (n_templates + 1,), int64
        Sites of template t are ``site_start[t]:site_start[t + 1]``.
    n_sites : ndarray of shape (n_templates,), int64
        Unique sites per template.
    multiplicity : ndarray of shape (n_sites_total,), int64
    reduced : ndarray of shape (n_sites_total,), int64
        Multiplicities divided by their template's gcd (compositions unchanged).
    total : ndarray of shape (n_templates,), int64
        Sum of the reduced multiplicities of each template.
    compositions : TemplateCompositions
        The templates' own element sets and reduced compositions.
    z : ndarray of shape (n_sites_total,), int64
        True element of every site.
    """

    site_start: np.ndarray
    n_sites: np.ndarray
    multiplicity: np.ndarray
    reduced: np.ndarray
    total: np.ndarray
    compositions: TemplateCompositions
    z: np.ndarray

    @classmethod
    def from_arrays(
        cls, site_template: np.ndarray, z: np.ndarray, multiplicity: np.ndarray
    ) -> TemplateIndex:
        """Index of templates given by their sites (see :func:`template_compositions`)."""
        tc = template_compositions(site_template, z, multiplicity)
        start = tc.site_start
        n = np.diff(start)
        m = np.asarray(multiplicity).astype(np.int64)
        g = np.ones(n.size, dtype=np.int64)
        has = n > 0
        if m.size:
            g[has] = np.gcd.reduceat(m, start[:-1][has])
        reduced = m // np.repeat(g, n)
        total = np.zeros(n.size, dtype=np.int64)
        if m.size:
            total[has] = np.add.reduceat(reduced, start[:-1][has])
        return cls(start, n, m, reduced, total, tc, np.asarray(z).astype(np.int64))

    @property
    def n_templates(self) -> int:
        return int(self.n_sites.size)

    def upper_bound(self, log_likelihood: np.ndarray) -> np.ndarray:
        """Best conceivable score of every template: each site's best element, no constraint.

        Parameters
        ----------
        log_likelihood : ndarray of shape (n_sites_total, k)

        Returns
        -------
        ndarray of shape (n_templates,), float64 (-inf for templates without sites)
        """
        best = np.asarray(log_likelihood, dtype=np.float64).max(axis=1)
        out = np.full(self.n_templates, -np.inf)
        has = self.n_sites > 0
        if best.size:
            out[has] = np.add.reduceat(best, self.site_start[:-1][has])
        return out

    def true_scores(self, log_likelihood_all: np.ndarray, templates: np.ndarray) -> np.ndarray:
        """Score of each given template's own (true) assignment.

        Parameters
        ----------
        log_likelihood_all : ndarray of shape (n_sites_total, 118)
        templates : ndarray of shape (n,), int

        Returns
        -------
        ndarray of shape (n,), float64; sites summed in order, as in the counting.
        """
        out = np.empty(len(templates))
        for i, t in enumerate(np.asarray(templates).tolist()):
            a, b = self.site_start[t], self.site_start[t + 1]
            vals = np.asarray(log_likelihood_all[a:b], dtype=np.float64)[
                np.arange(b - a), self.z[a:b] - 1
            ]
            acc = 0.0
            for v in vals.tolist():
                acc += v
            out[i] = acc
        return out


def _forward_grid(m: np.ndarray, k: int, log_likelihood: np.ndarray | None) -> np.ndarray:
    """Forward DP over the counts of elements 0..k-2 (the last count is implied).

    With log-likelihoods: the best score of every count vector (max-plus);
    without: the number of assignments reaching it (float64, exact < 2**53).
    Sites are taken in increasing multiplicity and each step only touches the
    counts reachable so far (a cube of side prefix-sum + 1).
    """
    order = np.argsort(m, kind="stable")
    mult = np.asarray(m, dtype=np.int64)[order]
    logl = None if log_likelihood is None else np.asarray(log_likelihood)[order]
    M = int(mult.sum())
    d = k - 1
    shape = (M + 1,) * d
    origin = (0,) * d
    fill = 0.0 if logl is None else -np.inf
    V = np.full(shape, fill)
    V[origin] = 1.0 if logl is None else 0.0
    reached = 0
    for j, u in enumerate(mult.tolist()):
        old_region = (slice(0, reached + 1),) * d
        old = V[old_region].copy()
        V[(slice(0, reached + u + 1),) * d] = fill
        if logl is None:
            V[old_region] = old
        else:
            V[old_region] = old + logl[j, d]
        for e in range(d):
            dst: list[Any] = [slice(0, reached + 1)] * d
            dst[e] = slice(u, u + reached + 1)
            region = tuple(dst)
            if logl is None:
                V[region] += old
            else:
                np.maximum(V[region], old + logl[j, e], out=V[region])
        reached += u
    return V


def _grid_rows(V: np.ndarray, M: int, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Count vectors (every element used) where ``keep`` holds, with their values (k >= 2)."""
    idx = np.nonzero(keep)
    first = np.stack(idx, axis=1).astype(np.int64)
    last = M - first.sum(axis=1)
    ok = (first >= 1).all(axis=1) & (last >= 1)
    counts = np.concatenate([first, last[:, None]], axis=1)[ok]
    return counts, V[idx][ok]


def candidates_above(
    index: TemplateIndex,
    log_likelihood: np.ndarray,
    threshold: float,
    *,
    upper_bound: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The best candidate of every (template, composition) scoring at least ``threshold``.

    Parameters
    ----------
    index : TemplateIndex
    log_likelihood : ndarray of shape (n_sites_total, k)
        Log-likelihood of the k elements of the set on every site.
    threshold : float
        Candidates below it are not returned.
    upper_bound : ndarray of shape (n_templates,), optional
        :meth:`TemplateIndex.upper_bound` of ``log_likelihood`` (computed if absent).

    Returns
    -------
    template : ndarray of shape (R,), int64
    reduced : ndarray of shape (R, k), int64
        Reduced composition of each candidate.
    log_score : ndarray of shape (R,), float64

    Notes
    -----
    Only templates whose upper bound reaches the threshold are looked at.
    Templates with at most :func:`bruteforce_limit` sites are enumerated
    (vectorised over all templates with the same number of sites); larger
    templates go through a max-plus DP over count vectors. Either way one row
    per (template, composition) comes back: its best candidate.
    """
    logl = np.asarray(log_likelihood, dtype=np.float64)
    k = logl.shape[1]
    ub = index.upper_bound(logl) if upper_bound is None else upper_bound
    sel = np.flatnonzero((ub >= threshold) & (index.n_sites >= k))
    n_sel = index.n_sites[sel]
    limit = bruteforce_limit(k)
    base = int(index.total.max(initial=0)) + 1
    span = base ** (k - 1)
    out_t: list[np.ndarray] = []
    out_c: list[np.ndarray] = []
    out_s: list[np.ndarray] = []
    for n in np.unique(n_sel[n_sel <= limit]).tolist():
        ts = sel[n_sel == n]
        A, onehot, weight = _assignment_tables(k, n, base)
        step = max(1, _BF_CHUNK // max(1, A.shape[0]))
        for c0 in range(0, ts.size, step):
            t = ts[c0 : c0 + step]
            rows = index.site_start[t][:, None] + np.arange(n)[None, :]
            # every assignment's score at once: (T, n k) @ (n k, A), one matrix product
            score = logl[rows].reshape(t.size, n * k) @ onehot
            ti, ai = np.nonzero(score >= threshold)
            if ti.size == 0:
                continue
            mr = index.reduced[rows[ti]]  # (R, n)
            # (template, counts of elements 0..k-2) as one int64; the last count is implied
            code = (mr * weight[ai]).sum(axis=1)
            key = t[ti] * span + code
            order = np.argsort(key, kind="stable")
            sk = key[order]
            starts = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
            owner = t[ti][order[starts]]
            first = _decode(code[order[starts]], base, k - 1)
            last = index.total[owner] - first.sum(axis=1)
            out_t.append(owner)
            out_c.append(np.concatenate([first, last[:, None]], axis=1))
            out_s.append(np.maximum.reduceat(score[ti, ai][order], starts))
    for t in sel[n_sel > limit].tolist():
        a, b = index.site_start[t], index.site_start[t + 1]
        m = index.reduced[a:b]
        grid = _forward_grid(m, k, logl[a:b])
        counts, values = _grid_rows(grid, int(m.sum()), (grid >= threshold) & (grid > -np.inf))
        out_t.append(np.full(values.size, t, dtype=np.int64))
        out_c.append(counts)
        out_s.append(values)
    if not out_t:
        return np.zeros(0, np.int64), np.zeros((0, k), np.int64), np.zeros(0)
    return (
        np.concatenate(out_t).astype(np.int64),
        reduce_counts(np.concatenate(out_c)),
        np.concatenate(out_s),
    )


@dataclass(frozen=True, eq=False)
class CompositionTable:
    """Every composition k elements can take on the templates, independent of likelihoods.

    Compositions are reduced count vectors in "slot" order: the same for every
    element set of size k, so one table serves them all.

    Attributes
    ----------
    k : int
    compositions : ndarray of shape (N, k), int64
        Unique reduced compositions (rows sorted).
    row_template : ndarray of shape (R,), int64
        Template of each reachable (template, composition) pair, grouped by
        composition: pairs of composition i are ``row_start[i]:row_start[i+1]``.
    row_assignments : ndarray of shape (R,), float64
        Number of assignments of the template yielding the composition.
    row_start : ndarray of shape (N + 1,), int64
    keys : ndarray of shape (N,), int64
        Sorted integer code of each composition (base ``base``), for lookups.
    base : int
    """

    k: int
    compositions: np.ndarray
    row_template: np.ndarray
    row_assignments: np.ndarray
    row_start: np.ndarray
    keys: np.ndarray
    base: int

    @property
    def n_compositions(self) -> int:
        return int(self.compositions.shape[0])

    def find(self, reduced: np.ndarray) -> np.ndarray:
        """Index of each reduced composition (rows) in the table, -1 where absent."""
        queries = np.asarray(reduced, dtype=np.int64).reshape(-1, self.k)
        out = np.full(queries.shape[0], -1, dtype=np.int64)
        inside = ((queries >= 0) & (queries < self.base)).all(axis=1)
        if not inside.any() or self.keys.size == 0:
            return out
        q = _row_keys(queries[inside], self.base)
        pos = np.clip(np.searchsorted(self.keys, q), 0, self.keys.size - 1)
        out[inside] = np.where(self.keys[pos] == q, pos, -1)
        return out

    def templates_of(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Templates reaching composition i and their numbers of assignments."""
        a, b = self.row_start[i], self.row_start[i + 1]
        return self.row_template[a:b], self.row_assignments[a:b]

    @classmethod
    def build(cls, index: TemplateIndex, k: int) -> CompositionTable:
        """Enumerate (small templates) or count by DP (large ones) every composition."""
        limit = bruteforce_limit(k)
        sel = np.flatnonzero(index.n_sites >= k)
        n_sel = index.n_sites[sel]
        tt: list[np.ndarray] = []
        cc: list[np.ndarray] = []
        ww: list[np.ndarray] = []
        base = int(index.total.max(initial=0)) + 1
        if (k + 1) * math.log2(base) >= 62:
            raise AfpxError(f"a composition table of {k} elements does not fit 64-bit codes")
        span = base ** (k - 1)
        for n in np.unique(n_sel[n_sel <= limit]).tolist():
            ts = sel[n_sel == n]
            assign = surjections(k, n).astype(np.int64)
            onehot = [(assign == e).T.astype(np.int64) for e in range(k - 1)]
            step = max(1, _BF_CHUNK // max(1, assign.shape[0]))
            for c0 in range(0, ts.size, step):
                t = ts[c0 : c0 + step]
                mr = index.reduced[index.site_start[t][:, None] + np.arange(n)[None, :]]
                # (template, counts of elements 0..k-2) as one int64; the last count is implied
                key = np.repeat(t[:, None] * span, assign.shape[0], axis=1)
                for e, h in enumerate(onehot):
                    key += (mr @ h) * base ** (k - 2 - e)
                uniq, n_ways = np.unique(key.ravel(), return_counts=True)
                owner, code = np.divmod(uniq, span)
                first = _decode(code, base, k - 1)
                last = index.total[owner] - first.sum(axis=1)
                tt.append(owner)
                cc.append(np.concatenate([first, last[:, None]], axis=1))
                ww.append(n_ways.astype(np.float64))
        for t in sel[n_sel > limit].tolist():
            a, b = index.site_start[t], index.site_start[t + 1]
            m = index.reduced[a:b]
            grid = _forward_grid(m, k, None)
            counts, values = _grid_rows(grid, int(m.sum()), np.greater(grid, 0))
            tt.append(np.full(values.size, t, dtype=np.int64))
            cc.append(counts)
            ww.append(values)
        if tt:
            template = np.concatenate(tt)
            reduced = reduce_counts(np.concatenate(cc))
            ways = np.concatenate(ww)
        else:
            template, reduced, ways = np.zeros(0, np.int64), np.zeros((0, k), np.int64), np.zeros(0)
        ukey, inv = np.unique(_row_keys(reduced, base), return_inverse=True)
        comps = _decode(ukey, base, k)
        inv = np.asarray(inv).ravel()
        order = np.lexsort((template, inv))
        row_start = np.searchsorted(inv[order], np.arange(comps.shape[0] + 1))
        return cls(k, comps, template[order], ways[order], row_start.astype(np.int64), ukey, base)


# =============================================================================
# Test 1 for one structure
# =============================================================================


@dataclass(frozen=True)
class TrueRank:
    """Rank of a structure's true candidate among all candidates of its composition.

    Attributes
    ----------
    rank, rank_optimistic, rank_pessimistic : float
        Mid, optimistic and pessimistic rank among every assignment of every
        template that yields the composition; NaN where censored.
    censored : bool
        More than the cap of candidates beat or tie the true one.
    template_rank, template_rank_optimistic, template_rank_pessimistic : float
        Rank when every other template is represented by its best assignment
        only (structure-type level).
    n_templates : float
        Templates that can yield the composition (its own included); NaN when
        not counted (element sets without a composition table).
    n_inexact : int
        Templates counted by their best candidate only (DP grid too large).
    """

    rank: float
    rank_optimistic: float
    rank_pessimistic: float
    censored: bool
    template_rank: float
    template_rank_optimistic: float
    template_rank_pessimistic: float
    n_templates: float
    n_inexact: int


@dataclass(frozen=True)
class ExactCounts:
    """Assignments of several templates to one composition, counted exactly.

    Attributes
    ----------
    templates : ndarray of shape (n,), int64
    better, tied : ndarray of shape (n,), int64
        Assignments above / within the tolerance of the threshold.
    best : ndarray of shape (n,), float64
        Best score of each template for the composition (-inf: none).
    total : ndarray of shape (n,), int64
        Assignments yielding the composition.
    """

    templates: np.ndarray
    better: np.ndarray
    tied: np.ndarray
    best: np.ndarray
    total: np.ndarray


def small_template_counts(
    index: TemplateIndex,
    log_likelihood: np.ndarray,
    templates: np.ndarray,
    composition: np.ndarray,
    threshold: float,
    *,
    tolerance: float = 1e-9,
) -> ExactCounts:
    """Count, by enumeration, the assignments of small templates that beat a score.

    Only the templates with at most :func:`bruteforce_limit` unique sites are
    counted (the others are left out of the result); every assignment of
    them is scored at once with one matrix product per number of sites.

    Parameters
    ----------
    index : TemplateIndex
    log_likelihood : ndarray of shape (n_sites_total, k)
    templates : ndarray of shape (n,), int
    composition : ndarray of shape (k,), int
        The reduced composition.
    threshold : float
        The score to compare with.
    tolerance : float
        Scores within this of the threshold are tied.

    Returns
    -------
    ExactCounts
    """
    logl = np.asarray(log_likelihood, dtype=np.float64)
    k = logl.shape[1]
    comp = np.asarray(composition, dtype=np.int64)
    size = int(comp.sum())
    ts_all = np.asarray(templates, dtype=np.int64)
    ts_all = ts_all[index.n_sites[ts_all] <= bruteforce_limit(k)]
    base = int(index.total.max(initial=0)) + 1
    powers = np.asarray([base ** (k - 2 - e) for e in range(k - 1)], dtype=np.int64)
    hi, lo = threshold + tolerance, threshold - tolerance
    parts: list[tuple[np.ndarray, ...]] = []
    n_of = index.n_sites[ts_all]
    for n in np.unique(n_of).tolist():
        group = ts_all[n_of == n]
        A, onehot, weight = _assignment_tables(k, n, base)
        weight_f = weight.T.astype(np.float64)  # (n, A); small integers, exact in float64
        step = max(1, _BF_CHUNK // max(1, A.shape[0]))
        for c0 in range(0, group.size, step):
            t = group[c0 : c0 + step]
            rows = index.site_start[t][:, None] + np.arange(n)[None, :]
            score = logl[rows].reshape(t.size, n * k) @ onehot
            code = index.reduced[rows].astype(np.float64) @ weight_f
            scale, rest = np.divmod(index.total[t], size)
            want = np.where(rest == 0, (comp[:-1] @ powers) * scale if k > 1 else 0, -1)
            match = code == want[:, None].astype(np.float64)
            masked = np.where(match, score, -np.inf)
            parts.append(
                (
                    t,
                    (masked > hi).sum(axis=1),
                    ((masked >= lo) & (masked <= hi)).sum(axis=1),
                    masked.max(axis=1, initial=-np.inf),
                    match.sum(axis=1),
                )
            )
    if not parts:
        z = np.zeros(0, dtype=np.int64)
        return ExactCounts(z, z, z, np.zeros(0), z)
    cols = [np.concatenate(c) for c in zip(*parts, strict=True)]
    return ExactCounts(
        cols[0].astype(np.int64),
        cols[1].astype(np.int64),
        cols[2].astype(np.int64),
        cols[3].astype(np.float64),
        cols[4].astype(np.int64),
    )


def true_candidate_rank(
    own: int,
    true_score: float,
    templates: np.ndarray,
    upper_bound: np.ndarray,
    template_sites: Callable[[int], tuple[np.ndarray, np.ndarray, np.ndarray]],
    *,
    n_templates: float = math.nan,
    cap: int = 100,
    tolerance: float = 1e-9,
    max_states: int = 5_000_000,
    exact: ExactCounts | None = None,
) -> TrueRank:
    """Test 1 for one structure: rank of its true candidate among all of its composition.

    Parameters
    ----------
    own : int
        The structure's own template.
    true_score : float
        Log-score of its true assignment on its own template.
    templates : ndarray of shape (n,), int
        Every template that might yield the composition with a candidate
        scoring at least ``true_score - tolerance`` (``own`` among them); no
        other template may. Templates that turn out not to yield the
        composition at all are skipped.
    upper_bound : ndarray of shape (n,), float
        An upper bound of each template's best score (orders the work).
    template_sites : callable
        ``template_sites(t) -> (log_likelihood (n_sites, k), multiplicity
        (n_sites,), target (k,))`` of template t for the composition.
    n_templates : float
        Templates that yield the composition at all (reported as is).
    cap, tolerance, max_states
        See :class:`EvaluateParams`. The cap bounds the depth-first counting
        only; templates in ``exact`` are counted in full.
    exact : ExactCounts, optional
        Templates already counted exactly against ``true_score`` (e.g. by
        :func:`small_template_counts`); they are not visited again.

    Returns
    -------
    TrueRank
    """
    templates = np.asarray(templates, dtype=np.int64)
    if not (templates == own).any():
        raise AfpxError(f"template {own} is missing from the candidates of its own composition")
    hi, lo = true_score + tolerance, true_score - tolerance
    better = tied = t_better = t_tied = n_inexact = 0
    done = np.zeros(0, dtype=np.int64)
    if exact is not None:
        done = exact.templates
        reach = exact.total > 0
        better += int(exact.better[reach].sum())
        tied += int(exact.tied[reach].sum()) - int((done[reach] == own).any())
        other = reach & (done != own)
        t_better += int((exact.best[other] > hi).sum())
        t_tied += int(((exact.best[other] >= lo) & (exact.best[other] <= hi)).sum())
    rest = ~np.isin(templates, done)
    templates = templates[rest]
    upper_bound = np.asarray(upper_bound, dtype=np.float64)[rest]
    order = np.argsort(-upper_bound, kind="stable")
    dfs = 0  # assignments counted by the search, bounded by the cap
    cut_all = False
    cut_tpl = t_better + t_tied >= cap
    tpl_partial = False  # some template's best was not compared (template level censored)
    sequence = templates[order].tolist()
    for pos, t in enumerate(sequence):
        if cut_all and cut_tpl:
            tpl_partial = tpl_partial or any(u != own for u in sequence[pos:])
            break
        logl, mult, target = template_sites(t)
        if count_states(mult, target) > max_states:
            n_inexact += 1
            continue
        room = max(1, cap - dfs + (1 if t == own else 0)) if not cut_all else 1
        c = count_assignments(logl, mult, target, true_score, tolerance=tolerance, cap=room)
        if c.total == 0:
            continue
        if t != own and cut_tpl:
            tpl_partial = True
        elif t != own:
            t_better += int(c.best > hi)
            t_tied += int(lo <= c.best <= hi)
            cut_tpl = t_better + t_tied >= cap
        if not cut_all:
            better += c.better
            tied += c.tied - (1 if t == own else 0)  # not the true assignment itself
            dfs += c.better + c.tied
            cut_all = c.truncated or dfs >= cap
    if tpl_partial:
        tpl = (math.nan, math.nan, math.nan)
    else:
        tpl = (1.0 + t_better + t_tied / 2, float(1 + t_better), float(1 + t_better + t_tied))
    if not cut_all:
        return TrueRank(
            1.0 + better + tied / 2,
            float(1 + better),
            float(1 + better + tied),
            False,
            *tpl,
            n_templates,
            n_inexact,
        )
    # censored: count only the strictly better assignments, for the optimistic rank
    n_better = 0
    exact_better = int(exact.better[exact.total > 0].sum()) if exact is not None else 0
    opt = float("nan")
    bounds = upper_bound[order]
    for t, bound in zip(templates[order].tolist(), bounds.tolist(), strict=True):
        if bound <= hi:
            opt = float(1 + exact_better + n_better)
            break
        logl, mult, target = template_sites(t)
        if count_states(mult, target) > max_states:
            continue
        c = count_assignments(
            logl, mult, target, true_score, tolerance=tolerance, cap=cap - n_better, strict=True
        )
        n_better += c.better
        if c.truncated or n_better >= cap:
            break
    else:
        opt = float(1 + exact_better + n_better)
    return TrueRank(math.nan, opt, math.nan, True, *tpl, n_templates, n_inexact)


# =============================================================================
# the evaluation run
# =============================================================================

#: Edges of the Test 1 rank distribution (the last bin holds censored ranks).
RANK_EDGES: Final = (1, 2, 3, 6, 11, 31, 101, 301)
OS_BINS: Final = 20


@dataclass
class EvaluationReport:
    """Everything an evaluation run measured.

    Attributes
    ----------
    metrics : dict
        Every number (JSON-able), written as ``metrics.json``.
    arrays : xarray.Dataset
        Confusion matrices, likelihood histograms, per-structure Test 1 ranks
        and per-set Test 2 scores, written as ``arrays.zarr``.
    """

    metrics: dict[str, Any]
    arrays: xr.Dataset

    def table(self) -> str:
        """A short plain-text summary (the model next to every baseline)."""
        return summary_table(self.metrics)


def _symbols() -> list[str]:
    return schema.element_symbols()


def _formula(elements: Sequence[int], counts: Sequence[int]) -> str:
    from pymatgen.core import Composition

    symbols = _symbols()
    comp = {symbols[z - 1]: int(c) for z, c in zip(elements, counts, strict=True) if c}
    return str(Composition(comp).reduced_formula) if comp else ""


def _set_label(elements: Sequence[int]) -> str:
    symbols = _symbols()
    return "-".join(symbols[z - 1] for z in elements)


def _as_str_array(values: Any) -> np.ndarray:
    return np.asarray([str(v) for v in np.asarray(values).tolist()], dtype=object)


def check_evaluable(ds: xr.Dataset) -> None:
    """Raise :class:`AfpxError` unless the cube has likelihoods and splits."""
    schema.require_variables(
        ds,
        [schema.Z, schema.MULTIPLICITY, schema.STRUCTURE_INDEX, schema.DRAW],
        what="evaluation",
        fix="build it with `afpx build-cube`",
    )
    if schema.LIKELIHOOD not in ds.variables and schema.LIKELIHOOD_MEAN not in ds.variables:
        raise AfpxError(
            "evaluation needs site likelihoods, which the cube lacks; "
            "run `afpx likelihood CUBE --model MODEL` first"
        )
    for name in (schema.LIKELIHOOD, schema.LIKELIHOOD_MEAN):
        if name in ds.variables and ds[name].attrs.get("complete", True) in (False, 0, "false"):
            raise AfpxError(
                f"`{name}` in the cube was not completely written; "
                "run `afpx likelihood CUBE --model MODEL` again"
            )
    if schema.SPLIT not in ds.variables:
        raise AfpxError(
            "evaluation needs the train/holdout/test split, which the cube lacks; "
            "rebuild it with `afpx build-cube` (splits are assigned there)"
        )


def with_model_likelihoods(
    ds: xr.Dataset,
    model: str | os.PathLike[str],
    *,
    device: str = "cpu",
    block_sites: int = 8192,
    batch_size: int = 2048,
) -> xr.Dataset:
    """The cube with ``likelihood`` (and ``likelihood_mean``, ``softmax_pred``) of a model.

    The sites are scored in memory, block by block; the cube's store is not
    written (``afpx likelihood`` writes them into the store instead).

    Parameters
    ----------
    ds : xarray.Dataset
        The cube, with ``afp``, ``r0``, ``dmin_ratio`` and ``draw``.
    model : path
        A model folder written by ``afpx train``.
    device : {"cpu", "cuda"}
    block_sites : int
        Sites read at a time (never splitting the draws of a unique site).
    batch_size : int
        Sites per forward pass.

    Returns
    -------
    xarray.Dataset
        ``ds`` with the three variables replaced, attributes identifying the model.
    """
    from afpx.checkpoint import check_fingerprint, load_model
    from afpx.likelihood import dataset_context, draw_means, score_afp

    schema.require_variables(
        ds,
        [schema.AFP, schema.R0, schema.DMIN_RATIO, schema.DRAW],
        what="scoring a cube with a model",
        fix="build it with `afpx build-cube`",
    )
    m = load_model(model, device=device)
    check_fingerprint(m.fingerprint, dict(ds.attrs.get("fingerprint", {})), cube="the cube")
    draw = np.asarray(ds[schema.DRAW].values).astype(np.int64)
    context = dataset_context(ds, m)
    n = draw.size
    starts = np.append(np.flatnonzero(draw == 0), n)
    lik = np.empty((n, schema.N_ELEMENTS), dtype=np.float32)
    pred = np.empty(n, dtype=np.int16)
    a = 0
    while a < n:
        i = min(int(np.searchsorted(starts, a + block_sites)), starts.size - 1)
        b = int(starts[i])
        b = n if b <= a else b
        lik[a:b], pred[a:b] = score_afp(
            m,
            np.asarray(ds[schema.AFP][a:b].values),
            np.asarray(ds[schema.R0][a:b].values),
            np.asarray(ds[schema.DMIN_RATIO][a:b].values),
            context=None if context is None else context[a:b],
            batch_size=batch_size,
            device=device,
        )
        a = b
    attrs = {**m.identity(), "complete": True, "scored_in_memory": True}
    dims = (schema.SITE, schema.ELEMENT)
    out = ds.drop_vars(
        [v for v in (schema.LIKELIHOOD, schema.LIKELIHOOD_MEAN, schema.SOFTMAX_PRED) if v in ds]
    ).assign(
        {
            schema.LIKELIHOOD: (dims, lik, attrs),
            schema.SOFTMAX_PRED: ((schema.SITE,), pred, attrs),
        }
    )
    if n and int(draw.max()) > 0:
        out[schema.LIKELIHOOD_MEAN] = (dims, draw_means(lik, draw), attrs)
    return out


def _site_arrays(ds: xr.Dataset) -> dict[str, np.ndarray]:
    # small per-site and per-structure arrays, loaded eagerly (see STACK-NOTES)
    out = {
        "z": np.asarray(ds[schema.Z].values).astype(np.int64),
        "draw": np.asarray(ds[schema.DRAW].values).astype(np.int64),
        "structure": np.asarray(ds[schema.STRUCTURE_INDEX].values).astype(np.int64),
        "split": _as_str_array(ds[schema.SPLIT].values),
    }
    if schema.COORDINATION in ds.variables:
        out["coordination"] = np.asarray(ds[schema.COORDINATION].values).astype(np.int64)
    return out


def per_site_metrics(ds: xr.Dataset, *, bins: int = 50) -> tuple[dict[str, Any], xr.Dataset]:
    """Softmax error rate, confusion matrix and likelihood histograms per split.

    Every site of the cube (all draws) is one example, as in training.

    Parameters
    ----------
    ds : xarray.Dataset
        The cube, with ``likelihood`` and (for the error rate) ``softmax_pred``.
    bins : int
        Bins of the likelihood histograms over [0, 1].

    Returns
    -------
    metrics : dict
        Per split: ``n_sites``, ``error_rate`` (NaN without ``softmax_pred``).
    arrays : xarray.Dataset
        ``confusion`` (split, true_element, predicted_element) counts,
        ``confusion_normalised`` (rows sum to 1; NaN rows for absent elements),
        ``likelihood_histogram`` (split, kind, likelihood_bin).
    """
    import xarray as xr

    sites = _site_arrays(ds)
    split_of_site = sites["split"][sites["structure"]]
    has_pred = schema.SOFTMAX_PRED in ds.variables
    pred = np.asarray(ds[schema.SOFTMAX_PRED].values).astype(np.int64) if has_pred else None
    lk_name = schema.LIKELIHOOD if schema.LIKELIHOOD in ds.variables else schema.LIKELIHOOD_MEAN
    n_el = schema.N_ELEMENTS
    conf = np.zeros((len(schema.SPLITS), n_el, n_el), dtype=np.int64)
    hist = np.zeros((len(schema.SPLITS), 2, bins), dtype=np.int64)
    metrics: dict[str, Any] = {}
    chunk = 65536
    for i, split in enumerate(schema.SPLITS):
        idx = np.flatnonzero(split_of_site == split)
        for a in range(0, idx.size, chunk):
            part = idx[a : a + chunk]
            lk = np.asarray(ds[lk_name][part].values)
            t, o = likelihood_histogram(lk, sites["z"][part], bins=bins)
            hist[i, 0] += t
            hist[i, 1] += o
        if pred is not None:
            conf[i] = confusion_counts(sites["z"][idx], pred[idx])
        metrics[split] = {
            "n_sites": int(idx.size),
            "error_rate": error_rate(conf[i]) if pred is not None else math.nan,
        }
    metrics["softmax_available"] = bool(has_pred)
    coords = schema.element_coords()
    row = conf.sum(axis=2, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        normalised = np.where(row > 0, conf / np.where(row > 0, row, 1), np.nan)
    edges = np.linspace(0.0, 1.0, bins + 1)
    arrays = xr.Dataset(
        {
            "confusion": (("split", TRUE_ELEMENT, PREDICTED_ELEMENT), conf),
            "confusion_normalised": (("split", TRUE_ELEMENT, PREDICTED_ELEMENT), normalised),
            "likelihood_histogram": (("split", KIND, LIKELIHOOD_BIN), hist),
        },
        coords={
            "split": list(schema.SPLITS),
            TRUE_ELEMENT: coords[schema.ELEMENT][1],
            PREDICTED_ELEMENT: coords[schema.ELEMENT][1],
            f"{TRUE_ELEMENT}_symbol": (TRUE_ELEMENT, coords[schema.SYMBOL][1].astype(str)),
            f"{PREDICTED_ELEMENT}_symbol": (
                PREDICTED_ELEMENT,
                coords[schema.SYMBOL][1].astype(str),
            ),
            KIND: ["true", "other"],
            "bin_lower": (LIKELIHOOD_BIN, edges[:-1]),
            "bin_upper": (LIKELIHOOD_BIN, edges[1:]),
        },
    )
    return metrics, arrays


def _rank_bins(ranks: np.ndarray, censored: np.ndarray, cap: int) -> dict[str, int]:
    edges = [e for e in RANK_EDGES if e <= cap] + [cap + 1]
    out: dict[str, int] = {}
    for a, b in itertools.pairwise(edges):
        label = f"{a}" if b == a + 1 else f"{a}-{b - 1}"
        out[label] = int(((ranks >= a) & (ranks < b) & ~censored).sum())
    out[f">{cap}"] = int(censored.sum())
    return out


def _summarise_test1(
    rows: list[TrueRank], n_candidates: np.ndarray, cap: int, hit_k: Sequence[int]
) -> dict[str, Any]:
    if not rows:
        return {"n_structures": 0}
    get = {
        f: np.asarray([getattr(r, f) for r in rows], dtype=np.float64)
        for f in TrueRank.__dataclass_fields__
    }
    censored = get["censored"].astype(bool)
    out: dict[str, Any] = {"n_structures": len(rows), "n_censored": int(censored.sum())}
    for k in hit_k:
        for suffix, name in (
            ("", "rank"),
            ("_optimistic", "rank_optimistic"),
            ("_pessimistic", "rank_pessimistic"),
        ):
            out[f"top{k}{suffix}"] = float(np.mean(np.nan_to_num(get[name], nan=np.inf) <= k))
        for suffix, name in (
            ("", "template_rank"),
            ("_optimistic", "template_rank_optimistic"),
            ("_pessimistic", "template_rank_pessimistic"),
        ):
            out[f"template_top{k}{suffix}"] = float(np.mean(get[name] <= k))
    ranks = np.nan_to_num(get["rank"], nan=np.inf)
    out["median_rank"] = float(np.median(ranks))
    out["mean_reciprocal_rank"] = float(np.mean(1.0 / ranks))
    out["template_median_rank"] = float(np.median(get["template_rank"]))
    out["rank_distribution"] = _rank_bins(get["rank"], censored, cap)
    out["n_inexact_templates"] = int(get["n_inexact"].sum())
    out["templates_per_structure"] = _count_stats(get["n_templates"])
    out["candidates_per_structure"] = _count_stats(n_candidates)
    return out


def _count_stats(values: np.ndarray) -> dict[str, float]:
    # NaN marks structures whose candidates were not counted (no composition table)
    v = np.asarray(values, dtype=np.float64)
    ok = v[~np.isnan(v)]
    if not ok.size:
        return {"n_counted": 0, "n_not_counted": int(v.size)}
    return {
        "n_counted": int(ok.size),
        "n_not_counted": int(v.size - ok.size),
        "mean": float(ok.mean()),
        "median": float(np.median(ok)),
        "max": float(ok.max()),
        "total": float(ok.sum()),
    }


def _summarise_test2(sets: list[dict[str, float]], hit_k: Sequence[int]) -> dict[str, Any]:
    if not sets:
        return {"n_sets": 0}
    col = {key: np.asarray([s[key] for s in sets], dtype=np.float64) for key in sets[0]}
    os_ = col["os"]
    defined = ~np.isnan(os_)
    out: dict[str, Any] = {
        "n_sets": len(sets),
        "n_os_defined": int(defined.sum()),
        "n_os_undefined": int((~defined).sum()),
        "os_mean": float(os_[defined].mean()) if defined.any() else math.nan,
        "os_median": float(np.median(os_[defined])) if defined.any() else math.nan,
        "os_fraction_above_0.9": float((os_[defined] > 0.9).mean()) if defined.any() else math.nan,
        "os_optimistic_mean": float(np.nanmean(col["os_optimistic"]))
        if defined.any()
        else math.nan,
        "os_pessimistic_mean": float(np.nanmean(col["os_pessimistic"]))
        if defined.any()
        else math.nan,
        "os_histogram": np.histogram(os_[defined], bins=OS_BINS, range=(-1.0, 1.0))[0].tolist(),
        "mean_reciprocal_rank": float(col["reciprocal_rank"].mean()),
        "median_first_rank": float(np.nanmedian(col["first_rank"])),
        "n_compositions": int(col["n_compositions"].sum()),
        "n_known": int(col["n_known"].sum()),
        "n_known_missing": int(col["n_known_missing"].sum()),
        "n_candidates_scored": int(col["n_candidates_scored"].sum()),
    }
    for k in hit_k:
        out[f"hit@{k}"] = float(col[f"hit@{k}"].mean())
    if "delta_os" in col:
        d = col["delta_os"]
        ok = ~np.isnan(d)
        out["delta_os_mean"] = float(d[ok].mean()) if ok.any() else math.nan
        out["delta_os_median"] = float(np.median(d[ok])) if ok.any() else math.nan
        out["delta_os_fraction_positive"] = float((d[ok] > 0).mean()) if ok.any() else math.nan
    return out


@dataclass(frozen=True, eq=False)
class _TemplateSites:
    """Sites of a template restricted to an element set, and its target counts."""

    index: TemplateIndex
    log_likelihood: np.ndarray  # (n_sites_total, k) float64
    composition: np.ndarray  # (k,) reduced

    def __call__(self, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a, b = self.index.site_start[t], self.index.site_start[t + 1]
        mult = self.index.reduced[a:b]
        scale = int(self.index.total[t]) // int(self.composition.sum())
        return self.log_likelihood[a:b], mult, self.composition * scale


@dataclass(frozen=True, eq=False)
class SetContext:
    """What Test 1 and Test 2 need to know about one element set, for every model.

    Attributes
    ----------
    known : ndarray of shape (Q, k), int64
        The set's known reduced compositions (templates made of exactly the set).
    own_templates : ndarray of shape (n_own,), int64
        Templates made of exactly the set.
    own_known : ndarray of shape (n_own,), int64
        Row of ``known`` that each of them has.
    own_counts : ndarray of shape (n_templates, k), int64
        Every template's own reduced composition in the set's order; -1 rows
        for templates made of other elements.
    reachable_without_own : ndarray of shape (Q,), bool
        Whether a template of another composition generates each known one
        (True when unknown, i.e. without a composition table).
    """

    known: np.ndarray
    own_templates: np.ndarray
    own_known: np.ndarray
    own_counts: np.ndarray
    reachable_without_own: np.ndarray


def set_context(
    index: TemplateIndex,
    elements: Sequence[int],
    table: CompositionTable | None,
    *,
    own_templates: Sequence[int] | None = None,
) -> SetContext:
    """The :class:`SetContext` of a sorted element set.

    ``own_templates`` (the templates made of exactly the set) is found by a
    scan of every template when not given.
    """
    S = tuple(int(e) for e in elements)
    k = len(S)
    tc = index.compositions
    if own_templates is None:
        own_templates = [t for t, es in enumerate(tc.element_set) if es == S]
    own_t = np.asarray(own_templates, dtype=np.int64)
    own_rows = np.asarray([tc.counts[t] for t in own_t.tolist()], dtype=np.int64).reshape(-1, k)
    known = np.unique(own_rows, axis=0) if own_rows.size else own_rows
    own_known = _match_rows(known, own_rows)
    own_counts = np.full((index.n_templates, k), -1, dtype=np.int64)
    own_counts[own_t] = known[own_known]
    reach = np.ones(known.shape[0], dtype=bool)
    if table is not None:
        for i, j in enumerate(table.find(known).tolist()):
            ts, _ = table.templates_of(j) if j >= 0 else (np.zeros(0, np.int64), None)
            reach[i] = bool((own_counts[ts] != known[i]).any(axis=1).any())
    return SetContext(known, own_t, own_known, own_counts, reach)


def best_for_composition(
    index: TemplateIndex,
    log_likelihood: np.ndarray,
    composition: np.ndarray,
    templates: np.ndarray,
    upper_bound: np.ndarray,
) -> float:
    """Best score of any candidate of the given templates with one reduced composition.

    Templates are visited from the highest upper bound down and the search
    stops once no remaining template can beat the best found (exact).
    """
    comp = np.asarray(composition, dtype=np.int64)
    ts = np.asarray(templates, dtype=np.int64)
    ts = ts[np.argsort(-upper_bound[ts], kind="stable")]
    sites = _TemplateSites(index, log_likelihood, comp)
    limit = bruteforce_limit(comp.size)
    best = -math.inf
    start, step = 0, 64
    while start < ts.size and upper_bound[ts[start]] > best:
        chunk = ts[start : start + step]
        chunk = chunk[upper_bound[chunk] > best]
        small = small_template_counts(index, log_likelihood, chunk, comp, math.inf)
        best = max(best, float(small.best.max(initial=-np.inf)))
        for t in chunk[index.n_sites[chunk] > limit].tolist():
            if upper_bound[t] > best:
                logl, mult, target = sites(t)
                best = max(best, count_assignments(logl, mult, target, math.inf).best)
        start += step
        step *= 4
    return best


def _test2_set(
    index: TemplateIndex,
    table: CompositionTable,
    log_likelihood: np.ndarray,
    upper_bound: np.ndarray,
    ctx: SetContext,
    *,
    hit_k: Sequence[int],
    tolerance: float,
    timing: dict[str, float] | None = None,
) -> dict[str, dict[str, float]]:
    """Test 2 of one element set and one model, both variants, exactly.

    Only candidates scoring at least the lowest known composition's score can
    move a known composition, so only those are generated. The threshold is
    the lowest exact best score of a known composition, over all templates
    and over the templates of other compositions (:func:`best_for_composition`),
    so that one pass serves both variants.
    """
    known = ctx.known
    # the exact best score of every known composition, with and without its own formula:
    # nothing below the lowest of them can move a known composition
    lowest = math.inf
    t0 = time.perf_counter()
    for i in range(known.shape[0]):
        j = int(table.find(known[i : i + 1])[0])
        if j < 0:
            raise AfpxError(f"known composition {known[i].tolist()} is missing from the table")
        ts, _ = table.templates_of(j)
        lowest = min(lowest, best_for_composition(index, log_likelihood, known[i], ts, upper_bound))
        if ctx.reachable_without_own[i]:
            ts = ts[(ctx.own_counts[ts] != known[i]).any(axis=1)]
            b = best_for_composition(index, log_likelihood, known[i], ts, upper_bound)
            lowest = min(lowest, b)
    thr = lowest - 2 * tolerance
    if timing is not None:
        timing["test2_threshold_s"] = timing.get("test2_threshold_s", 0.0) + (
            time.perf_counter() - t0
        )
    tm, red, sc = candidates_above(index, log_likelihood, thr, upper_bound=upper_bound)
    own_row = (ctx.own_counts[tm] == red).all(axis=1) if tm.size else np.zeros(0, bool)
    out: dict[str, dict[str, float]] = {}
    for variant, keep in zip(VARIANTS, (None, ~own_row), strict=True):
        ranking = rank_candidates(tm, red, sc, keep=keep)
        idx = _match_rows(ranking.counts, known)
        missing = idx < 0
        if variant == VARIANTS[0] and missing.any():
            raise AfpxError("a known composition was not generated by its own template")
        if variant == VARIANTS[1] and (missing & ctx.reachable_without_own).any():
            raise AfpxError("a known composition was lost below the Test 2 threshold")
        row = set_positions(
            ranking.log_score, idx, n_total=table.n_compositions, hit_k=hit_k, tolerance=tolerance
        )
        row["n_candidates_scored"] = float(tm.size if keep is None else keep.sum())
        row["threshold"] = thr
        out[variant] = row
    return out


@dataclass(frozen=True, eq=False)
class _RunState:
    """Everything the evaluation of one element set needs (shared by workers)."""

    index: TemplateIndex
    tables: dict[int, CompositionTable]
    libraries: dict[str, TemplateLibrary]
    params: EvaluateParams
    by_set: dict[tuple[int, ...], list[int]]
    test1_by_set: dict[tuple[int, ...], list[int]]
    test2_sets: frozenset[tuple[int, ...]]
    case_sets: frozenset[tuple[int, ...]]


@dataclass
class _SetResult:
    elements: tuple[int, ...]
    test1: dict[str, dict[int, TrueRank]]
    test1_candidates: dict[int, float]
    test2: dict[str, dict[str, dict[str, float]]] | None
    case: dict[str, Any] | None
    timing: dict[str, float]


def _evaluate_set(state: _RunState, S: tuple[int, ...]) -> _SetResult:
    """Test 1, Test 2 and the case study of one element set, for every model."""
    from afpx.templates import COUNTS, LOG_SCORE, TEMPLATE, best_candidates

    params, index = state.params, state.index
    tc = index.compositions
    k = len(S)
    cols = np.asarray(S, dtype=np.int64) - 1
    table = state.tables.get(k)
    ctx = set_context(index, S, table, own_templates=state.by_set.get(S, []))
    known_S, own_t = ctx.known, ctx.own_templates
    timing: dict[str, float] = {}
    res = _SetResult(S, {}, {}, None, None, timing)
    in_test2 = S in state.test2_sets and table is not None
    if in_test2:
        res.test2 = {v: {} for v in VARIANTS}

    def add_time(key: str, t0: float) -> None:
        timing[key] = timing.get(key, 0.0) + time.perf_counter() - t0

    for name, lib in state.libraries.items():
        logl = np.asarray(lib.log_likelihood[:, cols], dtype=np.float64)
        ub = index.upper_bound(logl)
        if in_test2 and res.test2 is not None and table is not None:
            t0 = time.perf_counter()
            rows = _test2_set(
                index,
                table,
                logl,
                ub,
                ctx,
                hit_k=params.hit_k,
                tolerance=params.tie_tolerance,
                timing=timing,
            )
            for variant in VARIANTS:
                res.test2[variant][name] = rows[variant]
            add_time(f"test2_s[{name}]", t0)
            add_time("test2_s", t0)
        if S in state.test1_by_set:
            t0 = time.perf_counter()
            own_true = index.true_scores(lib.log_likelihood, own_t)
            true_of = dict(zip(own_t.tolist(), own_true.tolist(), strict=True))
            ranks = res.test1.setdefault(name, {})
            for own in state.test1_by_set[S]:
                C = np.asarray(tc.counts[own], dtype=np.int64)
                if table is not None:
                    reach, ways = table.templates_of(int(table.find(C)[0]))
                    n_templates, n_candidates = float(reach.size), float(ways.sum())
                else:
                    reach = np.flatnonzero((index.n_sites >= k) & (index.total % int(C.sum()) == 0))
                    n_templates = n_candidates = math.nan
                s_true = true_of[own]
                cand = reach[ub[reach] >= s_true - params.tie_tolerance]
                exact = small_template_counts(
                    index, logl, cand, C, s_true, tolerance=params.tie_tolerance
                )
                ranks[own] = true_candidate_rank(
                    own,
                    s_true,
                    cand,
                    ub[cand],
                    _TemplateSites(index, logl, C),
                    n_templates=n_templates,
                    cap=params.test1_cap,
                    tolerance=params.tie_tolerance,
                    max_states=params.test1_max_states,
                    exact=exact,
                )
                res.test1_candidates[own] = n_candidates
            add_time(f"test1_s[{name}]", t0)
            add_time("test1_s", t0)
        if S in state.case_sets:
            t0 = time.perf_counter()
            cands = best_candidates(lib, list(S), assignments=False)
            tmpl = np.asarray(cands[TEMPLATE].values, dtype=np.int64)
            red = reduce_counts(np.asarray(cands[COUNTS].values).reshape(tmpl.size, k))
            score = np.asarray(cands[LOG_SCORE].values, dtype=np.float64)
            if res.case is None:
                res.case = {}
            res.case[name] = _case_study(S, lib, tmpl, red, score, known_S, params)
            add_time("case_study_s", t0)
    return res


_WORKER_STATE: _RunState | None = None


def _worker_init(state: _RunState) -> None:
    global _WORKER_STATE
    _WORKER_STATE = state
    try:  # one BLAS thread per worker process
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        pass


def _worker_run(S: tuple[int, ...]) -> _SetResult:
    assert _WORKER_STATE is not None
    return _evaluate_set(_WORKER_STATE, S)


def _map_sets(
    state: _RunState, sets: Sequence[tuple[int, ...]], *, workers: int, progress: bool
) -> Iterable[_SetResult]:
    """Evaluate element sets in order, in this process or in forked worker processes."""
    import multiprocessing

    bar: Any = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(sets), desc="element sets", unit="set")
    try:
        if workers > 1 and "fork" in multiprocessing.get_all_start_methods():
            ctx = multiprocessing.get_context("fork")
            with ctx.Pool(workers, initializer=_worker_init, initargs=(state,)) as pool:
                for res in pool.imap(_worker_run, sets, chunksize=4):
                    if bar is not None:
                        bar.update()
                    yield res
        else:
            for S in sets:
                res = _evaluate_set(state, S)
                if bar is not None:
                    bar.update()
                yield res
    finally:
        if bar is not None:
            bar.close()


def sample_sets(
    sets: Sequence[tuple[int, ...]], max_per_size: int, *, seed: int = 0
) -> list[tuple[int, ...]]:
    """A seeded sample of at most ``max_per_size`` element sets of each size, sorted.

    The sample depends only on the sets, ``max_per_size`` and ``seed``, never
    on their input order.
    """
    rng = np.random.default_rng(seed)
    out: list[tuple[int, ...]] = []
    for size in sorted({len(s) for s in sets}):
        group = sorted(s for s in set(sets) if len(s) == size)
        if len(group) > max_per_size:
            keep = np.sort(rng.choice(len(group), size=max_per_size, replace=False))
            group = [group[i] for i in keep]
        out.extend(group)
    return out


def evaluate(
    ds: xr.Dataset,
    *,
    params: EvaluateParams = EvaluateParams(),
    baseline_params: BaselineParams | None = None,
    progress: bool = False,
    workers: int = 1,
) -> EvaluationReport:
    """Run Test 1, Test 2, the softmax metrics and the case study, model and baselines.

    Parameters
    ----------
    ds : xarray.Dataset
        The cube (:func:`afpx.cube.open_cube`) with ``likelihood`` (and, for the
        error rate, ``softmax_pred``) and ``split``.
    params : EvaluateParams
        What to evaluate.
    baseline_params : BaselineParams, optional
        Parameters of the baselines (paper-free defaults).
    progress : bool
        Show a progress bar over element sets.
    workers : int
        Element sets evaluated in this many forked processes (1: in this
        process). The results do not depend on it.

    Returns
    -------
    EvaluationReport
    """
    import xarray as xr

    from afpx.baselines import BaselineParams, baseline_likelihoods
    from afpx.templates import TemplateLibrary

    if workers < 1:
        raise AfpxError(f"workers must be at least 1, got {workers}")
    baseline_params = baseline_params or BaselineParams()
    check_evaluable(ds)
    t_start = time.perf_counter()
    site_metrics, site_arrays = per_site_metrics(ds, bins=params.histogram_bins)

    library = TemplateLibrary.from_cube(ds)
    sites = _site_arrays(ds)
    # the library's sites: draw 0, grouped by structure (as TemplateLibrary.from_cube orders them)
    draw0 = np.flatnonzero(sites["draw"] == 0)
    draw0 = draw0[np.argsort(sites["structure"][draw0], kind="stable")]
    if draw0.size != library.z.size or not np.array_equal(sites["z"][draw0], library.z):
        raise AfpxError("the template library's sites are not the cube's draw-0 sites in order")
    if "coordination" not in sites and any(b == "coordination" for b in params.baselines):
        raise AfpxError("the coordination baseline needs `coordination`, which the cube lacks")
    coordination = sites.get("coordination", np.zeros_like(sites["z"]))[draw0]
    is_train = sites["split"][sites["structure"][draw0]] == "train"
    base = baseline_likelihoods(
        library.z, coordination, is_train, names=params.baselines, params=baseline_params
    )
    libraries: dict[str, TemplateLibrary] = {"model": library}
    libraries.update({name: library.with_likelihood(lk) for name, lk in base.items()})
    models = list(libraries)

    index = TemplateIndex.from_arrays(library.site_template, library.z, library.multiplicity)
    tc = index.compositions
    t_split = _as_str_array(library.split) if library.split is not None else None
    if t_split is None:
        raise AfpxError("the template library carries no split; rebuild the cube with splits")
    test_templates = np.flatnonzero(t_split == params.split)
    if test_templates.size == 0:
        raise AfpxError(f"no structure of the cube is in the {params.split!r} split")
    test1_by_set: dict[tuple[int, ...], list[int]] = {}
    for t in test_templates.tolist():
        test1_by_set.setdefault(tc.element_set[t], []).append(t)
    test2_sets = sorted(
        (s for s in test1_by_set if len(s) in params.set_sizes), key=lambda s: (len(s), s)
    )
    if params.test2_max_sets is not None:
        test2_sets = sample_sets(test2_sets, params.test2_max_sets, seed=params.test2_seed)
    symbols = _symbols()
    case_sets: list[tuple[int, ...]] = []
    for names in params.case_study:
        unknown = [n for n in names if n not in symbols]
        if unknown:
            raise AfpxError(f"unknown element symbol(s) in the case study: {', '.join(unknown)}")
        case_sets.append(tuple(sorted(symbols.index(n) + 1 for n in names)))
    all_sets = sorted(
        set(test1_by_set) | set(test2_sets) | set(case_sets), key=lambda s: (len(s), s)
    )
    by_set: dict[tuple[int, ...], list[int]] = {}
    for t, es in enumerate(tc.element_set):
        by_set.setdefault(es, []).append(t)

    test1_rows: dict[str, dict[int, TrueRank]] = {m: {} for m in models}
    test1_candidates: dict[int, float] = {}
    test2_rows: dict[str, dict[str, list[dict[str, float]]]] = {
        v: {m: [] for m in models} for v in VARIANTS
    }
    case: dict[str, Any] = {}
    timing = {
        "tables_s": 0.0,
        "test1_s": 0.0,
        "test2_s": 0.0,
        "test2_threshold_s": 0.0,
        "case_study_s": 0.0,
    }
    # the likelihood-free composition tables, built once and shared by every set
    table_sizes = set(params.set_sizes) | set(range(1, params.table_max_elements + 1))
    tables: dict[int, CompositionTable] = {}
    for k in sorted({len(S) for S in set(test1_by_set) | set(test2_sets)} & table_sizes):
        t0 = time.perf_counter()
        tables[k] = CompositionTable.build(index, k)
        timing["tables_s"] += time.perf_counter() - t0
    state = _RunState(
        index=index,
        tables=tables,
        libraries=libraries,
        params=params,
        by_set=by_set,
        test1_by_set=test1_by_set,
        test2_sets=frozenset(test2_sets),
        case_sets=frozenset(case_sets),
    )
    for res in _map_sets(state, all_sets, workers=workers, progress=progress):
        for key, value in res.timing.items():
            timing[key] = timing.get(key, 0.0) + value
        for name in models:
            test1_rows[name].update(res.test1.get(name, {}))
            for variant in VARIANTS:
                if res.test2 is not None:
                    test2_rows[variant][name].append(res.test2[variant][name])
        test1_candidates.update(res.test1_candidates)
        if res.case is not None:
            case[_set_label(res.elements)] = res.case

    # -- aggregate -----------------------------------------------------------------
    for variant in VARIANTS:
        ref = test2_rows[variant].get("constant")
        for name in models:
            for i, row in enumerate(test2_rows[variant][name]):
                row["delta_os"] = row["os"] - ref[i]["os"] if ref is not None else math.nan
    test1_order = [t for S in all_sets for t in test1_by_set.get(S, [])]
    n_cand = np.asarray([test1_candidates[t] for t in test1_order], dtype=np.float64)
    test1_metrics = {
        name: _summarise_test1(
            [test1_rows[name][t] for t in test1_order], n_cand, params.test1_cap, params.hit_k
        )
        for name in models
    }
    sizes = sorted({len(S) for S in test2_sets})
    test2_metrics: dict[str, Any] = {}
    for variant in VARIANTS:
        test2_metrics[variant] = {}
        for name in models:
            set_rows = test2_rows[variant][name]
            by_size = {
                _size_label(n): _summarise_test2(
                    [r for S, r in zip(test2_sets, set_rows, strict=True) if len(S) == n],
                    params.hit_k,
                )
                for n in sizes
            }
            by_size["all"] = _summarise_test2(set_rows, params.hit_k)
            test2_metrics[variant][name] = by_size
    wall = time.perf_counter() - t_start
    metrics: dict[str, Any] = {
        "afpx_version": _version(),
        "params": params.to_attrs(),
        "baseline_params": baseline_params.to_attrs(),
        "cube": _cube_summary(ds, library),
        "likelihood": _json_attrs(
            ds[
                schema.LIKELIHOOD_MEAN
                if schema.LIKELIHOOD_MEAN in ds.variables
                else schema.LIKELIHOOD
            ].attrs
        ),
        "models": models,
        "softmax": site_metrics,
        "test1": test1_metrics,
        "test2": test2_metrics,
        "case_study": case,
        "runtime": {
            **{k: round(v, 3) for k, v in timing.items()},
            "test2_wall_s": round(timing["test2_s"] + timing["tables_s"], 3),
            "total_s": round(wall, 3),
            "n_element_sets": len(all_sets),
            "n_test1_structures": len(test1_order),
            "n_test2_sets": len(test2_sets),
        },
        "candidate_space": {
            _size_label(k): {
                "n_compositions": tab.n_compositions,
                "n_template_composition_pairs": int(tab.row_template.size),
                "n_assignments": float(tab.row_assignments.sum()),
            }
            for k, tab in sorted(tables.items())
        },
    }
    metrics["verdict"] = verdict(metrics)
    arrays = xr.merge(
        [
            site_arrays,
            _test1_arrays(test1_order, test1_rows, n_cand, library, models),
            _test2_arrays(test2_sets, test2_rows, models),
        ],
        compat="no_conflicts",
        join="outer",
    )
    arrays.attrs.update(
        {"params": params.to_attrs(), "baseline_params": baseline_params.to_attrs()}
    )
    return EvaluationReport(metrics=metrics, arrays=arrays)


def _size_label(n: int) -> str:
    return {1: "unary", 2: "binary", 3: "ternary", 4: "quaternary"}.get(n, f"{n}-ary")


def _version() -> str:
    from afpx import __version__

    return __version__


def _json_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    import json

    out: dict[str, Any] = {}
    for key, value in attrs.items():
        try:
            json.dumps(value)
            out[str(key)] = value
        except TypeError:
            out[str(key)] = str(value)
    return out


def _cube_summary(ds: xr.Dataset, library: TemplateLibrary) -> dict[str, Any]:
    keep = ("fingerprint", "draws", "seed", "deterministic", "afpx_version", "sources", "split")
    split = _as_str_array(library.split) if library.split is not None else np.zeros(0, object)
    return {
        "n_sites": int(ds.sizes[schema.SITE]),
        "n_structures": int(ds.sizes[schema.STRUCTURE]),
        "n_templates": int(library.structure_id.size),
        "n_template_sites": int(library.z.size),
        "templates_per_split": {s: int((split == s).sum()) for s in schema.SPLITS},
        "attrs": _json_attrs({k: ds.attrs[k] for k in keep if k in ds.attrs}),
    }


def _case_study(
    elements: tuple[int, ...],
    lib: TemplateLibrary,
    template: np.ndarray,
    reduced: np.ndarray,
    log_score: np.ndarray,
    known: np.ndarray,
    params: EvaluateParams,
) -> dict[str, Any]:
    ranking = rank_candidates(template, reduced, log_score)
    mid, opt, pes = tie_ranks(ranking.log_score, tolerance=params.tie_tolerance)
    is_known = np.zeros(mid.size, dtype=bool)
    kidx = _match_rows(ranking.counts, known)
    is_known[kidx[kidx >= 0]] = True
    # by mid-rank; exact ties in the order of their compositions, never of the input
    keys = [ranking.counts[:, c] for c in reversed(range(ranking.counts.shape[1]))]
    order = np.lexsort((*keys, mid))

    def row(i: int) -> dict[str, Any]:
        t = int(ranking.template[i])
        return {
            "formula": _formula(elements, ranking.counts[i].tolist()),
            "rank": float(mid[i]),
            "rank_optimistic": int(opt[i]),
            "rank_pessimistic": int(pes[i]),
            "log_score": float(ranking.log_score[i]),
            "known": bool(is_known[i]),
            "template": str(lib.structure_id[t]),
            "template_formula": str(lib.formula[t]),
            "template_spacegroup": int(lib.spacegroup[t]),
        }

    known_rows = []
    for j, comp in enumerate(known.tolist()):
        i = int(kidx[j])
        known_rows.append(row(i) if i >= 0 else {"formula": _formula(elements, comp), "rank": None})
    known_rows.sort(key=lambda r: (r["rank"] is None, r["rank"] or 0.0))
    return {
        "n_compositions": int(mid.size),
        "top": [row(int(i)) for i in order[: params.case_top]],
        "known": known_rows,
    }


# -- which model wins ------------------------------------------------------------------

#: (section, path, label) of the numbers the verdict compares; higher is better.
VERDICT_METRICS: Final = (
    ("test1", ("top1",), "Test 1 top-1"),
    ("test1", ("top10",), "Test 1 top-10"),
    ("test1", ("mean_reciprocal_rank",), "Test 1 MRR"),
    ("test2", ("all_templates", "binary", "hit@1"), "Test 2 binary hit@1"),
    ("test2", ("all_templates", "binary", "hit@10"), "Test 2 binary hit@10"),
    ("test2", ("all_templates", "binary", "mean_reciprocal_rank"), "Test 2 binary MRR"),
    ("test2", ("all_templates", "binary", "os_mean"), "Test 2 binary mean OS"),
    ("test2", ("all_templates", "ternary", "hit@1"), "Test 2 ternary hit@1"),
    ("test2", ("all_templates", "ternary", "hit@10"), "Test 2 ternary hit@10"),
    ("test2", ("all_templates", "ternary", "mean_reciprocal_rank"), "Test 2 ternary MRR"),
    ("test2", ("all_templates", "ternary", "os_mean"), "Test 2 ternary mean OS"),
)


def _lookup(metrics: Mapping[str, Any], section: str, path: Sequence[str], model: str) -> float:
    node: Any = metrics.get(section, {})
    if section == "test2":
        node = node.get(path[0], {}).get(model, {})
        path = path[1:]
    else:
        node = node.get(model, {})
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return math.nan
        node = node[key]
    return float(node) if isinstance(node, int | float) else math.nan


def verdict(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Does the model beat every baseline, metric by metric?

    Parameters
    ----------
    metrics : mapping
        The ``metrics`` of an :class:`EvaluationReport` (``models`` lists
        ``"model"`` first, then the baselines).

    Returns
    -------
    dict
        ``per_metric``: label to {model value, best baseline, its value,
        beats (bool, None when undefined)}; ``beats_every_baseline``: True only
        when the model beats the best baseline on every defined metric;
        ``not_beaten``: labels where it does not.
    """
    models = [m for m in metrics.get("models", []) if m != "model"]
    per: dict[str, Any] = {}
    losses: list[str] = []
    ties: list[str] = []
    for section, path, label in VERDICT_METRICS:
        value = _lookup(metrics, section, path, "model")
        base = {m: _lookup(metrics, section, path, m) for m in models}
        base = {m: v for m, v in base.items() if not math.isnan(v)}
        if math.isnan(value) or not base:
            per[label] = {"model": value, "beats": None}
            continue
        best = max(base, key=lambda m: base[m])
        beats = value > base[best]
        per[label] = {"model": value, "best_baseline": best, "baseline": base[best], "beats": beats}
        if not beats:
            losses.append(label)
            if value == base[best]:
                ties.append(label)
    defined = [v for v in per.values() if v["beats"] is not None]
    return {
        "per_metric": per,
        "beats_every_baseline": bool(defined) and not losses,
        "not_beaten": losses,
        "tied_with_a_baseline": ties,
    }


def summary_table(metrics: Mapping[str, Any]) -> str:
    """The model next to every baseline on the main numbers, as plain text."""
    models = list(metrics.get("models", []))
    rows: list[tuple[str, list[float]]] = []
    for section, path, label in VERDICT_METRICS:
        rows.append((label, [_lookup(metrics, section, path, m) for m in models]))
    for size in ("binary", "ternary"):
        rows.append(
            (
                f"Test 2 {size} mean ΔOS vs constant",
                [
                    _lookup(metrics, "test2", ("all_templates", size, "delta_os_mean"), m)
                    for m in models
                ],
            )
        )
    width = max(len(r[0]) for r in rows)
    head = " " * width + "".join(f"{m:>14}" for m in models)
    lines = [head]
    for label, values in rows:
        lines.append(f"{label:<{width}}" + "".join(f"{v:>14.3f}" for v in values))
    soft = metrics.get("softmax", {})
    if soft.get("softmax_available"):
        rates = ", ".join(f"{s} {soft[s]['error_rate']:.3f}" for s in schema.SPLITS if s in soft)
        lines.append(f"softmax error rate: {rates}")
    v = metrics.get("verdict", {})
    if len(models) < 2:
        lines.append("no baselines were scored")
    elif v.get("beats_every_baseline"):
        lines.append("the model beats every baseline on every metric above")
    elif v:
        ties = v.get("tied_with_a_baseline", [])
        lines.append(
            "the model does NOT beat every baseline on: "
            + ", ".join(v.get("not_beaten", []))
            + (f" (ties: {', '.join(ties)})" if ties else "")
        )
    rt = metrics.get("runtime", {})
    if rt:
        lines.append(
            f"Test 2: {rt.get('n_test2_sets', 0)} sets, {rt.get('test2_wall_s', 0):.1f} s; "
            f"total {rt.get('total_s', 0):.1f} s"
        )
    return "\n".join(lines)


# -- arrays of the report ------------------------------------------------------------


def _test1_arrays(
    order: Sequence[int],
    rows: Mapping[str, Mapping[int, TrueRank]],
    n_candidates: np.ndarray,
    library: TemplateLibrary,
    models: Sequence[str],
) -> xr.Dataset:
    import xarray as xr

    fields = list(TrueRank.__dataclass_fields__)
    data = {
        f: np.asarray([[getattr(rows[m][t], f) for t in order] for m in models]).reshape(
            len(models), len(order)
        )
        for f in fields
    }
    idx = np.asarray(order, dtype=np.int64)
    dims = (MODEL, TEST1_STRUCTURE)
    return xr.Dataset(
        {f"test1_{f}": (dims, data[f]) for f in fields}
        | {"test1_n_candidates": ((TEST1_STRUCTURE,), n_candidates)},
        coords={
            MODEL: list(models),
            TEST1_STRUCTURE: idx,
            "test1_structure_id": (
                TEST1_STRUCTURE,
                _as_str_array(library.structure_id[idx]).astype(str),
            ),
            "test1_formula": (TEST1_STRUCTURE, _as_str_array(library.formula[idx]).astype(str)),
        },
    )


def _test2_arrays(
    sets: Sequence[tuple[int, ...]],
    rows: Mapping[str, Mapping[str, Sequence[Mapping[str, float]]]],
    models: Sequence[str],
) -> xr.Dataset:
    import xarray as xr

    if not sets:
        return xr.Dataset()
    keys = list(rows[VARIANTS[0]][models[0]][0])
    dims = (VARIANT, MODEL, TEST2_SET)
    data = {
        key: np.asarray(
            [[[r[key] for r in rows[v][m]] for m in models] for v in VARIANTS], dtype=np.float64
        )
        for key in keys
    }
    return xr.Dataset(
        {f"test2_{key.replace('@', '_at_')}": (dims, val) for key, val in data.items()},
        coords={
            VARIANT: list(VARIANTS),
            MODEL: list(models),
            TEST2_SET: np.asarray([_set_label(S) for S in sets]),
            "test2_n_elements": (TEST2_SET, np.asarray([len(S) for S in sets])),
        },
    )


def write_report(report: EvaluationReport, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``metrics.json`` and ``arrays.zarr`` into a folder (created).

    Parameters
    ----------
    report : EvaluationReport
        From :func:`evaluate`.
    out_dir : path
        The report folder.

    Returns
    -------
    dict
        ``metrics`` and ``arrays``: the paths written.
    """
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.json"
    arrays_path = out / "arrays.zarr"
    metrics_path.write_text(json.dumps(_jsonable(report.metrics), indent=2, allow_nan=True) + "\n")
    arrays = report.arrays.copy()
    # variable-length strings: fixed-width unicode has no stable zarr v3 spec
    for name in list(arrays.variables):
        if arrays[name].dtype.kind == "U":
            arrays[name] = arrays[name].astype(object)
    arrays.to_zarr(arrays_path, mode="w", zarr_format=3, consolidated=False)
    return {"metrics": metrics_path, "arrays": arrays_path}


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value
