"""Ranking an element set over the built-in default library (one thread, in process).

The library is the packaged default (31,124 oqmd-icsd templates, 175,131
unique sites, the shipped model's likelihoods); ``$AFPX_BENCH_CUBE`` points
the benchmarks at a cube instead, and without either a synthetic library with
oqmd-icsd-like multiplicities is used (see :func:`synthetic_library`).

Timed (top 20, library loaded, caches warmed by a first call, unless said):

* :class:`Rank` — ``rank_table`` for Mn–Ge, Li–Mn–Ge, Li–Mn–Ge–O and
  Li–Mn–Ge–O–S, with the pruning by upper bounds (the default), against the
  same call enumerating every template (``prune=False``; the previous engine,
  measured in the same run; skipped for five elements, where it does not fit);
  peak memory; templates enumerated;
* :class:`FirstCall` — the same on a freshly loaded library (census and plans
  not cached yet);
* :class:`FullList` — the whole ternary list rendered as JSON/CSV by the CLI
  code, against a top-20 call with and without pruning (the issue's target:
  at most 1.5x);
* :class:`EngineVsBruteForce` — the engine on the templates small enough to
  enumerate, against plain brute force over the same templates;
* :class:`ColdCli` — a cold ``afpx rank --elements Mn,Ge`` process, against
  a cold ``python -c "import numpy"``;
* :class:`Formula` — ``afpx rank --formula Li2MnGe`` (top 20).

``python asv_bench/benchmarks/bench_rank.py [out.json] [--full-list]`` prints
(and writes) medians of the same measurements without asv, peak memory from
fresh processes (``--full-list``: the full ternary list and the top-20 calls
only). It imports the installed afpx (it prints which); to measure a checkout,
run it with ``PYTHONPATH`` set to the checkout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from threadpoolctl import threadpool_limits

from afpx.commands.rank import render
from afpx.rank import rank_formula, rank_table
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


def library(fresh: bool = False) -> TemplateLibrary:
    """The benchmark library: a cube at ``$AFPX_BENCH_CUBE``, else the built-in default.

    ``fresh`` loads it again (nothing cached: census, plans, likelihood columns).
    """
    cube = os.environ.get("AFPX_BENCH_CUBE")
    if cube:
        from afpx.rank import load_library

        return load_library(cube)
    from afpx.default import default_data_dir, load_default_library, load_library

    manifest = default_data_dir() / "default_library.json"
    if not manifest.exists():
        return synthetic_library()
    return load_library(manifest) if fresh else load_default_library()


SETS = {
    "binary": ["Mn", "Ge"],
    "ternary": ["Li", "Mn", "Ge"],
    "quaternary": ["Li", "Mn", "Ge", "O"],
    "quinary": ["Li", "Mn", "Ge", "O", "S"],
}
ZS = {"binary": [25, 32], "ternary": [3, 25, 32], "quaternary": [3, 25, 32, 8]}


class Rank:
    """``rank_table(..., top=20)``, pruned (default) and unpruned (baseline), same run."""

    params: ClassVar[list[str]] = ["binary", "ternary", "quaternary", "quinary"]
    param_names: ClassVar[list[str]] = ["element_set"]
    timeout = 600

    def setup(self, element_set: str) -> None:
        self.library = library()
        self.limits = threadpool_limits(1)
        rank_table(SETS[element_set], library=self.library)  # census and caches

    def teardown(self, element_set: str) -> None:
        self.limits.unregister()

    def time_rank(self, element_set: str) -> None:
        rank_table(SETS[element_set], library=self.library)

    def time_rank_unpruned_baseline(self, element_set: str) -> None:
        if element_set == "quinary":
            raise NotImplementedError("every template for five elements does not fit")
        rank_table(SETS[element_set], library=self.library, prune=False)

    def peakmem_rank(self, element_set: str) -> None:
        rank_table(SETS[element_set], library=self.library)

    def track_templates_enumerated(self, element_set: str) -> int:
        table = rank_table(SETS[element_set], library=self.library)
        return int(table.attrs["n_templates_enumerated"])


class FirstCall:
    """The first ``rank_table`` call on a freshly loaded library (nothing cached)."""

    params: ClassVar[list[str]] = ["binary", "ternary", "quaternary", "quinary"]
    param_names: ClassVar[list[str]] = ["element_set"]
    number = 1
    repeat = 5
    timeout = 600

    def setup(self, element_set: str) -> None:
        self.library = library(fresh=True)
        self.limits = threadpool_limits(1)

    def teardown(self, element_set: str) -> None:
        self.limits.unregister()

    def time_first_rank(self, element_set: str) -> None:
        rank_table(SETS[element_set], library=self.library)


class FullList:
    """The full ternary list (every composition) as JSON or CSV vs top-20 calls."""

    params: ClassVar[list[str]] = ["json", "csv"]
    param_names: ClassVar[list[str]] = ["format"]
    timeout = 600

    def setup(self, fmt: str) -> None:
        self.library = library()
        self.limits = threadpool_limits(1)
        rank_table(SETS["ternary"], library=self.library)

    def teardown(self, fmt: str) -> None:
        self.limits.unregister()

    def time_full_list(self, fmt: str) -> None:
        render(rank_table(SETS["ternary"], library=self.library, top=None), fmt)

    def time_top20_baseline(self, fmt: str) -> None:
        render(rank_table(SETS["ternary"], library=self.library, top=20), fmt)

    def time_top20_unpruned_baseline(self, fmt: str) -> None:
        render(rank_table(SETS["ternary"], library=self.library, top=20, prune=False), fmt)


class EngineVsBruteForce:
    """The engine (brute force + max-plus programme) vs plain brute force, small templates."""

    params: ClassVar[list[str]] = ["binary", "ternary"]
    param_names: ClassVar[list[str]] = ["element_set"]
    timeout = 600

    def setup(self, element_set: str) -> None:
        lib = library()
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
        self.library = library()
        self.limits = threadpool_limits(1)
        rank_formula("Li2MnGe", library=self.library)

    def teardown(self) -> None:
        self.limits.unregister()

    def time_formula(self) -> None:
        rank_formula("Li2MnGe", library=self.library)


def _median(fn: Any, repeat: int = 5, warm: bool = True) -> float:
    if warm:
        fn()
    wall = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        wall.append(time.perf_counter() - t0)
    return float(np.median(wall))


# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent through fork and exec
_PEAK = """
import sys, time
from threadpoolctl import threadpool_limits
from afpx.rank import rank_table
from afpx.default import load_default_library
def hwm():
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("VmHWM"))
lib = load_default_library()
base = hwm()
with threadpool_limits(1):
    t0 = time.perf_counter()
    rank_table(sys.argv[1].split(","), library=lib, prune=sys.argv[2] == "1")
    wall = time.perf_counter() - t0
