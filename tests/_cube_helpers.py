"""A tiny synthetic AFP cube with the exact schema names, for tests of every area.

The cube follows the layout of :mod:`afpx.schema` and ``contracts.md``: dim
``site`` runs over (structure, unique site, draw) with all draws of a unique
site consecutive; per-structure variables along ``structure``; a couple of
rejections along ``reject``; the fingerprint parameters in ``attrs``.

With ``separable=True`` every element has its own fingerprint shape (a few
Gaussian peaks at element-specific radii plus small noise), its own ``r0`` and
its own ``dmin_ratio``, so that a tiny network can learn to tell elements apart.
With ``separable=False`` the fingerprints are noise, unrelated to the element.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from afpx import schema
from afpx.kernels import FingerprintParams

#: The elements of the synthetic cube and how often each occurs (imbalanced on
#: purpose, so that element-balanced sampling has something to do).
ELEMENTS: tuple[int, ...] = (3, 8, 11, 25, 26, 32)
_SYMBOLS = {3: "Li", 8: "O", 11: "Na", 25: "Mn", 26: "Fe", 32: "Ge"}
_FREQUENCY = np.array([0.10, 0.40, 0.20, 0.15, 0.10, 0.05])

#: The fingerprint parameters stored in ``attrs["fingerprint"]``: the paper's, as
#: the real cube writes them (a model trained on a synthetic cube is compatible).
FINGERPRINT_PARAMS: dict[str, Any] = FingerprintParams().to_attrs()

#: Root attribute that :func:`afpx.cube.open_cube` requires of a finished store.
COMPLETE_ATTR = "afpx_complete"

_STRING = np.dtypes.StringDType()


def _afp(rng: np.random.Generator, z: int, *, separable: bool) -> np.ndarray:
    r = np.linspace(0.0, 6.0, schema.N_BINS, endpoint=False, dtype=np.float64)
    out = np.zeros((schema.N_PERSPECTIVES, schema.N_BINS))
    if separable:
        k = ELEMENTS.index(z)
        # element-specific second and third shells; perspectives shift them a little
        shells = np.array([1.0, 1.3 + 0.25 * k, 2.2 + 0.4 * ((k * 7) % 6) / 5.0, 4.0])
        heights = np.array([4.0, 2.0 + k, 6.0, 10.0])
        for p in range(schema.N_PERSPECTIVES):
            centres = shells * (1.0 + 0.01 * (p % 3)) + rng.normal(0, 0.01, shells.size)
            out[p] = (heights[:, None] * np.exp(-0.5 * ((r - centres[:, None]) / 0.08) ** 2)).sum(0)
        out += rng.normal(0.0, 0.05, out.shape)
    else:
        out = np.abs(rng.normal(1.0, 1.0, out.shape))
    return out.astype(np.float32)


def make_synthetic_cube(
    path: str | Path,
    *,
    n_structures: int = 40,
    seed: int = 0,
    draws: int = 1,
    separable: bool = True,
    chunk_sites: int = 16,
) -> Path:
    """Write a small synthetic cube to ``path`` (a zarr v3 store) and return the path.

    Parameters
    ----------
    path : str or Path
        Where to write the store (overwritten).
    n_structures : int
        Number of structures; each has 1 to 4 unique sites.
    seed : int
        Seed of every random choice.
    draws : int
        Augmentation draws per unique site (consecutive along ``site``).
    separable : bool
        Whether the fingerprints tell the elements apart.
    chunk_sites : int
        Sites per zarr chunk (small, so that the cube has several chunks).

    Returns
    -------
    Path
        ``path``.
    """
    rng = np.random.default_rng(seed)
    path = Path(path)
    elements = np.asarray(ELEMENTS)
    n_unique = rng.integers(1, 5, size=n_structures)
    # splits by structure: 60 / 20 / 20, every split non-empty
    split = np.array(["train"] * n_structures, dtype=_STRING)
    order = rng.permutation(n_structures)
    n_hold = max(1, round(0.2 * n_structures))
    split[order[:n_hold]] = "holdout"
    split[order[n_hold : 2 * n_hold]] = "test"

    site_vars: dict[str, list[Any]] = {
        k: []
        for k in (
            schema.AFP,
            schema.R0,
            schema.DMIN_RATIO,
            schema.COORDINATION,
            schema.Z,
            schema.MULTIPLICITY,
            schema.WYCKOFF,
            schema.SITE_INDEX,
            schema.STRUCTURE_INDEX,
            schema.DRAW,
        )
    }
    formulas, dmins = [], []
    for s in range(n_structures):
        zs = rng.choice(elements, size=n_unique[s], p=_FREQUENCY)
        dmin_ratios = []
        for u, z in enumerate(zs):
            k = ELEMENTS.index(int(z))
            r0 = (1.8 + 0.15 * k if separable else 2.0) + rng.normal(0, 0.02)
            dmin_ratio = min(1.0, (0.95 - 0.05 * k if separable else 0.9) + rng.normal(0, 0.01))
            dmin_ratios.append(dmin_ratio * r0)
            mult = int(rng.choice([1, 2, 4, 8]))
            for d in range(draws):
                site_vars[schema.AFP].append(_afp(rng, int(z), separable=separable))
                site_vars[schema.R0].append(r0)
                site_vars[schema.DMIN_RATIO].append(dmin_ratio)
                site_vars[schema.COORDINATION].append(4 + k)
                site_vars[schema.Z].append(int(z))
                site_vars[schema.MULTIPLICITY].append(mult)
                site_vars[schema.WYCKOFF].append("abcdefgh"[u])
                site_vars[schema.SITE_INDEX].append(u * 2)
                site_vars[schema.STRUCTURE_INDEX].append(s)
                site_vars[schema.DRAW].append(d)
        formulas.append("".join(sorted({_SYMBOLS[int(z)] for z in zs})))
        dmins.append(min(dmin_ratios))

    data_vars: dict[str, tuple[Any, ...]] = {}
    for name, values in site_vars.items():
        if name == schema.AFP:
            arr = np.stack(values).astype(np.float32)
            data_vars[name] = ((schema.SITE, schema.PERSPECTIVE, schema.BIN), arr)
        elif name == schema.WYCKOFF:
            data_vars[name] = ((schema.SITE,), np.asarray(values, dtype=_STRING))
        else:
            data_vars[name] = ((schema.SITE,), np.asarray(values, dtype=schema.DTYPES[name]))
    data_vars[schema.STRUCTURE_ID] = (
        (schema.STRUCTURE,),
        np.asarray([f"syn-{s}" for s in range(n_structures)], dtype=_STRING),
    )
    data_vars[schema.FORMULA] = ((schema.STRUCTURE,), np.asarray(formulas, dtype=_STRING))
    data_vars[schema.SOURCE] = (
        (schema.STRUCTURE,),
        np.asarray(["synthetic"] * n_structures, dtype=_STRING),
    )
    data_vars[schema.SPACEGROUP] = (
        (schema.STRUCTURE,),
        rng.integers(1, 231, size=n_structures).astype(np.int16),
    )
    data_vars[schema.N_UNIQUE_SITES] = ((schema.STRUCTURE,), n_unique.astype(np.int32))
    data_vars[schema.DMIN] = ((schema.STRUCTURE,), np.asarray(dmins, dtype=np.float32))
    data_vars[schema.SPLIT] = ((schema.STRUCTURE,), split)
    data_vars[schema.REJECT_ID] = ((schema.REJECT,), np.asarray(["bad-1", "bad-2"], dtype=_STRING))
    data_vars[schema.REJECT_REASON] = (
        (schema.REJECT,),
        np.asarray(["occupancy", "r_factor"], dtype=_STRING),
    )
    data_vars[schema.REJECT_MESSAGE] = (
        (schema.REJECT,),
        np.asarray(["site 1 occupancy 0.5 < 0.98", "R = 0.2 >= 0.1"], dtype=_STRING),
    )
    ds = xr.Dataset(data_vars)
    ds.attrs.update(
        {
            "fingerprint": dict(FINGERPRINT_PARAMS),
            "filters": {"r_factor_max": 0.1, "min_occupancy": 0.98, "min_distance": 0.65},
            "draws": int(draws),
            "seed": int(seed),
            "deterministic": False,
            "afpx_version": "synthetic",
            "sources": ["synthetic"],
            "split": {"seed": int(seed), "fractions": {"train": 0.6, "holdout": 0.2, "test": 0.2}},
            "n_read": int(n_structures) + 2,
            "chunk_sites": int(chunk_sites),
            COMPLETE_ATTR: True,
        }
    )
    n_sites = ds.sizes[schema.SITE]
    encoding: dict[str, dict[str, Any]] = {}
    for name, var in ds.data_vars.items():
        if var.dims and var.dims[0] == schema.SITE:
            encoding[str(name)] = {"chunks": (min(chunk_sites, n_sites), *var.shape[1:])}
    ds.to_zarr(path, mode="w", zarr_format=3, consolidated=False, encoding=encoding)
    return path


def mark_complete(path: str | Path) -> None:
    """Set the cube's completion attribute (as a finished build does)."""
    import zarr

    from afpx.cube import COMPLETE_ATTR

    zarr.open_group(path, mode="r+").attrs.update({COMPLETE_ATTR: True})


