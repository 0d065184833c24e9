"""Test 1 + Test 2 of ``afpx evaluate`` and its knn baseline on the oqmd-icsd cube (one thread).

Needs a cube with likelihoods at ``$AFPX_BENCH_CUBE`` (for instance a copy of
the oqmd-icsd cube after ``afpx likelihood CUBE --model afpx/data/default_model``);
without one every benchmark is skipped.

A seeded sample of the test split's element sets of each size is scored for
the model and the four likelihood-free baselines (constant, random,
frequency, coordination), each set as one Dask task computes it:

* ``time_sets_graph`` — :func:`afpx.evaluate.graph.evaluate_sets` on the
  synchronous scheduler: set-column log-likelihoods and the surjective upper
  bound (:func:`~afpx.evaluate.graph.surjective_upper_bound`);
* ``time_sets_previous_baseline`` — the same Test 1 and Test 2 calls as the
  previous per-set loop made them, measured in the same run: columns read
  from the (n_sites, 118) array and the plain upper bound
  (:meth:`~afpx.templates.counting.TemplateIndex.upper_bound`).

The knn baseline on every site of the cube:

* ``time_knn_tree`` — :func:`afpx.baselines.knn_likelihood` (one exact k-d tree, one thread);
* ``time_knn_blocks_baseline`` — the previous brute force (distance blocks of
  2,048 query sites, ``argpartition``), kept here as the baseline.

``python asv_bench/benchmarks/bench_evaluate.py`` prints medians and ratios
without asv.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from threadpoolctl import threadpool_limits

from afpx import schema
from afpx.evaluate.params import VARIANTS, EvaluateParams

#: Element sets of each size in the sample.
SAMPLE = {2: 10, 3: 20, 4: 8, 5: 3}
#: Arrays scored: the model and the baselines that need no fingerprints.
BASELINES = ("constant", "random", "frequency", "coordination")


def _cube() -> Path:
    path = Path(os.environ.get("AFPX_BENCH_CUBE", "/work/runs/v3/cube.zarr"))
    if not path.exists():
        raise NotImplementedError(f"no cube at {path} (set AFPX_BENCH_CUBE)")
    return path


def _setup_sets() -> dict[str, Any]:
    from afpx.baselines import BaselineParams
    from afpx.cube import open_cube
    from afpx.evaluate.graph import EvaluationState, set_columns
    from afpx.evaluate.metrics import as_str_array, site_arrays
    from afpx.evaluate.scoring import scored_libraries
    from afpx.templates import TemplateLibrary
    from afpx.templates.counting import CompositionTable, TemplateIndex

    ds = open_cube(_cube())
    params = EvaluateParams()
    library = TemplateLibrary.from_cube(ds)
    libraries = scored_libraries(library, site_arrays(ds), BASELINES, BaselineParams())
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
    tables = {k: CompositionTable.build(index, k) for k in SAMPLE if k <= 4}
    state = EvaluationState(
        index=index,
        tables=tables,
        columns={name: set_columns(lib.log_likelihood) for name, lib in libraries.items()},
        params=params,
        by_set=own_by_set,
        test1_by_set=test_by_set,
        test2_sets=frozenset(s for s in sets if len(s) in params.set_sizes),
    )
    return {"state": state, "libraries": libraries, "sets": sets}


def _sets_graph(setup: dict[str, Any]) -> list[Any]:
    import dask

    from afpx.evaluate.graph import evaluate_sets

    with dask.config.set(scheduler="synchronous"):
        return evaluate_sets(setup["state"], setup["sets"])


def _sets_previous(setup: dict[str, Any]) -> list[Any]:
    # the previous loop's calls: strided column reads, the plain upper bound, one cache
    from afpx.evaluate.test1 import rank_true_candidates
    from afpx.evaluate.test2 import optimality_of_set, set_context
    from afpx.templates.counting import PairCache

    state = setup["state"]
    index, params = state.index, state.params
    caches: dict[int, PairCache] = {}
    out = []
    for S in setup["sets"]:
        table = state.tables.get(len(S))
        ctx = set_context(index, S, table, own_templates=state.by_set[S])
        pairs = caches.setdefault(len(S), PairCache())
        for lib in setup["libraries"].values():
            logl = np.asarray(lib.log_likelihood[:, np.asarray(S) - 1], dtype=np.float64)
            ub = index.upper_bound(logl)
            if S in state.test2_sets:
                out.append(
                    optimality_of_set(
                        index,
                        table,
                        logl,
                        ub,
                        ctx,
                        hit_k=params.hit_k,
                        tolerance=params.tie_tolerance,
                        pairs=pairs,
                    )[VARIANTS[0]]
                )
            out.append(
                rank_true_candidates(
                    index,
                    table,
                    logl,
                    ub,
                    ctx.own_templates,
                    state.test1_by_set[S],
                    params,
                    pairs=pairs,
                )
            )
    return out


def _setup_knn() -> dict[str, Any]:
    from afpx.cube import open_cube
    from afpx.evaluate.metrics import site_arrays
    from afpx.evaluate.scoring import site_features

    ds = open_cube(_cube())
    sites = site_arrays(ds)
    draw0 = np.flatnonzero(sites["draw"] == 0)
    draw0 = draw0[np.argsort(sites["structure"][draw0], kind="stable")]
    is_train = sites["split"][sites["structure"][draw0]] == "train"
    return {"features": site_features(ds, draw0), "z": sites["z"][draw0], "is_train": is_train}


def knn_blocks_baseline(
    features: Any,
    z: np.ndarray,
    is_train: np.ndarray,
    *,
    k: int = 10,
    components: int = 64,
    prior_weight: float = 0.1,
    block: int = 2048,
) -> np.ndarray:
    """The previous knn baseline: brute-force distances in blocks of query sites."""
    from afpx.baselines import element_frequency

    def standardise(x: np.ndarray) -> np.ndarray:
        mean, std = x[is_train].mean(0), x[is_train].std(0)
        return (x - mean) / np.where(std > 0, std, 1.0)

    train = np.flatnonzero(is_train)
    zt = np.asarray(z)[train].astype(np.int64)
    x = features.matrix()
    afp = standardise(x[:, :-2])
    rng = np.random.default_rng(0)
    sample = train if train.size <= 20_000 else rng.choice(train, 20_000, replace=False)
    _, _, vt = np.linalg.svd(afp[sample], full_matrices=False)
    pcs = afp @ vt[:components].T
    scale = pcs[train, 0].std() or 1.0
    emb = np.hstack([pcs, standardise(x[:, -2:]) * scale]).astype(np.float32)
    prior = element_frequency(zt)
    et = emb[train]
    norms_t = (et.astype(np.float64) ** 2).sum(1)
    train_pos = np.full(len(z), -1, np.int64)
    train_pos[train] = np.arange(train.size)
    out = np.empty((len(z), schema.N_ELEMENTS), np.float32)
    for a in range(0, len(z), block):
        q = emb[a : a + block]
        d2 = (q.astype(np.float64) ** 2).sum(1)[:, None] + norms_t[None, :] - 2.0 * (q @ et.T)
        own = train_pos[a : a + block]
        rows = np.flatnonzero(own >= 0)
        d2[rows, own[rows]] = np.inf
        nn = np.argpartition(d2, k, axis=1)[:, :k]
        dist = np.sqrt(np.maximum(np.take_along_axis(d2, nn, axis=1), 0.0))
        w = 1.0 / (dist + 1e-6)
        w /= w.sum(1, keepdims=True)
        votes = np.zeros((len(q), schema.N_ELEMENTS))
        np.add.at(votes, (np.repeat(np.arange(len(q)), k), zt[nn].ravel() - 1), w.ravel())
        out[a : a + block] = (votes + prior_weight * prior) / (1.0 + prior_weight)
    return out


def _knn_tree(setup: dict[str, Any]) -> np.ndarray:
    from afpx.baselines import knn_likelihood

    return knn_likelihood(setup["features"], setup["z"], setup["is_train"], n_jobs=1)


def _knn_blocks(setup: dict[str, Any]) -> np.ndarray:
    return knn_blocks_baseline(setup["features"], setup["z"], setup["is_train"])


class EvaluateSets:
    """Test 1 + Test 2 of a sample of sets: the graph's per-set path vs the previous loop."""

    timeout = 1800
    number = 1
    repeat = 3
    params: ClassVar[list[int]] = [0]

    def setup(self, _: int) -> None:
        self.state = _setup_sets()
        self.limits = threadpool_limits(1)

    def teardown(self, _: int) -> None:
        self.limits.unregister()

    def time_sets_graph(self, _: int) -> None:
        _sets_graph(self.state)

    def time_sets_previous_baseline(self, _: int) -> None:
        _sets_previous(self.state)


