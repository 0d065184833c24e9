"""Ranking an element set over a library the size of ``oqmd-icsd`` (one thread).

The library has ~32,000 templates and ~180,000 unique sites. With a real cube
at ``$AFPX_BENCH_CUBE`` (default ``/work/runs/oqmd.zarr``) its multiplicities
(and likelihoods, when it has them) are used; otherwise the multiplicities are
drawn from a model of the real distribution (number of unique sites per
template, and each site's multiplicity divided by the template's gcd, both as
measured on the 32,163 OQMD-ICSD structures of the ``oqmd-icsd`` dataset with
spglib at symprec 0.01 Å) and the likelihoods are random (u^8, so that most
are small, as sigmoid outputs are).

Timed: :func:`afpx.rank.rank` (top 20, in-process, library loaded, the
enumeration plan built by a first call) for Mn–Ge, Li–Mn–Ge and Li–Mn–Ge–O,
and the exact enumeration alone. Tracked: the work done — candidates
enumerated by brute force, state updates of the max-plus programme,
candidates produced. Baselines measured in the same run:

* :class:`FullList` — the whole ternary list rendered as JSON/CSV by the CLI
  code, against a top-20 call (the issue's target: at most 1.5x);
* :class:`EngineVsBruteForce` — the engine on the templates small enough to
  enumerate, against plain brute force over the same templates;
* :class:`ColdCli` — a cold ``afpx rank --elements Mn,Ge`` process, against
  a cold ``python -c "import numpy"``;
* :class:`Formula` — ``afpx rank --formula Li2MnGe`` (top 20).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from threadpoolctl import threadpool_limits

from afpx.commands.rank import render
from afpx.rank import rank, rank_formula, rank_table
from afpx.templates import TemplateLibrary, best_candidates
from afpx.templates.bruteforce import bruteforce_limit
from afpx.templates.counting import TemplateIndex, candidates_above

#: P(n unique sites = i) for i = 0.. on oqmd-icsd (measured; rounded).
N_SITES_PMF = [
    0.0, 0.007, 0.1062, 0.2306, 0.1716, 0.1138, 0.1085, 0.0666, 0.043, 0.0413, 0.0277,
    0.016, 0.0141, 0.0068, 0.0069, 0.0061, 0.0062, 0.004, 0.0059, 0.003, 0.0031, 0.0017,
    0.001, 0.0001, 0.001, 0.0005, 0.0006, 0.0005, 0.0007, 0.0, 0.0008, 0.0002, 0.0008,
    0.0003, 0.0002, 0.0, 0.0012, 0.0, 0.0002, 0.0002, 0.0009, 0.0, 0.0002, 0.0, 0.0, 0.0,
    0.0001, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0001,
]  # fmt: skip
#: Multiplicity / template gcd, by range of unique sites [lo, hi): (values, probabilities).
REDUCED_MULTIPLICITY = [
    (1, 2, [1], [1.0]),
    (2, 3, [1, 2, 3, 4, 6, 12], [0.704, 0.179, 0.092, 0.017, 0.004, 0.003]),
    (3, 5, [1, 2, 3, 4, 6, 12, 8], [0.563, 0.248, 0.09, 0.053, 0.037, 0.007, 0.002]),
    (5, 9, [1, 2, 3, 4, 6, 8, 12], [0.536, 0.316, 0.05, 0.044, 0.042, 0.008, 0.003]),
    (9, 17, [1, 2, 3, 4, 6, 8], [0.601, 0.33, 0.03, 0.028, 0.01, 0.002]),
    (17, 1000, [1, 2, 4, 3, 6, 12], [0.817, 0.172, 0.006, 0.003, 0.001, 0.001]),
]
#: The gcd of a template's multiplicities: values and probabilities.
GCD = ([1, 2, 3, 4, 6, 8], [0.3675, 0.4338, 0.0051, 0.1831, 0.0031, 0.0074])
N_TEMPLATES = 32_163


def synthetic_library(n_templates: int = N_TEMPLATES, seed: int = 0) -> TemplateLibrary:
    """A library with oqmd-icsd-like multiplicities and random likelihoods."""
    rng = np.random.default_rng(seed)
    pmf = np.asarray(N_SITES_PMF) / np.sum(N_SITES_PMF)
    n = rng.choice(pmf.size, size=n_templates, p=pmf)
    mult = np.empty(int(n.sum()), dtype=np.int32)
    owner = np.repeat(np.arange(n_templates), n)
    n_of_site = n[owner]
    for lo, hi, values, probs in REDUCED_MULTIPLICITY:
        sel = (n_of_site >= lo) & (n_of_site < hi)
        p = np.asarray(probs) / np.sum(probs)
        mult[sel] = rng.choice(np.asarray(values), size=int(sel.sum()), p=p)
    g = rng.choice(np.asarray(GCD[0]), size=n_templates, p=np.asarray(GCD[1]) / sum(GCD[1]))
    mult *= g[owner].astype(np.int32)
    lik = rng.random((mult.size, 118), dtype=np.float32) ** 8
    return TemplateLibrary(
        site_template=owner.astype(np.int64),
        multiplicity=mult,
        z=rng.integers(1, 95, mult.size).astype(np.int16),
        log_likelihood=np.log(np.clip(lik, 1e-30, 1.0)),
        structure_id=np.asarray([f"syn-{i}" for i in range(n_templates)], dtype=object),
        formula=np.asarray(["X"] * n_templates, dtype=object),
        spacegroup=np.ones(n_templates, dtype=np.int64),
        source=np.asarray(["synthetic"] * n_templates, dtype=object),
    )


def real_or_synthetic_library() -> tuple[TemplateLibrary, str]:
    """The real cube's templates when it exists, else :func:`synthetic_library`."""
    path = Path(os.environ.get("AFPX_BENCH_CUBE", "/work/runs/oqmd.zarr"))
    if path.exists():
        from afpx import schema
        from afpx.cube import open_cube

        ds = open_cube(path)
        if schema.LIKELIHOOD in ds or schema.LIKELIHOOD_MEAN in ds:
            return TemplateLibrary.from_cube(ds), f"cube {path}"
        # multiplicities of the real cube, random likelihoods
        draw0 = np.asarray(ds[schema.DRAW].values) == 0
        owner = np.asarray(ds[schema.STRUCTURE_INDEX].values)[draw0].astype(np.int64)
        mult = np.asarray(ds[schema.MULTIPLICITY].values)[draw0].astype(np.int32)
        rng = np.random.default_rng(0)
        lik = rng.random((mult.size, 118), dtype=np.float32) ** 8
        n_t = ds.sizes[schema.STRUCTURE]
        lib = TemplateLibrary(
            site_template=owner,
            multiplicity=mult,
            z=np.asarray(ds[schema.Z].values)[draw0].astype(np.int16),
            log_likelihood=np.log(np.clip(lik, 1e-30, 1.0)),
            structure_id=np.asarray(ds[schema.STRUCTURE_ID].values).astype(object),
            formula=np.asarray(ds[schema.FORMULA].values).astype(object),
            spacegroup=np.asarray(ds[schema.SPACEGROUP].values).astype(np.int64),
            source=np.asarray(ds[schema.SOURCE].values).astype(object),
        )
        assert lib.n_templates == n_t
        return lib, f"multiplicities of {path}, random likelihoods"
    return synthetic_library(), "synthetic (oqmd-icsd-like multiplicities)"


