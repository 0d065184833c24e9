"""Builders and oracles for the template / ranking / default-library tests."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from afpx import schema
from afpx.templates import TemplateLibrary

MN, GE, LI, OX, SR, ZR = 25, 32, 3, 8, 38, 40


def library_from_sites(
    templates: Sequence[Sequence[tuple[int, int, dict[int, float]]]],
    *,
    formulas: Sequence[str] | None = None,
    sources: Sequence[str] | None = None,
    default: float = 1e-3,
) -> TemplateLibrary:
    """A library from lists of sites ``(multiplicity, true Z, {Z: likelihood})``.

    Elements not named on a site get likelihood ``default``.
    """
    site_template, mult, zs, rows = [], [], [], []
    for t, sites in enumerate(templates):
        for m, z, lik in sites:
            site_template.append(t)
            mult.append(m)
            zs.append(z)
            row = np.full(schema.N_ELEMENTS, default, dtype=np.float32)
            for el, p in lik.items():
                row[el - 1] = p
            rows.append(row)
    n = len(templates)
    lib = TemplateLibrary(
        site_template=np.asarray(site_template, dtype=np.int64),
        multiplicity=np.asarray(mult, dtype=np.int32),
        z=np.asarray(zs, dtype=np.int16),
        log_likelihood=np.log(np.asarray(rows, dtype=np.float32)),
        structure_id=np.asarray([f"t{i}" for i in range(n)], dtype=object),
        formula=np.asarray(formulas or ["X"] * n, dtype=object),
        spacegroup=np.arange(1, n + 1, dtype=np.int64),
        source=np.asarray(sources or ["hand"] * n, dtype=object),
    )
    return lib


def hand_library() -> TemplateLibrary:
    """Four Mn-Ge templates whose scores are worked out by hand (see test_rank.py)."""
    return library_from_sites(
        [
            [(2, MN, {MN: 0.9, GE: 0.1}), (4, GE, {MN: 0.2, GE: 0.8})],
            [(1, MN, {MN: 0.5, GE: 0.5}), (1, GE, {MN: 0.5, GE: 0.5})],
            [(2, MN, {MN: 0.4, GE: 0.6}), (4, GE, {MN: 0.4, GE: 0.6})],
            [(1, MN, {MN: 0.5, GE: 0.5}), (3, GE, {MN: 0.5, GE: 0.5})],
        ],
        formulas=["MnGe2", "MnGe", "MnGe2", "MnGe3"],
    )


def random_library(
    rng: np.random.Generator,
    n_templates: int,
    *,
    max_sites: int = 6,
    multiplicities: Sequence[int] = (1, 2, 3, 4, 6, 8, 12),
    ties: bool = False,
) -> TemplateLibrary:
    """Random templates and likelihoods; ``ties`` draws likelihoods from a few values."""
    n = rng.integers(1, max_sites + 1, n_templates)
    site_template = np.repeat(np.arange(n_templates), n)
    mult = rng.choice(np.asarray(multiplicities), site_template.size).astype(np.int32)
    if ties:
        lik = rng.choice(np.asarray([0.25, 0.5, 1.0], dtype=np.float32), (site_template.size, 118))
    else:
        lik = rng.random((site_template.size, 118), dtype=np.float32) * 0.999 + 0.001
    return TemplateLibrary(
        site_template=site_template,
        multiplicity=mult,
        z=rng.integers(1, 119, site_template.size).astype(np.int16),
        log_likelihood=np.log(lik).astype(np.float32),
        structure_id=np.asarray([f"r{i}" for i in range(n_templates)], dtype=object),
        formula=np.asarray(["X"] * n_templates, dtype=object),
        spacegroup=np.ones(n_templates, dtype=np.int64),
        source=np.asarray(["random"] * n_templates, dtype=object),
    )


def naive_candidates(
    lib: TemplateLibrary,
    elements: Sequence[int],
    *,
    min_site_likelihood: float | None = None,
    max_assignments: int = 5000,
) -> dict[tuple[int, tuple[int, ...]], float]:
    """Best log-score per (template, cell counts) by plain enumeration."""
    k = len(elements)
    L = lib.log_likelihood[:, np.asarray(elements) - 1].astype(np.float64)
    if min_site_likelihood is not None:
        L[np.log(min_site_likelihood) > L] = -np.inf
    out: dict[tuple[int, tuple[int, ...]], float] = {}
    for t in range(lib.n_templates):
        a, b = int(lib.site_start[t]), int(lib.site_start[t + 1])
        if k ** (b - a) > max_assignments:
            continue
        for assign in itertools.product(range(k), repeat=b - a):
            if len(set(assign)) < k:
                continue
            counts = [0] * k
            score = 0.0
            for s, e in enumerate(assign):
                counts[e] += int(lib.multiplicity[a + s])
                score += L[a + s, e]
            if not np.isfinite(score):
                continue
            key = (t, tuple(counts))
            if key not in out or score > out[key]:
                out[key] = score
    return out


def candidate_dict(ds: Any) -> dict[tuple[int, tuple[int, ...]], float]:
    return {
        (int(t), tuple(int(c) for c in counts)): float(s)
        for t, counts, s in zip(
            ds["template"].values, ds["counts"].values, ds["log_score"].values, strict=True
        )
    }


def cube_with_likelihood(
    path: Path,
    *,
    n_structures: int = 30,
    draws: int = 1,
    seed: int = 0,
    mean: bool = False,
    likelihood: bool = True,
) -> Path:
    """The synthetic cube of ``tests/_cube_helpers`` plus a made-up ``likelihood``.

    The likelihood of the true element of a site is 0.9, the others drawn
    in (0, 0.3); with ``mean`` also ``likelihood_mean`` (mean over the draws
    of each unique site), as the likelihood writer stores it.
    """
    import xarray as xr
    from _cube_helpers import make_synthetic_cube, true_element_likelihood

    raw = make_synthetic_cube(
        path.with_name(path.name + ".raw"), n_structures=n_structures, draws=draws, seed=seed
    )
    ds = xr.open_zarr(raw, consolidated=False).load()
    if likelihood:
        lik = true_element_likelihood(ds[schema.Z].values, seed=seed)
        coords = schema.element_coords()
        ds = ds.assign_coords(coords)
        ds[schema.LIKELIHOOD] = ((schema.SITE, schema.ELEMENT), lik)
        if mean:
            key = ds[schema.STRUCTURE_INDEX].values * 1000 + ds[schema.SITE_INDEX].values
            _, inv = np.unique(key, return_inverse=True)
            sums = np.zeros((inv.max() + 1, schema.N_ELEMENTS))
            np.add.at(sums, inv, lik)
            cnt = np.bincount(inv)
            ds[schema.LIKELIHOOD_MEAN] = (
                (schema.SITE, schema.ELEMENT),
                (sums[inv] / cnt[inv, None]).astype(np.float32),
            )
    for name in list(ds.variables):
        ds[name].encoding = {}
    ds.to_zarr(path, mode="w", zarr_format=3, consolidated=False)
    return path