class KnnBaseline:
    """The knn baseline on every site: one k-d tree vs the previous brute-force blocks."""

    timeout = 3600
    number = 1
    repeat = 3
    params: ClassVar[list[int]] = [0]

    def setup(self, _: int) -> None:
        self.state = _setup_knn()
        self.limits = threadpool_limits(1)

    def teardown(self, _: int) -> None:
        self.limits.unregister()

    def time_knn_tree(self, _: int) -> None:
        _knn_tree(self.state)

    def time_knn_blocks_baseline(self, _: int) -> None:
        _knn_blocks(self.state)

    def peakmem_knn_tree(self, _: int) -> None:
        _knn_tree(self.state)

    def peakmem_knn_blocks_baseline(self, _: int) -> None:
        _knn_blocks(self.state)


def main() -> None:  # pragma: no cover - a script for quick numbers without asv
    """Print medians (3 runs, alternating) and ratios against the baselines."""
    import sys
    import time

    def medians(fns: dict[str, Any], repeat: int = 3) -> dict[str, float]:
        wall: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(repeat):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                wall[name].append(time.perf_counter() - t0)
        return {name: float(np.median(v)) for name, v in wall.items()}

    which = sys.argv[1:] or ["sets", "knn"]
    with threadpool_limits(1):
        if "sets" in which:
            setup = _setup_sets()
            n_sets = {k: sum(len(S) == k for S in setup["sets"]) for k in SAMPLE}
            print(f"sample: {n_sets} sets, {len(setup['libraries'])} likelihood arrays")
            m = medians(
                {"graph": lambda: _sets_graph(setup), "previous": lambda: _sets_previous(setup)}
            )
            print(
                f"Test 1 + Test 2: graph path {m['graph']:.2f} s, previous {m['previous']:.2f} s: "
                f"{m['previous'] / m['graph']:.2f}x"
            )
        if "knn" in which:
            knn = _setup_knn()
            tree, blocks = _knn_tree(knn), _knn_blocks(knn)
            test = ~knn["is_train"]
            for name, lik in (("tree", tree), ("blocks", blocks)):
                err = float((lik[test].argmax(1) + 1 != knn["z"][test]).mean())
                print(f"knn {name}: top-1 error on non-training sites {err:.4f}")
            print(f"largest difference of the likelihoods {np.abs(tree - blocks).max():.2e}")
            m = medians({"tree": lambda: _knn_tree(knn), "blocks": lambda: _knn_blocks(knn)}, 1)
            print(
                f"knn: tree {m['tree']:.1f} s, blocks {m['blocks']:.1f} s: "
                f"{m['blocks'] / m['tree']:.2f}x"
            )


if __name__ == "__main__":  # pragma: no cover
    main()