SETS = {
    "binary": ["Mn", "Ge"],
    "ternary": ["Li", "Mn", "Ge"],
    "quaternary": ["Li", "Mn", "Ge", "O"],
}
ZS = {"binary": [25, 32], "ternary": [3, 25, 32], "quaternary": [3, 25, 32, 8]}


class Rank:
    """``afpx.rank(..., top=20)`` in-process over a loaded library."""

    params: ClassVar[list[str]] = ["binary", "ternary", "quaternary"]
    param_names: ClassVar[list[str]] = ["element_set"]
    timeout = 600

    def setup_cache(self) -> None:
        pass

    def setup(self, element_set: str) -> None:
        self.library, self.label = real_or_synthetic_library()
        self.limits = threadpool_limits(1)
        rank(SETS[element_set], library=self.library)  # builds and caches the plan

    def teardown(self, element_set: str) -> None:
        self.limits.unregister()

    def time_rank(self, element_set: str) -> None:
        rank(SETS[element_set], library=self.library)

    def time_enumerate(self, element_set: str) -> None:
        best_candidates(self.library, ZS[element_set], assignments=False)

    def track_bruteforce_candidates(self, element_set: str) -> int:
        return int(rank(SETS[element_set], library=self.library).attrs["n_candidates_bruteforce"])

    def track_dp_updates(self, element_set: str) -> int:
        return int(rank(SETS[element_set], library=self.library).attrs["n_dp_updates"])

    def track_candidates(self, element_set: str) -> int:
        return int(rank(SETS[element_set], library=self.library).attrs["n_candidates"])

    def peakmem_rank(self, element_set: str) -> None:
        rank(SETS[element_set], library=self.library)


class FullList:
    """The full ternary list (every composition) as JSON or CSV vs a top-20 call."""

    params: ClassVar[list[str]] = ["json", "csv"]
    param_names: ClassVar[list[str]] = ["format"]
    timeout = 600

    def setup(self, fmt: str) -> None:
        self.library, _ = real_or_synthetic_library()
        self.limits = threadpool_limits(1)
        rank_table(SETS["ternary"], library=self.library)

    def teardown(self, fmt: str) -> None:
        self.limits.unregister()

    def time_full_list(self, fmt: str) -> None:
        render(rank_table(SETS["ternary"], library=self.library, top=None), fmt)

    def time_top20_baseline(self, fmt: str) -> None:
        render(rank_table(SETS["ternary"], library=self.library, top=20), fmt)


