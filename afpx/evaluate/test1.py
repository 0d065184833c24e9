"""Test 1: rank of each test structure's true candidate among all candidates of its composition."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from afpx import AfpxError
from afpx.evaluate.metrics import as_str_array
from afpx.evaluate.params import MODEL, TEST1_STRUCTURE, EvaluateParams
from afpx.templates.counting import (
    PAIRS_MIN_ELEMENTS,
    CompositionPairs,
    CompositionTable,
    ExactCounts,
    TemplateIndex,
    TemplateSites,
    composition_pairs,
    count_assignments,
    count_states,
    pair_counts,
    small_template_counts,
)
from afpx.templates.ties import DEFAULT_TIE_TOLERANCE, tie_width

if TYPE_CHECKING:
    import xarray as xr

    from afpx.templates.library import TemplateLibrary

__all__ = [
    "TrueRank",
    "arrays_of_test1",
    "rank_true_candidates",
    "summarise_test1",
    "true_candidate_rank",
    "true_scores_of_set",
]

#: Edges of the Test 1 rank distribution (the last bin holds censored ranks).
RANK_EDGES: Final = (1, 2, 3, 6, 11, 31, 101, 301)


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


def true_candidate_rank(
    own: int,
    true_score: float,
    templates: np.ndarray,
    upper_bound: np.ndarray,
    template_sites: Callable[[int], tuple[np.ndarray, np.ndarray, np.ndarray]],
    *,
    n_templates: float = math.nan,
    cap: int = 100,
    tolerance: float = DEFAULT_TIE_TOLERANCE,
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
        scoring at least ``true_score`` minus its tie width (``own`` among them); no
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
    width = tie_width(true_score, tolerance)
    hi, lo = true_score + width, true_score - width
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


def rank_true_candidates(
    index: TemplateIndex,
    table: CompositionTable | None,
    log_likelihood: np.ndarray,
    upper_bound: np.ndarray,
    own_templates: np.ndarray,
    structures: Sequence[int],
    params: EvaluateParams,
    *,
    pairs: dict[tuple[int, ...], CompositionPairs] | None = None,
) -> tuple[dict[int, TrueRank], dict[int, float]]:
    """Test 1 of the test structures of one element set, for one likelihood array.

    Parameters
    ----------
    index : TemplateIndex
    table : CompositionTable or None
        Of the set's size (None: candidates are not counted).
    log_likelihood : ndarray of shape (n_sites_total, k)
        The log-likelihoods of the set's elements, in sorted element order.
    upper_bound : ndarray of shape (n_templates,)
        An upper bound of every template's best candidate:
        :meth:`TemplateIndex.upper_bound` of ``log_likelihood`` or the
        tighter :func:`afpx.evaluate.graph.surjective_upper_bound`.
    own_templates : ndarray of shape (n_own,), int
        Every template made of exactly the set.
    structures : sequence of int
        The test templates (structures) of the set.
    params : EvaluateParams
    pairs : dict, optional
        Cache of :func:`~afpx.templates.counting.composition_pairs` by
        composition, shared by every model of the set (filled here).

    Returns
    -------
    ranks : dict
        Template → :class:`TrueRank`.
    n_candidates : dict
        Template → candidates of its composition (NaN when not counted).
    """
    k = log_likelihood.shape[1]
    tc = index.compositions
    own_true = true_scores_of_set(index, log_likelihood, own_templates)
    true_of = dict(zip(own_templates.tolist(), own_true.tolist(), strict=True))
    ranks: dict[int, TrueRank] = {}
    counted: dict[int, float] = {}
    for own in structures:
        C = np.asarray(tc.counts[own], dtype=np.int64)
        if table is not None:
            reach, ways = table.templates_of(int(table.find(C)[0]))
            n_templates, n_candidates = float(reach.size), float(ways.sum())
        else:
            reach = np.flatnonzero((index.n_sites >= k) & (index.total % int(C.sum()) == 0))
            n_templates = n_candidates = math.nan
        s_true = true_of[own]
        cand = reach[upper_bound[reach] >= s_true - tie_width(s_true, params.tie_tolerance)]
        if pairs is not None and k >= PAIRS_MIN_ELEMENTS:
            key = tuple(C.tolist())
            if key not in pairs:
                pairs[key] = composition_pairs(index, reach, C)
            keep = upper_bound[pairs[key].covered] >= s_true - tie_width(
                s_true, params.tie_tolerance
            )
            exact = pair_counts(
                pairs[key], log_likelihood, s_true, tolerance=params.tie_tolerance, keep=keep
            )
        else:
            exact = small_template_counts(
                index, log_likelihood, cand, C, s_true, tolerance=params.tie_tolerance
            )
        ranks[own] = true_candidate_rank(
            own,
            s_true,
            cand,
            upper_bound[cand],
            TemplateSites(index, log_likelihood, C),
            n_templates=n_templates,
            cap=params.test1_cap,
            tolerance=params.tie_tolerance,
            max_states=params.test1_max_states,
            exact=exact,
        )
        counted[own] = n_candidates
    return ranks, counted


def true_scores_of_set(
    index: TemplateIndex, log_likelihood: np.ndarray, templates: np.ndarray
) -> np.ndarray:
    """Score of the true assignment of templates made of exactly one element set.

    Parameters
    ----------
    index : TemplateIndex
    log_likelihood : ndarray of shape (n_sites_total, k)
        The set's columns, in sorted element order (the set is the templates'
        elements: every given template is made of exactly it).
    templates : ndarray of shape (n,), int

    Returns
    -------
    ndarray of shape (n,), float64
        Sites summed in order in float64, as :meth:`TemplateIndex.true_scores`
        sums them from the full (n_sites_total, 118) array (equal bit for bit).
    """
    templates = np.asarray(templates, dtype=np.int64)
    out = np.empty(templates.size)
    if out.size == 0:
        return out
    start = index.site_start
    rows = np.concatenate([np.arange(start[t], start[t + 1]) for t in templates.tolist()])
    elements = np.unique(index.z[rows])
    if elements.size != log_likelihood.shape[1]:
        raise AfpxError(
            f"templates made of {elements.size} elements scored with {log_likelihood.shape[1]} "
            "columns: the log-likelihood must hold exactly their element set"
        )
    for i, t in enumerate(templates.tolist()):
        a, b = int(start[t]), int(start[t + 1])
        col = np.searchsorted(elements, index.z[a:b])
        acc = 0.0
        for v in np.asarray(log_likelihood[np.arange(a, b), col], dtype=np.float64).tolist():
            acc += v
        out[i] = acc
    return out


def rank_bins(ranks: np.ndarray, censored: np.ndarray, cap: int) -> dict[str, int]:
    edges = [e for e in RANK_EDGES if e <= cap] + [cap + 1]
    out: dict[str, int] = {}
    for a, b in itertools.pairwise(edges):
        label = f"{a}" if b == a + 1 else f"{a}-{b - 1}"
        out[label] = int(((ranks >= a) & (ranks < b) & ~censored).sum())
    out[f">{cap}"] = int(censored.sum())
    return out


def summarise_test1(
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
    out["rank_distribution"] = rank_bins(get["rank"], censored, cap)
    out["n_inexact_templates"] = int(get["n_inexact"].sum())
    out["templates_per_structure"] = count_stats(get["n_templates"])
    out["candidates_per_structure"] = count_stats(n_candidates)
    return out


def count_stats(values: np.ndarray) -> dict[str, float]:
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


def arrays_of_test1(
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
                as_str_array(library.structure_id[idx]).astype(str),
            ),
            "test1_formula": (TEST1_STRUCTURE, as_str_array(library.formula[idx]).astype(str)),
        },
    )
