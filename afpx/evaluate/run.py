"""The evaluation run: every element set, every model and baseline, Test 1, Test 2, case study."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from afpx import AfpxError, schema
from afpx.evaluate.case_study import case_study
from afpx.evaluate.metrics import as_str_array, per_site_metrics, site_arrays
from afpx.evaluate.params import VARIANTS, EvaluateParams, set_label, size_label
from afpx.evaluate.report import EvaluationReport, afpx_version, cube_summary, json_attrs, verdict
from afpx.evaluate.scoring import scored_libraries
from afpx.evaluate.test1 import TrueRank, arrays_of_test1, rank_true_candidates, summarise_test1
from afpx.evaluate.test2 import (
    arrays_of_test2,
    optimality_of_set,
    sample_sets,
    set_context,
    summarise_test2,
)
from afpx.templates.counting import CompositionTable, PairCache, TemplateIndex
from afpx.templates.util import element_symbols

if TYPE_CHECKING:
    import xarray as xr

    from afpx.baselines import BaselineParams
    from afpx.templates.library import TemplateLibrary

__all__ = ["check_evaluable", "evaluate"]


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
    #: likelihood-free (template, assignment) pairs by composition, shared by every
    #: set of the same size, every model and baseline, Test 1 and Test 2 (per process)
    pairs: dict[int, PairCache] = field(default_factory=dict)


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
    params, index = state.params, state.index
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

    pairs = state.pairs.setdefault(k, PairCache())

    def add_time(key: str, t0: float) -> None:
        timing[key] = timing.get(key, 0.0) + time.perf_counter() - t0

    for name, lib in state.libraries.items():
        logl = np.asarray(lib.log_likelihood[:, cols], dtype=np.float64)
        ub = index.upper_bound(logl)
        if in_test2 and res.test2 is not None and table is not None:
            t0 = time.perf_counter()
            rows = optimality_of_set(
                index,
                table,
                logl,
                ub,
                ctx,
                hit_k=params.hit_k,
                tolerance=params.tie_tolerance,
                timing=timing,
                pairs=pairs,
            )
            for variant in VARIANTS:
                res.test2[variant][name] = rows[variant]
            add_time(f"test2_s[{name}]", t0)
            add_time("test2_s", t0)
        if S in state.test1_by_set:
            t0 = time.perf_counter()
            ranks, counted = rank_true_candidates(
                index,
                table,
                lib.log_likelihood,
                logl,
                ub,
                own_t,
                state.test1_by_set[S],
                params,
                pairs=pairs,
            )
            res.test1.setdefault(name, {}).update(ranks)
            res.test1_candidates.update(counted)
            add_time(f"test1_s[{name}]", t0)
            add_time("test1_s", t0)
        if S in state.case_sets:
            t0 = time.perf_counter()
            if res.case is None:
                res.case = {}
            res.case[name] = case_study(S, lib, known_S, params)
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


def evaluate(
    ds: xr.Dataset,
    *,
    params: EvaluateParams | None = None,
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
    params : EvaluateParams, optional
        What to evaluate (the defaults when omitted).
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

    from afpx.baselines import BaselineParams
    from afpx.templates import TemplateLibrary

    if workers < 1:
        raise AfpxError(f"workers must be at least 1, got {workers}")
    params = params or EvaluateParams()
    baseline_params = baseline_params or BaselineParams()
    check_evaluable(ds)
    t_start = time.perf_counter()
    site_metrics, per_site = per_site_metrics(ds, bins=params.histogram_bins)

    library = TemplateLibrary.from_cube(ds)
    sites = site_arrays(ds)
    libraries = scored_libraries(library, sites, params.baselines, baseline_params, ds=ds)
    models = list(libraries)

    index = TemplateIndex.from_arrays(library.site_template, library.z, library.multiplicity)
    tc = index.compositions
    t_split = as_str_array(library.split) if library.split is not None else None
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
    symbols = element_symbols()
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
            case[set_label(res.elements)] = res.case

    # -- aggregate -----------------------------------------------------------------
    for variant in VARIANTS:
        ref = test2_rows[variant].get("constant")
        for name in models:
            for i, row in enumerate(test2_rows[variant][name]):
                row["delta_os"] = row["os"] - ref[i]["os"] if ref is not None else math.nan
    test1_order = [t for S in all_sets for t in test1_by_set.get(S, [])]
    n_cand = np.asarray([test1_candidates[t] for t in test1_order], dtype=np.float64)
    test1_metrics = {
        name: summarise_test1(
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
                size_label(n): summarise_test2(
                    [r for S, r in zip(test2_sets, set_rows, strict=True) if len(S) == n],
                    params.hit_k,
                )
                for n in sizes
            }
            by_size["all"] = summarise_test2(set_rows, params.hit_k)
            test2_metrics[variant][name] = by_size
    wall = time.perf_counter() - t_start
    metrics: dict[str, Any] = {
        "afpx_version": afpx_version(),
        "params": params.to_attrs(),
        "baseline_params": baseline_params.to_attrs(),
        "cube": cube_summary(ds, library),
        "likelihood": json_attrs(
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
            size_label(k): {
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
            per_site,
            arrays_of_test1(test1_order, test1_rows, n_cand, library, models),
            arrays_of_test2(test2_sets, test2_rows, models),
        ],
        compat="no_conflicts",
        join="outer",
    )
    arrays.attrs.update(
        {"params": params.to_attrs(), "baseline_params": baseline_params.to_attrs()}
    )
    return EvaluationReport(metrics=metrics, arrays=arrays)
