"""Test 1 and Test 2 as a Dask graph: batches of element sets, the shared state sent once.

The work of an evaluation is independent per element set: for every
likelihood array (the model and each baseline), Test 1 of the set's test
structures and Test 2 of the set. :func:`evaluation_graph` turns a list of
sets into one :func:`dask.delayed` task per batch of about
:data:`SETS_PER_TASK` sets, all reading one read-only :class:`EvaluationState`
(templates, composition tables, every array's log-likelihoods in set-column
layout). :func:`evaluate_sets` computes it on the current Dask scheduler
(:func:`afpx.scheduler.compute`): threads, processes, synchronous or a
``distributed`` cluster. On a ``distributed`` client the state is scattered
to every worker once (not shipped inside the graph); local schedulers share
it by reference. The ``processes`` scheduler pickles it for every task, so there
it gets :data:`PROCESS_TASKS_PER_WORKER` larger tasks per process; a local
cluster (``use_scheduler(workers=N)``) is the better multi-process choice.

Results never depend on the scheduler: every set is computed by the same
code on the same arrays, with one BLAS thread, and caches hold only
likelihood-free values (tested bit for bit).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from afpx.evaluate.params import VARIANTS, EvaluateParams
from afpx.evaluate.test1 import TrueRank, rank_true_candidates
from afpx.evaluate.test2 import optimality_of_set, set_context
from afpx.scheduler import active_client, compute, one_blas_thread
from afpx.templates.counting import CompositionTable, PairCache, TemplateIndex

__all__ = [
    "PROCESS_TASKS_PER_WORKER",
    "SETS_PER_TASK",
    "EvaluationState",
    "SetResult",
    "evaluate_batch",
    "evaluate_set",
    "evaluate_sets",
    "evaluation_graph",
    "set_batches",
    "set_columns",
    "surjective_upper_bound",
    "uniform_templates",
]

#: Tasks per process on Dask's ``processes`` scheduler (each pickles the state).
PROCESS_TASKS_PER_WORKER: Final = 4

#: Relative slack of :func:`surjective_upper_bound` (rounding of sums, far below a tie).
SURJECTIVE_SLACK: Final = 1e-12

#: Element sets per Dask task: enough to amortise the task overhead and the
#: pair caches, small enough to balance ~4,700 sets over a few workers.
SETS_PER_TASK: Final = 16


def set_columns(log_likelihood: np.ndarray) -> np.ndarray:
    """The site × element log-likelihoods in set-column layout: (118, n_sites), C order.

    An element set reads a few whole rows of it (contiguous) instead of a few
    strided columns of the (n_sites, 118) array.
    """
    return np.ascontiguousarray(np.asarray(log_likelihood).T)


@dataclass(frozen=True, eq=False)
class EvaluationState:
    """What every element set's evaluation reads (shared, never written).

    Attributes
    ----------
    index : TemplateIndex
    tables : dict of int to CompositionTable
        Likelihood-free composition tables by set size.
    columns : dict of str to ndarray of shape (118, n_sites)
        Log-likelihoods of each model and baseline, in :func:`set_columns` layout.
    params : EvaluateParams
    by_set : dict
        Element set → the templates made of exactly it.
    test1_by_set : dict
        Element set → its test templates (structures) of Test 1.
    test2_sets : frozenset
        The element sets of Test 2.
    token : str
        Identifies the run: per-process caches of another run are not reused.
    """

    index: TemplateIndex
    tables: Mapping[int, CompositionTable]
    columns: Mapping[str, np.ndarray]
    params: EvaluateParams
    by_set: Mapping[tuple[int, ...], Sequence[int]]
    test1_by_set: Mapping[tuple[int, ...], Sequence[int]]
    test2_sets: frozenset[tuple[int, ...]]
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    #: model → templates of :func:`uniform_templates` (None: there are none)
    uniform: Mapping[str, np.ndarray | None] = field(default_factory=dict)

    @property
    def models(self) -> list[str]:
        return list(self.columns)

    def log_likelihood(self, name: str, elements: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Array ``name``'s log-likelihoods of the set's elements and their upper bounds.

        Returns
        -------
        log_likelihood : ndarray of shape (n_sites, k), float64, C order
        upper_bound : ndarray of shape (n_templates,), float64
            :func:`surjective_upper_bound` of every template.
        """
        cols = np.asarray(elements, dtype=np.int64) - 1
        block = self.columns[name][cols]
        logl = np.ascontiguousarray(block.T, dtype=np.float64)
        return logl, surjective_upper_bound(self.index, block)