class EngineVsBruteForce:
    """The engine (brute force + max-plus programme) vs plain brute force, small templates."""

    params: ClassVar[list[str]] = ["binary", "ternary"]
    param_names: ClassVar[list[str]] = ["element_set"]
    timeout = 600

    def setup(self, element_set: str) -> None:
        lib, _ = real_or_synthetic_library()
        k = len(ZS[element_set])
        n = lib.n_unique_sites
        small = np.flatnonzero((n >= k) & (n <= bruteforce_limit(k)))
        self.library = lib.subset(small)
        self.index = TemplateIndex.from_arrays(
            self.library.site_template, self.library.z, self.library.multiplicity
        )
        self.limits = threadpool_limits(1)
        best_candidates(self.library, ZS[element_set], assignments=False)

    def teardown(self, element_set: str) -> None:
        self.limits.unregister()

    def time_engine(self, element_set: str) -> None:
        best_candidates(self.library, ZS[element_set], assignments=False)

    def time_bruteforce_baseline(self, element_set: str) -> None:
        logl = self.library.log_likelihood[:, np.asarray(ZS[element_set]) - 1]
        candidates_above(self.index, logl.astype(np.float64), -np.inf)


class ColdCli:
    """A cold ``afpx rank --elements Mn,Ge`` process vs a cold ``import numpy``."""

    timeout = 120

    def time_cold_rank_cli(self) -> None:
        subprocess.run(
            [sys.executable, "-m", "afpx", "rank", "--elements", "Mn,Ge"],
            check=True,
            capture_output=True,
        )

    def time_import_numpy_baseline(self) -> None:
        subprocess.run([sys.executable, "-c", "import numpy"], check=True, capture_output=True)


class Formula:
    """``afpx rank --formula Li2MnGe`` (top 20), in process."""

    timeout = 300

    def setup(self) -> None:
        self.library, _ = real_or_synthetic_library()
        self.limits = threadpool_limits(1)
        rank_formula("Li2MnGe", library=self.library)

    def teardown(self) -> None:
        self.limits.unregister()

    def time_formula(self) -> None:
        rank_formula("Li2MnGe", library=self.library)


def _median(fn: Any, repeat: int = 5) -> float:
    import time

    fn()
    wall = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        wall.append(time.perf_counter() - t0)
    return float(np.median(wall))


def main() -> None:  # pragma: no cover - a script for quick numbers without asv
    """Print medians of wall and CPU time (``python bench_rank.py``)."""
    import time

    lib, label = real_or_synthetic_library()
    print(f"library: {lib.n_templates} templates, {lib.n_sites} unique sites ({label})")
    with threadpool_limits(1):
        for name, els in SETS.items():
            rank(els, library=lib)
            wall, cpu = [], []
            for _ in range(7):
                t0, c0 = time.perf_counter(), time.process_time()
                ds = rank(els, library=lib)
                wall.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            print(
                f"{name:8s} rank: median wall {np.median(wall):.3f} s, cpu {np.median(cpu):.3f} s; "
                f"{ds.attrs['n_candidates']} candidates, {ds.attrs['n_candidates_bruteforce']} "
                f"brute-force assignments, {ds.attrs['n_dp_updates']} DP updates, "
                f"{ds.attrs['n_compositions']} compositions"
            )
        for fmt in ("json", "csv"):
            full = _median(
                lambda f=fmt: render(rank_table(SETS["ternary"], library=lib, top=None), f)
            )
            top = _median(lambda f=fmt: render(rank_table(SETS["ternary"], library=lib), f))
            print(f"full ternary list {fmt}: {full:.3f} s vs top 20 {top:.3f} s: {full / top:.2f}x")
        print(
            f"rank --formula Li2MnGe: {_median(lambda: rank_formula('Li2MnGe', library=lib)):.3f} s"
        )
        for name in ("binary", "ternary"):
            bench = EngineVsBruteForce()
            bench.setup(name)
            eng = _median(lambda b=bench, n=name: b.time_engine(n))
            bf = _median(lambda b=bench, n=name: b.time_bruteforce_baseline(n))
            bench.teardown(name)
            print(
                f"{name} small templates: engine {eng:.3f} s, "
                f"brute force {bf:.3f} s: {bf / eng:.2f}x"
            )
    cold = ColdCli()
    cli = _median(cold.time_cold_rank_cli)
    npy = _median(cold.time_import_numpy_baseline)
    print(
        f"cold afpx rank --elements Mn,Ge: {cli:.3f} s vs import numpy {npy:.3f} s: "
        f"{cli / npy:.1f}x"
    )


if __name__ == "__main__":  # pragma: no cover
    main()
