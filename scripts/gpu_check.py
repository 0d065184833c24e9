"""CuPy/CUDA check: the GPU fingerprints against numpy's, and their speed, in one run.

Run on a machine with CuPy and a CUDA device (``pip install afpx[gpu]``)::

    python scripts/gpu_check.py --out gpu-check.json

1. **Agreement.** ``afp_kernel`` on random environments (the asv benchmark's,
   with rotations and jitter) and ``fingerprint_structures`` on perturbed
   rock-salt supercells (every atom a unique site), ``device="cuda"``
   against ``device="cpu"``: the largest difference relative to the largest
   value, and whether the non-fingerprint outputs are identical.
2. **Speed.** The same calls timed on both devices in this run (median of
   ``--repeats`` after one warm-up; the GPU timings include the copies to
   and from the device and end with a synchronisation), with the ratio
   CPU / GPU. The CPU side uses every core numpy's libraries are given. The
   kernel is also timed on the GPU in the CPU's pass sizes
   (``afpx.kernels.DEVICE_PASS_SCALE = 1``), the baseline of the larger
   passes a GPU is given.

Prints a Markdown table and writes every figure to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "asv_bench"))

from benchmarks.bench_kernels import random_environments

import afpx.kernels
from afpx import schema
from afpx.cube import fingerprint_structures
from afpx.kernels import FingerprintParams, afp_kernel

PARAMS = FingerprintParams()


def median_time(run: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> float:
    """Median wall time of ``run`` over ``repeats`` calls after one warm-up."""
    run()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def supercells(n: int, size: int, seed: int) -> list[Any]:
    """``n`` rock-salt supercells (``size``³ cells), every atom moved by up to 0.05 Å."""
    from pymatgen.core import Lattice, Structure

    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        cell = Structure.from_spacegroup(
            "Fm-3m", Lattice.cubic(5.64 + 0.02 * k), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]
        )
        cell.make_supercell([size, size, size])
        shift = rng.uniform(-0.05, 0.05, (len(cell), 3))
        coords = cell.cart_coords + shift
        out.append(Structure(cell.lattice, cell.species, coords, coords_are_cartesian=True))
    return out


def kernel_call(rows: dict[str, Any], xp: Any) -> Callable[[], Any]:
    """``afp_kernel`` from host arrays to a host result, through namespace ``xp``."""

    def run() -> np.ndarray:
        out = afp_kernel(
            xp.asarray(rows["vectors"]),
            rows["counts"],
            xp.asarray(rows["r0"]),
            params=PARAMS,
            rotations=xp.asarray(rows["rotations"]),
            jitter=xp.asarray(rows["jitter"]),
        )
        return out.get() if hasattr(out, "get") else np.asarray(out)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the results.")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--structures", type=int, default=8, help="Supercells to fingerprint.")
    parser.add_argument("--size", type=int, default=3, help="Supercell edge in unit cells.")
    parser.add_argument("--draws", type=int, default=4)
    args = parser.parse_args()
    try:
        import cupy

        found = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # no CuPy, or no driver: say which
        raise SystemExit(f"gpu_check: CuPy with a CUDA device is needed ({error})") from None
    if not found:
        raise SystemExit("gpu_check: CuPy sees no CUDA device")

    def sync() -> None:
        cupy.cuda.Device().synchronize()

    def nothing() -> None:
        return None

    props = cupy.cuda.runtime.getDeviceProperties(0)
    report: dict[str, Any] = {
        "device": props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
        "cupy": cupy.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "kernel": [],
    }
    for n_sites, neighbours in [(256, 300), (256, 1000), (4096, 300), (4096, 1000)]:
        rows = random_environments(n_sites, neighbours)
        cpu, gpu = kernel_call(rows, np), kernel_call(rows, cupy)
        expected, got = cpu(), gpu()
        row = {
            "sites": n_sites,
            "neighbours": neighbours,
            "max_rel_diff": float(np.abs(got - expected).max() / np.abs(expected).max()),
            "cpu_s": median_time(cpu, args.repeats, nothing),
            "gpu_s": median_time(gpu, args.repeats, sync),
        }
        # the same call in the CPU's pass sizes: the baseline of DEVICE_PASS_SCALE
        scale = afpx.kernels.DEVICE_PASS_SCALE
        afpx.kernels.DEVICE_PASS_SCALE = 1
        try:
            row["gpu_cpu_passes_s"] = median_time(gpu, args.repeats, sync)
        finally:
            afpx.kernels.DEVICE_PASS_SCALE = scale
        row["ratio"] = row["cpu_s"] / row["gpu_s"]
        report["kernel"].append(row)
        print(json.dumps(row), flush=True)

    structures = supercells(args.structures, args.size, seed=0)
    options = {"draws": args.draws, "seed": 3}
    expected = fingerprint_structures(structures, device="cpu", **options)
    got = fingerprint_structures(structures, device="cuda", **options)
    afp = schema.AFP
    same = sorted(k for k in expected if k != afp and np.array_equal(expected[k], got[k]))
    differ = sorted(k for k in expected if k != afp and k not in same)
    fp = {
        "structures": len(structures),
        "rows": len(expected[afp]),
        "max_rel_diff": float(np.abs(got[afp] - expected[afp]).max() / np.abs(expected[afp]).max()),
        "identical": same,
        "different": differ,
        "cpu_s": median_time(
            lambda: fingerprint_structures(structures, device="cpu", **options),
            args.repeats,
            nothing,
        ),
        "gpu_s": median_time(
            lambda: fingerprint_structures(structures, device="cuda", **options),
            args.repeats,
            sync,
        ),
    }
    fp["ratio"] = fp["cpu_s"] / fp["gpu_s"]
    report["fingerprint_structures"] = fp
    print(json.dumps(fp), flush=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")

    print(
        f"\n{report['device']}, CuPy {report['cupy']}, numpy {report['numpy']}, "
        f"{report['cpu_count']} CPUs; median of {args.repeats}\n"
    )
    print(
        "| call | rows | max. rel. difference | CPU (s) | GPU (s) | CPU / GPU"
        " | GPU in CPU passes (s) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in report["kernel"]:
        print(
            f"| afp_kernel, {r['neighbours']} neighbours | {r['sites']:,} |"
            f" {r['max_rel_diff']:.1e} | {r['cpu_s']:.3f} | {r['gpu_s']:.4f} | {r['ratio']:.1f} |"
            f" {r['gpu_cpu_passes_s']:.4f} |"
        )
    print(
        f"| fingerprint_structures, {fp['structures']} supercells | {fp['rows']:,} |"
        f" {fp['max_rel_diff']:.1e} | {fp['cpu_s']:.2f} | {fp['gpu_s']:.2f} |"
        f" {fp['ratio']:.1f} | – |"
    )


if __name__ == "__main__":
    main()