def uniform_templates(index: TemplateIndex, columns: np.ndarray) -> np.ndarray | None:
    """Templates on whose every site all 118 elements are equally likely, or None if none.

    Every candidate of such a template scores the same, for any element set
    (:func:`~afpx.templates.counting.candidates_above` reads their
    compositions from the composition table instead of enumerating them).

    Parameters
    ----------
    index : TemplateIndex
    columns : ndarray of shape (118, n_sites_total)
        Log-likelihoods in :func:`set_columns` layout.
    """
    block = np.asarray(columns)
    if not block.size:
        return None
    site = block.min(axis=0) == block.max(axis=0)
    if not site.any():
        return None
    out = np.zeros(index.n_templates, dtype=bool)
    has = index.n_sites > 0
    out[has] = np.logical_and.reduceat(site, index.site_start[:-1][has])
    return out if out.any() else None


def surjective_upper_bound(index: TemplateIndex, columns: np.ndarray) -> np.ndarray:
    """An upper bound of every template's best candidate that uses every element.

    Parameters
    ----------
    index : TemplateIndex
    columns : ndarray of shape (k, n_sites_total)
        Log-likelihood of each of the set's elements on every site (set-column layout).

    Returns
    -------
    ndarray of shape (n_templates,), float64 (-inf for templates without sites)

    Notes
    -----
    :meth:`TemplateIndex.upper_bound` puts each site's best element everywhere,
    ``U_t = Σ_s max_e L(s, e)``. A candidate puts every element on at least
    one site, and on distinct sites, so it loses at least the largest of the
    per-element losses ``min_s (max_e' L(s, e') − L(s, e))``::

        B_t = U_t − max_e min_{s ∈ t} (max_e' L(s, e') − L(s, e)) + ε |U_t|

    with ε = 1e-12 covering the rounding of sums taken in another order (far
    below the tie width). Only candidates count (Test 1 and Test 2 rank
    surjective assignments only), so every pruning by ``B_t`` stays exact, and
    it prunes more than ``U_t`` where one element is best on most sites.
    """
    block = np.asarray(columns)
    best = block.max(axis=0).astype(np.float64)
    out = np.full(index.n_templates, -np.inf)
    has = index.n_sites > 0
    if not best.size:
        return out
    starts = index.site_start[:-1][has]
    # the same sums as TemplateIndex.upper_bound (equal bit for bit)
    plain = np.add.reduceat(best, starts)
    # one 1-d reduceat per element (a 2-d reduceat along sites is several times slower)
    loss = np.zeros(starts.size)
    for row in block:
        np.maximum(loss, np.minimum.reduceat(best - row, starts), out=loss)
    out[has] = np.minimum(plain, plain - loss + SURJECTIVE_SLACK * np.maximum(1.0, np.abs(plain)))
    return out


@dataclass
class SetResult:
    """Test 1 and Test 2 of one element set, for every model and baseline."""

    elements: tuple[int, ...]
    #: model → structure → rank
    test1: dict[str, dict[int, TrueRank]]
    #: structure → candidates of its composition (NaN when not counted)
    test1_candidates: dict[int, float]
    #: variant → model → Test 2 numbers; None when the set is not in Test 2
    test2: dict[str, dict[str, dict[str, float]]] | None
    timing: dict[str, float]


# likelihood-free (template, assignment) pairs by set size, shared by every set
# of that size, every model, Test 1 and Test 2: one cache per thread of each
# process (a worker's tasks reuse it), dropped when another run starts
_LOCAL = threading.local()


def _pair_cache(state: EvaluationState, k: int) -> PairCache:
    if getattr(_LOCAL, "token", None) != state.token:
        _LOCAL.token = state.token
        _LOCAL.caches = {}
    caches: dict[int, PairCache] = _LOCAL.caches
    return caches.setdefault(k, PairCache())


