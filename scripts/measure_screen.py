"""Speed of ``afpx screen``: sets per second on 1 and 2 local workers, and one set's cost by size.

Usage (from the repository root)::

    python scripts/measure_screen.py [--elements Li,Na,Mg,Mn,Ge,Si,O] [--size 3]
        [--repeats 3] [--batch-size 8] [--max-set-size 5] [--json OUT.json]

With the built-in template library (top 50):

1. baseline — the sets ranked one after another in this process with
   :func:`afpx.rank.rank_table` (library loaded and plans built beforehand);
2. ``afpx.screen.screen`` in this process (synchronous scheduler; library
   and plans already there), then on a local ``distributed`` cluster of 1
   and of 2 single-threaded worker processes (started before the clock;
   each worker loads the library and builds its plans in the first timed
   run, as a real screen does), in batches of --batch-size sets; besides wall time,
   the CPU time spent (this process, or the sum over the workers: it does
   not depend on how busy the machine is);
3. one set's cost against its size (2, 3, 4 elements): the first call, which
   builds the enumeration plan for that size, and the median of the next
   ones on other sets.

Prints medians over ``--repeats`` and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

SIZE_SETS = {
    2: [["Mn", "Ge"], ["Li", "O"], ["Fe", "Si"], ["Na", "Sb"], ["Ca", "Sn"], ["Cu", "Zn"]],
    3: [
        ["Li", "Mn", "Ge"],
        ["Na", "Fe", "O"],
        ["Mg", "Al", "Si"],
        ["Ca", "Si", "O"],
        ["Cu", "Zn", "Sn"],
    ],
    4: [
        ["Li", "Mn", "Ge", "O"],
        ["Na", "Fe", "Si", "O"],
        ["Mg", "Al", "Si", "O"],
        ["Li", "Co", "P", "O"],
    ],
    5: [["Li", "Mn", "Ge", "O", "Sr"], ["Na", "Fe", "Si", "O", "Ca"], ["Mg", "Al", "Si", "O", "K"]],
}


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _cpu_seconds() -> float:
    """User + system CPU time of this process (run on each worker by ``client.run``)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", default="Li,Na,Mg,Mn,Ge,Si,O")
    parser.add_argument("--size", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8, help="As afpx screen's default.")
    parser.add_argument("--max-set-size", type=int, default=5, help="Largest size costed in 3.")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from afpx import AfpxWarning
    from afpx.rank import load_library, rank_table
    from afpx.scheduler import use_scheduler
    from afpx.screen import element_sets, screen

    warnings.simplefilter("ignore", AfpxWarning)
    out: dict[str, Any] = {"load_before": _load(), "elements": args.elements, "size": args.size}
    elements = args.elements.split(",")
    sets = element_sets(elements, args.size)
    out["n_sets"] = len(sets)
    print(f"{len(sets)} sets of {args.size} from {args.elements}; load {out['load_before']}")

    t0 = time.perf_counter()
    library = load_library(None)
    out["library_load_s"] = time.perf_counter() - t0
    rank_table(list(sets[0]), library=library, top=50)  # plans of this size

    def baseline() -> None:
        for s in sets:
            rank_table(list(s), library=library, top=50)

    def timed(fn: Any, client: Any = None) -> tuple[list[float], list[float]]:
        """Wall times and CPU times (this process, or the sum over the workers)."""
        times, cpu = [], []
        for _ in range(args.repeats):
            c0 = sum(client.run(_cpu_seconds).values()) if client else _cpu_seconds()
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
            c1 = sum(client.run(_cpu_seconds).values()) if client else _cpu_seconds()
            cpu.append(c1 - c0)
        return times, cpu

    rows: dict[str, tuple[list[float], list[float]]] = {}
    rows["in-process rank_table loop"] = timed(baseline)
    tmp = Path(tempfile.mkdtemp())
    names = iter(tmp / f"s{i}.zarr" for i in range(10 * args.repeats))

    def run() -> None:
        screen(elements, args.size, next(names), batch_size=args.batch_size)

    try:
        with use_scheduler("synchronous"):
            rows["screen, in-process synchronous"] = timed(run)
        for workers in (1, 2):
            t = time.perf_counter()
            with use_scheduler(workers=workers) as client:
                out[f"cluster_start_{workers}_s"] = time.perf_counter() - t
                rows[f"screen, {workers} worker(s)"] = timed(run, client)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = statistics.median(rows["in-process rank_table loop"][0])
    out["runs"] = {}
    for name, (times, cpu) in rows.items():
        med, cpu_med = statistics.median(times), statistics.median(cpu)
        out["runs"][name] = {
            "times_s": times,
            "cpu_s": cpu,
            "median_s": med,
            "sets_per_s": len(sets) / med,
            "cpu_s_per_set": cpu_med / len(sets),
        }
        print(
            f"{name:32s} median {med:7.2f} s  {len(sets) / med:6.2f} sets/s  "
            f"x{base / med:.2f} of baseline  CPU {cpu_med / len(sets):6.3f} s/set"
        )

    out["set_cost"] = {}
    for k, examples in SIZE_SETS.items():
        if k > args.max_set_size:
            continue
        t = time.perf_counter()
        rank_table(examples[0], library=library, top=50)
        first = time.perf_counter() - t
        later = []
        for s in examples[1:]:
            t = time.perf_counter()
            rank_table(s, library=library, top=50)
            later.append(time.perf_counter() - t)
        med = statistics.median(later)
        out["set_cost"][k] = {"first_s": first, "later_s": later, "median_s": med}
        print(f"size {k}: first call {first:6.3f} s (plan), then median {med:6.3f} s per set")
    out["load_after"] = _load()
    print(f"load after {out['load_after']}")
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
