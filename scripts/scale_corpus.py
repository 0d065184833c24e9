"""Time and peak memory of ``afpx build-cube`` on 1x, 2x and 4x the oqmd-icsd corpus.

No larger open corpus is reachable offline, so the corpus is repeated: copy
``k`` (k >= 1) is the oqmd-icsd ASE database with every atom moved by a
seeded random displacement of at most ``--displacement`` Å (1e-4 by default:
far inside the symmetry tolerance, so every copy keeps the unique sites of
the original, yet no row repeats another bit for bit). Copy 0 is the dataset
itself. ``N``x builds a cube from copies 0..N-1 (each its own source).

Every build runs in a fresh process (``python -m afpx build-cube``) under
``/usr/bin/time -v``-like accounting from ``resource.getrusage``: wall time,
user + system CPU time and the peak resident memory of that process (the
default threaded scheduler: one process does all the work).

Usage::

    python scripts/scale_corpus.py --out /tmp/scale --copies 1 2 4 --repeats 1

Writes ``results.json`` in ``--out`` (keeping the rows of other sizes from
earlier runs) and prints a Markdown table. The copies are made once and
reused by later runs. Timed runs on a shared machine: one size per run, each
under a lock (``flock LOCK python scripts/scale_corpus.py --copies 4 ...``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path


def make_copy(
    source: Path, target: Path, k: int, displacement: float, rows: int | None = None
) -> Path:
    """The database ``source`` with every position moved by up to ``displacement`` Å.

    ``rows``: only the first so many rows; ``k = 0`` copies them unmoved.
    """
    import ase.db
    import numpy as np

    if target.exists():
        return target
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    rng = np.random.default_rng(k)
    with (
        ase.db.connect(str(source), type="db") as src,
        ase.db.connect(str(partial), type="db", append=False) as dst,
    ):
        for row in src.select(limit=rows):
            atoms = row.toatoms()
            if k:
                shift = rng.uniform(-displacement, displacement, size=atoms.positions.shape)
                atoms.positions = atoms.positions + shift
            dst.write(atoms, key_value_pairs=dict(row.key_value_pairs))
    partial.rename(target)
    return target


def run_build(databases: list[Path], out: Path) -> dict[str, float]:
    """Build one cube in a child process; its wall time, CPU time and peak memory."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "afpx", "build-cube", *map(str, databases)]
    command += ["-o", str(out), "--no-progress"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    # a helper child per build: RUSAGE_CHILDREN's peak is the largest child so far
    probe = (
        "import resource, subprocess, sys, json; "
        "rc = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL); "
        "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
        "print(json.dumps({'rc': rc, 'maxrss_kb': u.ru_maxrss}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, *command], capture_output=True, text=True, check=True
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    child = json.loads(done.stdout.strip().splitlines()[-1])
    if child["rc"] != 0:
        raise SystemExit(f"build failed ({child['rc']}): {done.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "peak_mb": child["maxrss_kb"] / 1024}


def sites_of(cube: Path) -> int:
    meta = json.loads((cube / "afp" / "zarr.json").read_text())
    return int(meta["shape"][0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="Folder for copies and cubes.")
    parser.add_argument("--copies", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--displacement", type=float, default=1e-4, help="Å")
    parser.add_argument("--keep", action="store_true", help="Keep the cubes built.")
    parser.add_argument("--prepare", action="store_true", help="Only make the copies.")
    parser.add_argument(
        "--rows", type=int, help="Only the first ROWS rows of the database (a quick trend)."
    )
    args = parser.parse_args()

    from afpx import datasets

    original = Path(datasets.fetch("oqmd-icsd"))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.rows is not None:
        original = make_copy(original, args.out / f"head{args.rows}.db", 0, 0.0, args.rows)
    stem = "copy" if args.rows is None else f"head{args.rows}-copy"
    databases = [original]
    for k in range(1, max(args.copies)):
        databases.append(
            make_copy(original, args.out / f"{stem}{k}.db", k, args.displacement, args.rows)
        )
    if args.prepare:
        return

    rows = []
    for n in args.copies:
        for repeat in range(args.repeats):
            cube = args.out / f"cube{n}x.zarr"
            load = os.getloadavg()[0]
            measured = run_build(databases[:n], cube)
            measured.update(copies=n, repeat=repeat, load_before=load, sites=sites_of(cube))
            measured["load_after"] = os.getloadavg()[0]
            if not args.keep:
                shutil.rmtree(cube)
            rows.append(measured)
            print(json.dumps(measured), flush=True)
    # runs of other sizes (e.g. one run per size, each under its own lock) are kept
    results = args.out / "results.json"
    earlier = json.loads(results.read_text()) if results.exists() else []
    rows = [r for r in earlier if r["copies"] not in args.copies] + rows
    results.write_text(json.dumps(rows, indent=1) + "\n")

    print("| corpus | sites | wall (s) | CPU (s) | CPU per 1k sites (s) | peak memory (MB) |")
    print("|---|---|---|---|---|---|")
    for n in sorted({r["copies"] for r in rows}):
        mine = [r for r in rows if r["copies"] == n]
        pick = sorted(mine, key=lambda r: r["cpu_s"])[len(mine) // 2]  # the median by CPU
        print(
            f"| {n}x | {pick['sites']:,} | {pick['wall_s']:.0f} | {pick['cpu_s']:.0f} |"
            f" {1000 * pick['cpu_s'] / pick['sites']:.2f} | {pick['peak_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
