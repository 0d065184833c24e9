"""Thresholded and counting variants of the enumeration, for evaluation.

* :class:`TemplateIndex` — what evaluation needs of a library, likelihood-free;
* :func:`candidates_above` — best candidate of every (template, composition)
  scoring at least a threshold (templates pruned by an upper bound);
* :class:`CompositionTable` — every composition k elements can take, with the
  number of assignments of every template yielding it (likelihood-free);
* :func:`count_assignments`, :func:`small_template_counts` — how many
  assignments of a template to one composition beat or tie a score;
* :func:`best_for_composition` — the best score of one composition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Final

import numpy as np

from afpx import AfpxError
from afpx.templates.bruteforce import assignment_tables, bruteforce_limit, surjections
from afpx.templates.compositions import (
    TemplateCompositions,
    decode_rows,
    reduce_rows,
    row_codes,
    template_compositions,
)
from afpx.templates.ties import DEFAULT_TIE_TOLERANCE, tie_width

#: Element sets of at least this size count Test 1 and Test 2 from shared
#: :class:`CompositionPairs`; smaller ones enumerate the upper-bound-pruned small
#: templates per model (measured on oqmd-icsd, 5 likelihood arrays: pairs cost
#: 2.1x per binary set, save 1.3x per ternary and 1.4x per quaternary set).
PAIRS_MIN_ELEMENTS: Final = 3
#: Scored (template, assignment) pairs held in memory at once by the enumeration.
_BF_CHUNK: Final = 2_000_000

__all__ = [
    "PAIRS_MIN_ELEMENTS",
    "AssignmentCount",
    "CompositionPairs",
    "CompositionTable",
    "ExactCounts",
    "PairCache",
    "TemplateIndex",
    "TemplateSites",
    "best_for_composition",
    "candidates_above",
    "composition_pairs",
    "count_assignments",
    "count_states",
    "pair_counts",
    "small_template_counts",
]


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


def _ranges(start: np.ndarray, stop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated ``arange(start[i], stop[i])`` and the i of each element."""
    length = np.asarray(stop, dtype=np.int64) - np.asarray(start, dtype=np.int64)
    owner = np.repeat(np.arange(length.size), length)
    offset = np.cumsum(length) - length
    return np.arange(int(length.sum())) - offset[owner] + np.asarray(start)[owner], owner


def _template_sums(index: TemplateIndex, values: np.ndarray, templates: np.ndarray) -> np.ndarray:
    """Sum of a per-site value over the sites of each template (templates with sites)."""
    sites, owner = _ranges(index.site_start[templates], index.site_start[templates + 1])
    return np.bincount(owner, weights=values[sites], minlength=templates.size)


