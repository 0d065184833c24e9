"""Test 2: for every element set of the split, the optimality score of its known compositions."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from afpx import AfpxError
from afpx.evaluate.metrics import first_known_metrics, known_positions, optimality_score
from afpx.evaluate.params import MODEL, TEST2_SET, VARIANT, VARIANTS, set_label
from afpx.evaluate.test1 import true_scores_of_set
from afpx.templates.compositions import match_rows, rank_candidates
from afpx.templates.counting import (
    PAIRS_MIN_ELEMENTS,
    CompositionPairs,
    CompositionTable,
    TemplateIndex,
    best_for_composition,
    candidates_above,
    composition_pairs,
)
from afpx.templates.ties import DEFAULT_TIE_TOLERANCE, tie_width

if TYPE_CHECKING:
    import xarray as xr

__all__ = [
    "SetContext",
    "arrays_of_test2",
    "optimality_of_set",
    "sample_sets",
    "set_context",
    "set_positions",
    "summarise_test2",
]

OS_BINS: Final = 20


def set_positions(
    scores: np.ndarray,
    known_index: np.ndarray,
    n_total: int,
    *,
    hit_k: Sequence[int] = (1, 10),
    tolerance: float = DEFAULT_TIE_TOLERANCE,
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
        Relative tie tolerance (:func:`afpx.templates.tie_ranks`).

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
    own_known = match_rows(known, own_rows)
    own_counts = np.full((index.n_templates, k), -1, dtype=np.int64)
    own_counts[own_t] = known[own_known]
    reach = np.ones(known.shape[0], dtype=bool)
    if table is not None:
        for i, j in enumerate(table.find(known).tolist()):
            ts, _ = table.templates_of(j) if j >= 0 else (np.zeros(0, np.int64), None)
            reach[i] = bool((own_counts[ts] != known[i]).any(axis=1).any())
    return SetContext(known, own_t, own_known, own_counts, reach)


def optimality_of_set(
    index: TemplateIndex,
    table: CompositionTable,
    log_likelihood: np.ndarray,
    upper_bound: np.ndarray,
    ctx: SetContext,
    *,
    hit_k: Sequence[int],
    tolerance: float,
    timing: dict[str, float] | None = None,
    pairs: dict[tuple[int, ...], CompositionPairs] | None = None,
    uniform: np.ndarray | None = None,
) -> dict[str, dict[str, float]]:
    """Test 2 of one element set and one model, both variants, exactly.

    Only candidates scoring at least the lowest known composition's score can
    move a known composition, so only those are generated. The threshold is
    the lowest exact best score of a known composition, over all templates
    and over the templates of other compositions (:func:`best_for_composition`),
    so that one pass serves both variants. ``pairs`` caches the
    likelihood-free :func:`~afpx.templates.counting.composition_pairs` of the
    known compositions across the models of the set (filled here).
    ``uniform`` marks templates whose candidates all score alike
    (:func:`~afpx.evaluate.graph.uniform_templates`): their compositions come
    from ``table`` instead of an enumeration.
    """
    known = ctx.known
    cache: dict[tuple[int, ...], CompositionPairs] = {} if pairs is None else pairs
    own_true = true_scores_of_set(index, log_likelihood, ctx.own_templates)
    # the exact best score of every known composition, with and without its own formula:
    # nothing below the lowest of them can move a known composition
    lowest = math.inf
    t0 = time.perf_counter()
    for i in range(known.shape[0]):
        j = int(table.find(known[i : i + 1])[0])
        if j < 0:
            raise AfpxError(f"known composition {known[i].tolist()} is missing from the table")
        ts, _ = table.templates_of(j)
        key = tuple(known[i].tolist())
        use_pairs = known.shape[1] >= PAIRS_MIN_ELEMENTS
        if use_pairs and key not in cache:
            cache[key] = composition_pairs(index, ts, known[i])
        # the set's own templates of this composition reach their true scores
        mine = ctx.own_known == i
        b = best_for_composition(
            index,
            log_likelihood,
            known[i],
            ts,
            upper_bound,
            pairs=cache[key] if use_pairs else None,
            lower_bound=float(own_true[mine].max()) if mine.any() else -math.inf,
        )
        lowest = min(lowest, b)
        if ctx.reachable_without_own[i]:
            ts = ts[(ctx.own_counts[ts] != known[i]).any(axis=1)]
            b = best_for_composition(index, log_likelihood, known[i], ts, upper_bound)
            lowest = min(lowest, b)
    thr = lowest - 2 * tie_width(lowest, tolerance)
    if timing is not None:
        timing["test2_threshold_s"] = timing.get("test2_threshold_s", 0.0) + (
            time.perf_counter() - t0
        )
    tm, red, sc = candidates_above(
        index, log_likelihood, thr, upper_bound=upper_bound, uniform=uniform, table=table
    )
    own_row = (ctx.own_counts[tm] == red).all(axis=1) if tm.size else np.zeros(0, bool)
    out: dict[str, dict[str, float]] = {}
    for variant, keep in zip(VARIANTS, (None, ~own_row), strict=True):
        ranking = rank_candidates(tm, red, sc, keep=keep)
        idx = match_rows(ranking.counts, known)
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


def summarise_test2(sets: list[dict[str, float]], hit_k: Sequence[int]) -> dict[str, Any]:
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


def arrays_of_test2(
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
            TEST2_SET: np.asarray([set_label(S) for S in sets]),
            "test2_n_elements": (TEST2_SET, np.asarray([len(S) for S in sets])),
        },
    )