def true_element_likelihood(z: np.ndarray, *, seed: int) -> np.ndarray:
    """Made-up (site, element) likelihoods: 0.9 for each site's own element, others in [0, 0.3)."""
    rng = np.random.default_rng(seed)
    lk = (0.3 * rng.random((z.size, schema.N_ELEMENTS))).astype(np.float32)
    lk[np.arange(z.size), np.asarray(z, dtype=int) - 1] = 0.9
    return lk


def make_cube_with_likelihoods(path: str | Path) -> Path:
    """A complete synthetic cube (24 structures) whose likelihoods favour the true element.

    The true element gets 0.9, every other element a random value below 0.3,
    and the softmax prediction is the true element.
    """
    path = make_synthetic_cube(path, n_structures=24, seed=3)
    ds = xr.open_zarr(path, consolidated=False)
    z = np.asarray(ds[schema.Z].values).astype(int)
    lk = true_element_likelihood(z, seed=0)
    extra = xr.Dataset(
        {
            schema.LIKELIHOOD: ((schema.SITE, schema.ELEMENT), lk),
            schema.SOFTMAX_PRED: ((schema.SITE,), z.astype(np.int16)),
        }
    )
    extra.to_zarr(path, mode="a", zarr_format=3, consolidated=False)
    mark_complete(path)
    return Path(path)