print(base, hwm(), wall)
"""


def peak_memory(elements: list[str], prune: bool = True) -> dict[str, float]:
    """Peak resident memory (MiB) of a fresh process ranking ``elements`` (library loaded)."""
    out = subprocess.run(
        [sys.executable, "-c", _PEAK, ",".join(elements), "1" if prune else "0"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return {
        "loaded_mib": int(out[0]) / 1024,
        "peak_mib": int(out[1]) / 1024,
        "first_call_s": float(out[2]),
    }


def _timed(fn: Any) -> tuple[float, float]:
    """Wall and CPU (this process) seconds of one call of ``fn``."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def full_list(lib: TemplateLibrary, note: Any, repeat: int = 5) -> None:
    """Medians of the full ternary list (JSON, CSV) and of the top-20 calls, in one run.

    Wall and CPU time: on a shared machine the CPU time of this (one-thread)
    process is the steadier of the two.
    """
    els = SETS["ternary"]
    calls = {
        "top20_json": lambda: render(rank_table(els, library=lib), "json"),
        "top20_unpruned_json": lambda: render(rank_table(els, library=lib, prune=False), "json"),
        "full_json": lambda: render(rank_table(els, library=lib, top=None), "json"),
        "full_csv": lambda: render(rank_table(els, library=lib, top=None), "csv"),
    }
    for fn in calls.values():  # warm
        fn()
    # interleaved rounds, so that a change of load hits every call alike
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in calls}
    for _ in range(repeat):
        for name, fn in calls.items():
            times[name].append(_timed(fn))
    med = {name: tuple(np.median(np.asarray(t), axis=0).tolist()) for name, t in times.items()}
    top, top_u = med["top20_json"], med["top20_unpruned_json"]
    for name, (wall, cpu) in med.items():
        text = f"ternary {name}: wall {wall:.3f} s, cpu {cpu:.3f} s"
        if name.startswith("full"):
            text += (
                f" = {wall / top_u[0]:.2f}x (wall) / {cpu / top_u[1]:.2f}x (cpu) the unpruned "
                f"top 20, {wall / top[0]:.1f}x / {cpu / top[1]:.1f}x the pruned top 20"
            )
        note(f"ternary.{name}_s", {"wall": wall, "cpu": cpu}, text)


def main() -> None:  # pragma: no cover - a script for quick numbers without asv
    """Print (and write to the first argument as JSON) medians of the measurements above.

    ``--full-list`` measures the full ternary list and the top-20 calls only.
    """
    import afpx

    args = [a for a in sys.argv[1:] if a != "--full-list"]
    only_full = len(args) < len(sys.argv) - 1
    results: dict[str, Any] = {"load_before": os.getloadavg(), "afpx": afpx.__file__}
    lib = library()
    print(f"afpx from {afpx.__file__}")
    print(f"library: {lib.n_templates} templates, {lib.n_sites} unique sites")

    def note(key: str, value: Any, text: str) -> None:
        results[key] = value
        print(text, flush=True)

    with threadpool_limits(1):
        if only_full:
            full_list(lib, note, repeat=7)
        else:
            for name, els in SETS.items():
                pruned = _median(lambda e=els: rank_table(e, library=lib))
                enumerated = rank_table(els, library=lib).attrs["n_templates_enumerated"]
                note(
                    f"{name}.pruned_s", pruned, f"{name}: pruned {pruned:.3f} s ({enumerated} tmpl)"
                )
                if name != "quinary":
                    reps = 3 if name == "quaternary" else 5
                    full = _median(lambda e=els: rank_table(e, library=lib, prune=False), reps)
                    note(
                        f"{name}.unpruned_s", full, f"  unpruned {full:.3f} s: {full / pruned:.1f}x"
                    )
                mem = peak_memory(els)
                note(f"{name}.memory", mem, f"  fresh process: {mem}")
            full_list(lib, note, repeat=3)
            form = _median(lambda: rank_formula("Li2MnGe", library=lib))
            note("formula_s", form, f"rank --formula Li2MnGe: {form:.3f} s")
    if not only_full:
        cold = ColdCli()
        cli = _median(cold.time_cold_rank_cli, 7)
        npy = _median(cold.time_import_numpy_baseline, 7)
        note("cold_cli_s", cli, f"cold afpx rank --elements Mn,Ge: {cli:.3f} s")
        note("import_numpy_s", npy, f"cold import numpy: {npy:.3f} s ({cli / npy:.1f}x)")
    results["load_after"] = os.getloadavg()
    print(f"load average before {results['load_before']}, after {results['load_after']}")
    if args:
        Path(args[0]).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":  # pragma: no cover
    main()