def candidates_above(
    index: TemplateIndex,
    log_likelihood: np.ndarray,
    threshold: float,
    *,
    upper_bound: np.ndarray | None = None,
    uniform: np.ndarray | None = None,
    table: CompositionTable | None = None,
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
    uniform : ndarray of shape (n_templates,), bool, optional
        Templates on whose every site each element is equally likely (e.g.
        everywhere under constant likelihoods): every candidate of such a
        template scores the same, so with ``table`` (the
        :class:`CompositionTable` of k elements) its compositions are read
        from the table instead of enumerated. Only a speed-up: the rows are
        those the enumeration would give.

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
    out_t: list[np.ndarray] = []
    out_c: list[np.ndarray] = []
    out_s: list[np.ndarray] = []
    if uniform is not None and table is not None and sel.size:
        if table.k != k:
            raise AfpxError(f"a composition table of {table.k} elements for {k} likelihood columns")
        flat = np.asarray(uniform, dtype=bool)[sel]
        if flat.any():
            ts = sel[flat]
            sel = sel[~flat]
            # every candidate of a uniform template scores the sum of its sites
            score = _template_sums(index, logl[:, 0], ts)
            keep = score >= threshold
            rows, owner = table.rows_of_templates(ts[keep])
            out_t.append(ts[keep][owner])
            out_c.append(table.compositions[table.row_composition[rows]])
            out_s.append(score[keep][owner])
    n_sel = index.n_sites[sel]
    limit = bruteforce_limit(k)
    base = int(index.total.max(initial=0)) + 1
    span = base ** (k - 1)
    for n in np.unique(n_sel[n_sel <= limit]).tolist():
        ts = sel[n_sel == n]
        A, onehot, weight = assignment_tables(k, n, base)
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
            first = decode_rows(code[order[starts]], base, k - 1)
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
        reduce_rows(np.concatenate(out_c)),
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
        q = row_codes(queries[inside], self.base)
        pos = np.clip(np.searchsorted(self.keys, q), 0, self.keys.size - 1)
        out[inside] = np.where(self.keys[pos] == q, pos, -1)
        return out

    @cached_property
    def row_composition(self) -> np.ndarray:
        """Composition (row of ``compositions``) of every (template, composition) pair."""
        return np.repeat(np.arange(self.n_compositions), np.diff(self.row_start))

    @cached_property
    def _by_template(self) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(self.row_template, kind="stable")
        return order, self.row_template[order]

    def rows_of_templates(self, templates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The (template, composition) pairs of the given templates.

        Returns
        -------
        rows : ndarray of int64
            Pair indices (into ``row_template`` and :attr:`row_composition`),
            template by template.
        owner : ndarray of int64
            Position in ``templates`` of each pair's template.
        """
        order, sorted_template = self._by_template
        t = np.asarray(templates, dtype=np.int64)
        lo = np.searchsorted(sorted_template, t, side="left")
        hi = np.searchsorted(sorted_template, t, side="right")
        pos, owner = _ranges(lo, hi)
        return order[pos], owner

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
                first = decode_rows(code, base, k - 1)
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
            reduced = reduce_rows(np.concatenate(cc))
            ways = np.concatenate(ww)
        else:
            template, reduced, ways = np.zeros(0, np.int64), np.zeros((0, k), np.int64), np.zeros(0)
        ukey, inv = np.unique(row_codes(reduced, base), return_inverse=True)
        comps = decode_rows(ukey, base, k)
        inv = np.asarray(inv).ravel()
        order = np.lexsort((template, inv))
        row_start = np.searchsorted(inv[order], np.arange(comps.shape[0] + 1))
        return cls(k, comps, template[order], ways[order], row_start.astype(np.int64), ukey, base)


# =============================================================================
# Test 1 for one structure
# =============================================================================


@dataclass(frozen=True)
class AssignmentCount:
    """Assignments of one template to a target composition, relative to a score.

    Attributes
    ----------
    better : int
        Assignments scoring more than the threshold (+ its tie width).
    tied : int
        Assignments within the tie width of the threshold (:func:`~afpx.templates.ties.tie_width`).
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
    tolerance: float = DEFAULT_TIE_TOLERANCE,
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
        Relative tie tolerance: scores within ``tie_width(threshold, tolerance)``
        of the threshold are tied.
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
    width = tie_width(threshold, tolerance)
    floor = threshold + width if strict else threshold - width
    if total == 0 or best_score < floor or (strict and best_score == floor):
        return AssignmentCount(0, 0, total, best_score, False)

    better = tied = 0
    truncated = False
    suffix = np.concatenate([np.cumsum(mult[::-1])[::-1], [0]])
    stack: list[tuple[int, tuple[int, ...], float]] = [(0, root, 0.0)]
    while stack:
        j, r, acc = stack.pop()
        if j == n:
            if strict or acc > threshold + width:
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


@dataclass(frozen=True)
class ExactCounts:
    """Assignments of several templates to one composition, counted exactly.

    Attributes
    ----------
    templates : ndarray of shape (n,), int64
    better, tied : ndarray of shape (n,), int64
        Assignments above / within the tie width of the threshold.
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
    tolerance: float = DEFAULT_TIE_TOLERANCE,
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
        Relative tie tolerance: scores within ``tie_width(threshold, tolerance)``
        of the threshold are tied.

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
    width = tie_width(threshold, tolerance)
    hi, lo = threshold + width, threshold - width
    parts: list[tuple[np.ndarray, ...]] = []
    n_of = index.n_sites[ts_all]
    for n in np.unique(n_of).tolist():
        group = ts_all[n_of == n]
        A, onehot, weight = assignment_tables(k, n, base)
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


@dataclass(frozen=True, eq=False)
class CompositionPairs:
    """Every (small template, assignment) pair that yields one reduced composition.

    Likelihood-free: built once per composition and shared by every model and
    baseline, which then only gather and add their log-likelihoods
    (:func:`pair_counts`).

    Attributes
    ----------
    composition : ndarray of shape (k,), int64
    covered : ndarray of shape (m,), int64
        Every small template examined (those without a pair included).
    groups : tuple
        Per number of sites n: ``(owner (P,) int32, first (P,) int64,
        assignment (P,) int32, table (A, n) int8)``: the row of ``covered``
        owning each pair, the library row of its template's first site, and
        its assignment as a row of ``table`` (the surjections of k elements on
        n sites). 16 bytes a pair.
    """

    composition: np.ndarray
    covered: np.ndarray
    groups: tuple[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], ...]


class PairCache(dict[tuple[int, ...], CompositionPairs]):
    """:class:`CompositionPairs` by composition, the oldest dropped beyond a memory budget.

    Pairs depend on the composition (in the set's slot order) and the
    templates only, not on which elements fill the slots, so every element
    set of the same size and every model share them.
    """

    def __init__(self, max_bytes: int = 256 * 2**20) -> None:
        super().__init__()
        self.max_bytes = max_bytes
        self.nbytes = 0

    @staticmethod
    def _size(pairs: CompositionPairs) -> int:
        return sum(o.nbytes + f.nbytes + a.nbytes for o, f, a, _ in pairs.groups)

    def __setitem__(self, key: tuple[int, ...], value: CompositionPairs) -> None:
        if key in self:
            self.nbytes -= self._size(self[key])
        super().__setitem__(key, value)
        self.nbytes += self._size(value)
        while self.nbytes > self.max_bytes and len(self) > 1:
            oldest = next(iter(self))
            self.nbytes -= self._size(self[oldest])
            super().__delitem__(oldest)


def composition_pairs(
    index: TemplateIndex, templates: np.ndarray, composition: np.ndarray
) -> CompositionPairs:
    """The (template, assignment) pairs of the small ``templates`` that yield ``composition``.

    Small: at most :func:`~afpx.templates.bruteforce.bruteforce_limit` unique
    sites (the others are left out, as in :func:`small_template_counts`).
    """
    comp = np.asarray(composition, dtype=np.int64)
    k = comp.size
    size = int(comp.sum())
    ts_all = np.asarray(templates, dtype=np.int64)
    ts_all = np.unique(ts_all[index.n_sites[ts_all] <= bruteforce_limit(k)])
    base = int(index.total.max(initial=0)) + 1
    powers = np.asarray([base ** (k - 2 - e) for e in range(k - 1)], dtype=np.int64)
    n_of = index.n_sites[ts_all]
    groups: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    for n in np.unique(n_of).tolist():
        local = np.flatnonzero(n_of == n)
        A, _, weight = assignment_tables(k, n, base)
        weight_f = weight.T.astype(np.float64)  # (n, A); small integers, exact in float64
        step = max(1, _BF_CHUNK // max(1, A.shape[0]))
        owners, firsts, assigns = [], [], []
        for c0 in range(0, local.size, step):
            loc = local[c0 : c0 + step]
            t = ts_all[loc]
            rows = index.site_start[t][:, None] + np.arange(n)[None, :]
            code = index.reduced[rows].astype(np.float64) @ weight_f
            scale, rest = np.divmod(index.total[t], size)
            want = np.where(rest == 0, (comp[:-1] @ powers) * scale if k > 1 else 0, -1)
            ti, ai = np.nonzero(code == want[:, None].astype(np.float64))
            owners.append(loc[ti].astype(np.int32))
            firsts.append(index.site_start[t[ti]].astype(np.int64))
            assigns.append(ai.astype(np.int32))
        if owners:
            groups.append(
                (
                    np.concatenate(owners),
                    np.concatenate(firsts),
                    np.concatenate(assigns),
                    surjections(k, n),
                )
            )
    return CompositionPairs(comp, ts_all, tuple(groups))


def pair_counts(
    pairs: CompositionPairs,
    log_likelihood: np.ndarray,
    threshold: float,
    *,
    tolerance: float = DEFAULT_TIE_TOLERANCE,
    keep: np.ndarray | None = None,
) -> ExactCounts:
    """:func:`small_template_counts` of the templates of ``pairs``, from their pairs only.

    ``keep`` (bool, one per ``pairs.covered``) restricts the work to some
    templates, e.g. those whose upper bound reaches the threshold; the others
    are reported with no assignment (``total`` 0, ``best`` -inf).

    Scores add the sites' log-likelihoods in site order (as
    :meth:`TemplateIndex.true_scores` does), so the true assignment of a
    template scores exactly its true score.
    """
    logl = np.asarray(log_likelihood, dtype=np.float64)
    m = pairs.covered.size
    width = tie_width(threshold, tolerance)
    hi, lo = threshold + width, threshold - width
    better = np.zeros(m, dtype=np.int64)
    tied = np.zeros(m, dtype=np.int64)
    total = np.zeros(m, dtype=np.int64)
    best = np.full(m, -np.inf)
    for owner, first, assign, table in pairs.groups:
        if keep is not None:
            sel = keep[owner]
            owner, first, assign = owner[sel], first[sel], assign[sel]
        score = np.zeros(owner.size)
        for j in range(table.shape[1]):
            score += logl[first + j, table[assign, j]]
        better += np.bincount(owner[score > hi], minlength=m)
        tied += np.bincount(owner[(score >= lo) & (score <= hi)], minlength=m)
        total += np.bincount(owner, minlength=m)
        np.maximum.at(best, owner, score)
    return ExactCounts(pairs.covered, better, tied, best, total)


@dataclass(frozen=True, eq=False)
class TemplateSites:
    """Sites of a template restricted to an element set, and its target counts.

    ``TemplateSites(index, log_likelihood, composition)(t)`` gives
    ``(log_likelihood (n_sites, k), reduced multiplicity (n_sites,), target (k,))``.
    """

    index: TemplateIndex
    log_likelihood: np.ndarray  # (n_sites_total, k) float64
    composition: np.ndarray  # (k,) reduced

    def __call__(self, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a, b = self.index.site_start[t], self.index.site_start[t + 1]
        mult = self.index.reduced[a:b]
        scale = int(self.index.total[t]) // int(self.composition.sum())
        return self.log_likelihood[a:b], mult, self.composition * scale


def best_for_composition(
    index: TemplateIndex,
    log_likelihood: np.ndarray,
    composition: np.ndarray,
    templates: np.ndarray,
    upper_bound: np.ndarray,
    *,
    pairs: CompositionPairs | None = None,
    lower_bound: float = -math.inf,
) -> float:
    """Best score of any candidate of the given templates with one reduced composition.

    Templates are visited from the highest upper bound down and the search
    stops once no remaining template can beat the best found (exact). With
    ``pairs`` (:func:`composition_pairs` of a superset of the small
    ``templates``), the small templates whose upper bound reaches
    ``lower_bound`` (a score known to be reached, e.g. a true candidate's) are
    scored from their pairs at once.
    """
    comp = np.asarray(composition, dtype=np.int64)
    ts = np.asarray(templates, dtype=np.int64)
    ts = ts[np.argsort(-upper_bound[ts], kind="stable")]
    sites = TemplateSites(index, log_likelihood, comp)
    limit = bruteforce_limit(comp.size)
    best = -math.inf
    if pairs is not None:
        small = pair_counts(
            pairs,
            log_likelihood,
            math.inf,
            keep=upper_bound[pairs.covered] >= lower_bound - tie_width(lower_bound),
        )
        mine = np.zeros(ts.size, dtype=bool)
        if small.templates.size:
            pos = np.minimum(np.searchsorted(small.templates, ts), small.templates.size - 1)
            mine = small.templates[pos] == ts
        if mine.any():
            best = float(small.best[pos[mine]].max())
        ts = ts[~mine]
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
