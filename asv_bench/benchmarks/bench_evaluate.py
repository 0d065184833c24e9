"""Test 1 and Test 2 of ``afpx evaluate`` on the oqmd-icsd cube (one thread).

Needs a cube with likelihoods at ``$AFPX_BENCH_CUBE`` (for instance a copy of
the oqmd-icsd cube after ``afpx likelihood CUBE --model afpx/data/default_model``);
without one every benchmark is skipped.

A seeded sample of the test split's element sets of each size is scored for
the model and the four baselines:

* ``time_test1_shared_pairs`` — Test 1 as ``afpx evaluate`` runs it: the
  likelihood-free (template, assignment) pairs of each composition built once
  and shared by every model (:func:`afpx.templates.counting.composition_pairs`),
  for sets of 3+ elements;
* ``time_test1_per_model_baseline`` — the previous engine, measured in the
  same run: every model enumerates the upper-bound-pruned small templates
  itself (:func:`afpx.templates.counting.small_template_counts`);
* ``time_test2`` — Test 2 (both variants) of the sample.

``python asv_bench/benchmarks/bench_evaluate.py`` prints medians and ratios
without asv.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from threadpoolctl import threadpool_limits

from afpx.evaluate.params import EvaluateParams
from afpx.evaluate.test1 import rank_true_candidates
from afpx.evaluate.test2 import optimality_of_set, set_context
from afpx.templates.counting import CompositionTable, PairCache, TemplateIndex

#: Element sets of each size in the sample.
SAMPLE = {2: 10, 3: 20, 4: 8}


def _setup() -> dict[str, Any]:
    path = Path(os.environ.get("AFPX_BENCH_CUBE", "/work/runs/a11/cube.zarr"))
    if not path.exists():
        raise NotImplementedError(f"no cube at {path} (set AFPX_BENCH_CUBE)")
    from afpx.baselines import BaselineParams
    from afpx.cube import open_cube
    from afpx.evaluate.metrics import as_str_array, site_arrays
    from afpx.evaluate.scoring import scored_libraries
    from afpx.templates import TemplateLibrary

    ds = open_cube(path)
    params = EvaluateParams()
    library = TemplateLibrary.from_cube(ds)
    libraries = scored_libraries(library, site_arrays(ds), params.baselines, BaselineParams())
    index = TemplateIndex.from_arrays(library.site_template, library.z, library.multiplicity)
    tc = index.compositions
    split = as_str_array(library.split)
    test_by_set: dict[tuple[int, ...], list[int]] = {}
    for t in np.flatnonzero(split == params.split).tolist():
        test_by_set.setdefault(tc.element_set[t], []).append(t)
    own_by_set: dict[tuple[int, ...], list[int]] = {}
    for t, es in enumerate(tc.element_set):
        own_by_set.setdefault(es, []).append(t)
    rng = np.random.default_rng(0)
    sets: list[tuple[int, ...]] = []
    for k, n in SAMPLE.items():
        group = sorted(s for s in test_by_set if len(s) == k)
        sets += [group[i] for i in rng.choice(len(group), min(n, len(group)), replace=False)]
    tables = {k: CompositionTable.build(index, k) for k in SAMPLE}
    return {
        "params": params,
        "libraries": libraries,
        "index": index,
        "tables": tables,
        "sets": sets,
        "test_by_set": test_by_set,
        "own_by_set": own_by_set,
    }


def _test1(state: dict[str, Any], *, shared: bool) -> None:
    index, params = state["index"], state["params"]
    caches: dict[int, PairCache] = {}
    for S in state["sets"]:
        table = state["tables"].get(len(S))
        own = np.asarray(state["own_by_set"][S], dtype=np.int64)
        pairs = caches.setdefault(len(S), PairCache()) if shared else None
        for lib in state["libraries"].values():
            logl = np.asarray(lib.log_likelihood[:, np.asarray(S) - 1], dtype=np.float64)
            ub = index.upper_bound(logl)
            rank_true_candidates(
                index,
                table,
                lib.log_likelihood,
                logl,
                ub,
                own,
                state["test_by_set"][S],
                params,
                pairs=pairs,
            )


def _test2(state: dict[str, Any]) -> None:
    index, params = state["index"], state["params"]
    caches: dict[int, PairCache] = {}
    for S in state["sets"]:
        if len(S) not in params.set_sizes:
            continue
        table = state["tables"][len(S)]
        ctx = set_context(index, S, table, own_templates=state["own_by_set"][S])
        pairs = caches.setdefault(len(S), PairCache())
        for lib in state["libraries"].values():
            logl = np.asarray(lib.log_likelihood[:, np.asarray(S) - 1], dtype=np.float64)
            ub = index.upper_bound(logl)
            optimality_of_set(
                index, table, logl, ub, ctx, hit_k=params.hit_k, tolerance=1e-9, pairs=pairs
            )


class Evaluate:
    """Test 1 (shared pairs vs per-model baseline) and Test 2 of a sample of sets."""

    timeout = 1800
    number = 1
    repeat = 3
    params: ClassVar[list[int]] = [0]

    def setup(self, _: int) -> None:
        self.state = _setup()
        self.limits = threadpool_limits(1)

    def teardown(self, _: int) -> None:
        self.limits.unregister()

    def time_test1_shared_pairs(self, _: int) -> None:
        _test1(self.state, shared=True)

    def time_test1_per_model_baseline(self, _: int) -> None:
        _test1(self.state, shared=False)

    def time_test2(self, _: int) -> None:
        _test2(self.state)


def main() -> None:  # pragma: no cover - a script for quick numbers without asv
    """Print medians (3 runs) and the ratio of the Test 1 engines."""
    import time

    state = _setup()
    n_sets = {k: sum(len(S) == k for S in state["sets"]) for k in SAMPLE}
    print(f"sample: {n_sets} sets, {len(state['libraries'])} likelihood arrays")

    def median(fn: Any) -> float:
        wall = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            wall.append(time.perf_counter() - t0)
        return float(np.median(wall))

    with threadpool_limits(1):
        new = median(lambda: _test1(state, shared=True))
        old = median(lambda: _test1(state, shared=False))
        t2 = median(lambda: _test2(state))
    print(f"Test 1 shared pairs {new:.2f} s, per-model baseline {old:.2f} s: {old / new:.2f}x")
    print(f"Test 2 {t2:.2f} s")


if __name__ == "__main__":  # pragma: no cover
    main()
