"""The evaluation run: every element set, every model and baseline, Test 1, Test 2, case study."""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np
from threadpoolctl import threadpool_limits

from afpx import AfpxError, schema
from afpx.evaluate.case_study import case_study
from afpx.evaluate.graph import (
    SETS_PER_TASK,
    EvaluationState,
    evaluate_sets,
    set_columns,
    uniform_templates,
)
from afpx.evaluate.metrics import as_str_array, per_site_metrics, site_arrays
from afpx.evaluate.params import VARIANTS, EvaluateParams, set_label, size_label
from afpx.evaluate.report import EvaluationReport, afpx_version, cube_summary, json_attrs, verdict
from afpx.evaluate.scoring import scored_libraries
from afpx.evaluate.test1 import TrueRank, arrays_of_test1, summarise_test1
from afpx.evaluate.test2 import arrays_of_test2, sample_sets, set_context, summarise_test2
from afpx.scheduler import use_scheduler
from afpx.templates.counting import CompositionTable, TemplateIndex
from afpx.templates.util import element_symbols

if TYPE_CHECKING:
    import xarray as xr

    from afpx.baselines import BaselineParams

__all__ = ["check_evaluable", "evaluate"]

logger = logging.getLogger(__name__)


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


def evaluate(
    ds: xr.Dataset,
    *,
    params: EvaluateParams | None = None,
    baseline_params: BaselineParams | None = None,
    progress: bool = False,
    scheduler: str | None = None,
    workers: int | None = None,
    sets_per_task: int = SETS_PER_TASK,
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
        Show a progress bar over the Dask tasks (batches of element sets).
    scheduler : str, optional
        Where Test 1 and Test 2 run (:func:`afpx.scheduler.use_scheduler`):
        ``"threads"``, ``"processes"``, ``"synchronous"`` or the address of
        a ``dask.distributed`` scheduler. None: the current scheduler (an
        active ``distributed.Client`` is respected), or a local cluster of
        ``workers`` processes when ``workers`` is given.
    workers : int, optional
        Threads or processes of a local scheduler, or worker processes of a
        local cluster (see :func:`afpx.scheduler.use_scheduler`).
    sets_per_task : int
        Element sets per Dask task (:data:`afpx.evaluate.graph.SETS_PER_TASK`).

    Returns
    -------
    EvaluationReport

    Notes
    -----
    The results do not depend on the scheduler, the workers or the batching.
    """
    if workers is not None and workers < 1:
        raise AfpxError(f"workers must be at least 1, got {workers}")
    if sets_per_task < 1:
        raise AfpxError(f"sets_per_task must be at least 1, got {sets_per_task}")
    # the scheduler first: a wrong address fails before any work
    with use_scheduler(scheduler, workers=workers):
        return _evaluate(
            ds,
            params=params,
            baseline_params=baseline_params,
            progress=progress,
            sets_per_task=sets_per_task,
        )


def _evaluate(
    ds: xr.Dataset,
    *,
    params: EvaluateParams | None,
    baseline_params: BaselineParams | None,
    progress: bool,
    sets_per_task: int,
) -> EvaluationReport:
    import xarray as xr

    from afpx.baselines import BaselineParams
    from afpx.templates import TemplateLibrary

    params = params or EvaluateParams()
    baseline_params = baseline_params or BaselineParams()
    check_evaluable(ds)
    t_start = time.perf_counter()
    # CPU seconds of this process (its threads included) by phase; the sets' own
    # CPU time is measured per thread in the tasks (load-independent, unlike wall time)
    c_start = time.process_time()
    site_metrics, per_site = per_site_metrics(ds, bins=params.histogram_bins)
    t_metrics, c_metrics = time.perf_counter(), time.process_time()
    library = TemplateLibrary.from_cube(ds)
    sites = site_arrays(ds)
    t_library, c_library = time.perf_counter(), time.process_time()
    baseline_timing: dict[str, float] = {}
    libraries = scored_libraries(
        library, sites, params.baselines, baseline_params, ds=ds, timing=baseline_timing
    )
    t_baselines, c_baselines = time.perf_counter(), time.process_time()
    logger.info(
        "per-site metrics %.1f s, library %.1f s, baselines %.1f s",
        t_metrics - t_start,
        t_library - t_metrics,
        t_baselines - t_library,
    )
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
        "per_site_metrics_s": t_metrics - t_start,
        "library_s": t_library - t_metrics,
        "baselines_s": t_baselines - t_library,
        **{f"baseline_{k}": v for k, v in baseline_timing.items()},
        "per_site_metrics_cpu_s": c_metrics - c_start,
        "library_cpu_s": c_library - c_metrics,
        "baselines_cpu_s": c_baselines - c_library,
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
    columns = {name: set_columns(lib.log_likelihood) for name, lib in libraries.items()}
    state = EvaluationState(
        index=index,
        tables=tables,
        columns=columns,
        params=params,
        by_set=by_set,
        test1_by_set=test1_by_set,
        test2_sets=frozenset(test2_sets),
        uniform={name: uniform_templates(index, col) for name, col in columns.items()},
    )
    graph_sets = sorted(set(test1_by_set) | set(test2_sets), key=lambda s: (len(s), s))
    c0 = time.process_time()
    timing["index_tables_cpu_s"] = c0 - c_baselines
    t0 = time.perf_counter()
    with threadpool_limits(1):
        results = evaluate_sets(state, graph_sets, sets_per_task=sets_per_task, progress=progress)
    timing["sets_wall_s"] = time.perf_counter() - t0
    timing["sets_parent_cpu_s"] = time.process_time() - c0
    logger.info(
        "tables %.1f s, Test 1 and Test 2 of %d sets %.1f s",
        timing["tables_s"],
        len(graph_sets),
        timing["sets_wall_s"],
    )
    del state
    for res in results:
        for key, value in res.timing.items():
            timing[key] = timing.get(key, 0.0) + value
        for name in models:
            test1_rows[name].update(res.test1.get(name, {}))
            for variant in VARIANTS:
                if res.test2 is not None:
                    test2_rows[variant][name].append(res.test2[variant][name])
        test1_candidates.update(res.test1_candidates)
    # the case study ranks whole lists with afpx rank's engine, here (a few sets)
    c0 = time.process_time()
    for S in sorted(set(case_sets), key=lambda s: (len(s), s)):
        t0 = time.perf_counter()
        known = set_context(index, S, None, own_templates=by_set.get(S, [])).known
        case[set_label(S)] = {
            name: case_study(S, lib, known, params) for name, lib in libraries.items()
        }
        timing["case_study_s"] += time.perf_counter() - t0

    timing["case_study_cpu_s"] = time.process_time() - c0

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
