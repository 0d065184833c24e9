"""Fingerprint kernel and neighbour search throughput (one thread)."""

from __future__ import annotations

import time
from typing import ClassVar

import numpy as np
from threadpoolctl import threadpool_limits

from afpx.kernels import FingerprintParams, afp_kernel, random_rotation
from afpx.neighbours import nearest_neighbour_distances, neighbour_shells

PARAMS = FingerprintParams()
N_SITES = 256


def random_environments(n_sites: int, neighbours: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random environments with about ``neighbours`` atoms within 6 r0 of each origin."""
    rng = np.random.default_rng(seed)
    n = n_sites * neighbours
    direction = rng.standard_normal((n, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    # uniform density in the ball of radius 6.15 r0, outside r0
    radius = (1 + rng.random(n) * (6.15**3 - 1)) ** (1 / 3)
    r0 = rng.uniform(1.8, 3.0, n_sites)
    owner = np.repeat(np.arange(n_sites), neighbours)
    return {
        "vectors": direction * (radius * r0[owner])[:, None],
        "counts": np.full(n_sites, neighbours, dtype=np.int64),
        "r0": r0,
        "rotations": np.stack([random_rotation(rng) for _ in range(n_sites)]),
        "jitter": rng.normal(0.0, 0.01, (n, 3)),
    }


class AfpKernel:
    """``afp_kernel`` over 256 sites with rotation and jitter (fused path)."""

    params: ClassVar[list[int]] = [100, 300, 1000]
    param_names: ClassVar[list[str]] = ["neighbours_per_origin"]

    def setup(self, neighbours: int) -> None:
        self.rows = random_environments(N_SITES, neighbours)
        self._limits = threadpool_limits(1)

    def teardown(self, neighbours: int) -> None:
        self._limits.unregister()

    def _run(self) -> np.ndarray:
        r = self.rows
        return afp_kernel(
            r["vectors"],
            r["counts"],
            r["r0"],
            params=PARAMS,
            rotations=r["rotations"],
            jitter=r["jitter"],
        )

    def time_afp_kernel(self, neighbours: int) -> None:
        self._run()

    def peakmem_afp_kernel(self, neighbours: int) -> None:
        self._run()

    def track_sites_per_second(self, neighbours: int) -> float:
        best = np.inf
        for _ in range(3):
            t = time.perf_counter()
            self._run()
            best = min(best, time.perf_counter() - t)
        return N_SITES / best

    track_sites_per_second.unit = "sites/s"  # type: ignore[attr-defined]


class NeighbourShells:
    """Periodic neighbour query out to 6.15 r0 for every atom of a 64-atom rock-salt cell."""

    def setup(self) -> None:
        a = 5.64
        fcc = np.array([[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]])
        cell = np.concatenate([fcc, (fcc + 0.5) % 1.0])
        shifts = np.array([[i, j, k] for i in range(2) for j in range(2) for k in range(2)])
        self.frac = ((cell[None, :, :] + shifts[:, None, :]) / 2).reshape(-1, 3)
        self.lattice = np.eye(3) * 2 * a
        self.atoms = np.arange(len(self.frac))
        self.r0 = nearest_neighbour_distances(self.lattice, self.frac, self.atoms)
        self.radii = [PARAMS.query_radius(r, deterministic=False) for r in self.r0]

    def time_neighbour_shells(self) -> None:
        neighbour_shells(self.lattice, self.frac, self.atoms, self.radii)

    def time_nearest_neighbour_distances(self) -> None:
        nearest_neighbour_distances(self.lattice, self.frac, self.atoms)

    def track_sites_per_second(self) -> float:
        t = time.perf_counter()
        neighbour_shells(self.lattice, self.frac, self.atoms, self.radii)
        return len(self.atoms) / (time.perf_counter() - t)

    track_sites_per_second.unit = "sites/s"  # type: ignore[attr-defined]