def evaluate_set(state: EvaluationState, elements: tuple[int, ...]) -> SetResult:
    """Test 1 and Test 2 of one element set, for every model and baseline."""
    params, index = state.params, state.index
    S = elements
    table = state.tables.get(len(S))
    ctx = set_context(index, S, table, own_templates=state.by_set.get(S, []))
    timing: dict[str, float] = {}
    res = SetResult(S, {}, {}, None, timing)
    in_test2 = S in state.test2_sets and table is not None
    test2: dict[str, dict[str, dict[str, float]]] = {v: {} for v in VARIANTS}
    pairs = _pair_cache(state, len(S))

    c_start = time.thread_time()

    def add_time(key: str, t0: float) -> None:
        timing[key] = timing.get(key, 0.0) + time.perf_counter() - t0

    for name in state.models:
        logl, ub = state.log_likelihood(name, S)
        if in_test2 and table is not None:
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
                uniform=state.uniform.get(name),
            )
            for variant in VARIANTS:
                test2[variant][name] = rows[variant]
            add_time(f"test2_s[{name}]", t0)
            add_time("test2_s", t0)
        if S in state.test1_by_set:
            t0 = time.perf_counter()
            ranks, counted = rank_true_candidates(
                index,
                table,
                logl,
                ub,
                ctx.own_templates,
                state.test1_by_set[S],
                params,
                pairs=pairs,
            )
            res.test1.setdefault(name, {}).update(ranks)
            res.test1_candidates.update(counted)
            add_time(f"test1_s[{name}]", t0)
            add_time("test1_s", t0)
    if in_test2:
        res.test2 = test2
    # CPU seconds of this set in this thread (wall time depends on the machine's load)
    timing["sets_cpu_s"] = time.thread_time() - c_start
    timing[f"sets_cpu_s[{len(S)}]"] = timing["sets_cpu_s"]
    return res


def evaluate_batch(state: EvaluationState, sets: Sequence[tuple[int, ...]]) -> list[SetResult]:
    """:func:`evaluate_set` of each set, in order, with one BLAS thread (one Dask task)."""
    with one_blas_thread():
        return [evaluate_set(state, S) for S in sets]


def set_batches(
    sets: Sequence[tuple[int, ...]], size: int = SETS_PER_TASK
) -> list[list[tuple[int, ...]]]:
    """Consecutive batches of at most ``size`` sets (same-size sets stay together)."""
    if size < 1:
        from afpx import AfpxError

        raise AfpxError(f"sets per task must be at least 1, got {size}")
    return [list(sets[i : i + size]) for i in range(0, len(sets), size)]


def evaluation_graph(
    state: Any, sets: Sequence[tuple[int, ...]], *, sets_per_task: int = SETS_PER_TASK
) -> list[Any]:
    """One :func:`dask.delayed` task per batch of sets, all reading one state.

    Parameters
    ----------
    state : EvaluationState or distributed.Future
        The shared state, or a future of it already scattered to the workers.
    sets : sequence of tuple of int
        The element sets, in the order of the results.
    sets_per_task : int

    Returns
    -------
    list of dask.delayed.Delayed
        Each computes to a list of :class:`SetResult`, in the order of ``sets``.
    """
    import dask

    if isinstance(state, EvaluationState):
        # one key for the state: tasks reference it, nothing is hashed or copied
        state = dask.delayed(state, name=f"afpx-evaluate-state-{state.token}", traverse=False)
    task = dask.delayed(evaluate_batch, pure=True)
    tag = uuid.uuid4().hex
    return [
        task(state, batch, dask_key_name=f"afpx-evaluate-sets-{tag}-{i}")
        for i, batch in enumerate(set_batches(sets, sets_per_task))
    ]


def evaluate_sets(
    state: EvaluationState,
    sets: Sequence[tuple[int, ...]],
    *,
    sets_per_task: int = SETS_PER_TASK,
    progress: bool = False,
) -> list[SetResult]:
    """Test 1 and Test 2 of every set on the current Dask scheduler, in the order of ``sets``.

    On an active ``distributed`` client (:func:`afpx.scheduler.active_client`)
    the state is scattered to every worker first; otherwise it is shared by
    reference. See :func:`afpx.scheduler.use_scheduler` for choosing the scheduler.
    """
    if not sets:
        return []
    import dask

    if dask.config.get("scheduler", None) in ("processes", "multiprocessing"):
        # Dask's process pool pickles a task's inputs, the whole state included,
        # for every task: a few large tasks per process instead of many small ones
        import os

        n_proc = int(dask.config.get("num_workers", None) or os.cpu_count() or 1)
        sets_per_task = max(sets_per_task, -(-len(sets) // (PROCESS_TASKS_PER_WORKER * n_proc)))
    client = active_client()
    shared: Any = state
    if client is not None:
        shared = client.scatter(state, broadcast=True, hash=False)
    try:
        batches = compute(
            *evaluation_graph(shared, sets, sets_per_task=sets_per_task), progress=progress
        )
    finally:
        if client is not None:
            shared.release()
    return [res for batch in batches for res in batch]
