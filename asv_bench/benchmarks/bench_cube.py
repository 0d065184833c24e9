"""Build throughput: structures in memory to a zarr cube on disk (threaded scheduler)."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from pymatgen.core import Lattice, Structure

from afpx.cube import build_cube, compute_fingerprints
from afpx.structures import AnalysedStructure, FilterParams, ReadResult, unique_sites


def _structures(n: int, seed: int = 0) -> list[AnalysedStructure]:
    """Rock salts, perovskites and wurtzites with random lattice constants."""
    rng = np.random.default_rng(seed)
    fcc = np.array([[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]])
    out = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            s = Structure(
                Lattice.cubic(rng.uniform(4.5, 6.5)),
                ["Na"] * 4 + ["Cl"] * 4,
                np.concatenate([fcc, (fcc + 0.5) % 1]),
            )
        elif kind == 1:
            s = Structure(
                Lattice.cubic(rng.uniform(3.7, 4.1)),
                ["Sr", "Ti", "O", "O", "O"],
                [[0, 0, 0], [0.5] * 3, [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]],
            )
        else:
            u = rng.uniform(0.37, 0.39)
            s = Structure(
                Lattice.hexagonal(rng.uniform(3.1, 3.4), rng.uniform(5.0, 5.4)),
                ["Zn", "Zn", "O", "O"],
                [
                    [1 / 3, 2 / 3, 0],
                    [2 / 3, 1 / 3, 0.5],
                    [1 / 3, 2 / 3, u],
                    [2 / 3, 1 / 3, 0.5 + u],
                ],
            )
        out.append(
            AnalysedStructure(
                structure_id=str(i),
                source="bench",
                formula=s.composition.reduced_formula,
                lattice=np.asarray(s.lattice.matrix),
                frac_coords=np.asarray(s.frac_coords),
                numbers=np.asarray([x.specie.Z for x in s], dtype=np.int16),
                sites=unique_sites(s),
            )
        )
    return out


class BuildCube:
    """``build_cube`` of 300 small structures (~750 sites), 2 draws each."""

    timeout = 300

    def setup(self) -> None:
        self.read = ReadResult(_structures(300), [], 300, FilterParams())
        self.n_sites = 2 * sum(len(s.sites) for s in self.read.structures)
        self.tmp = Path(tempfile.mkdtemp())

    def teardown(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _build(self) -> None:
        target = self.tmp / f"cube-{time.perf_counter_ns()}.zarr"
        build_cube(self.read, target, draws=2, progress=False)
        shutil.rmtree(target)

    def time_build_cube(self) -> None:
        self._build()

    def peakmem_build_cube(self) -> None:
        self._build()

    def time_compute_eager(self) -> None:
        compute_fingerprints(self.read.structures, draws=2)

    def track_sites_per_second(self) -> float:
        t = time.perf_counter()
        self._build()
        return self.n_sites / (time.perf_counter() - t)

    track_sites_per_second.unit = "sites/s"  # type: ignore[attr-defined]
