"""Template context of a site: what the rest of its structure looks like, element-blind.

The AFP describes the geometry around one site. Which element sits there also
depends on the site's place in its structure: a site holding half of the atoms
of the cell is rarely a transition metal, and the fingerprints of the *other*
sites say whether the structure looks like an oxide framework or an
intermetallic. Every quantity here is geometry of the template (multiplicities,
nearest-neighbour distances, fingerprints), never an element, so a template
keeps the same context whatever elements are placed on it, and site
likelihoods stay a fixed (site, element) array.

Two arrays per site, computed from the per-site variables of a cube (or of
:func:`afpx.cube.fingerprint_structures`) by :func:`site_context`:

``descriptors`` (site, 10)
    ``log r0``, ``dmin_ratio``, ``log`` of the site's share of the atoms of
    the cell, ``log`` multiplicity, ``log`` number of unique sites, ``log``
    number of atoms in the cell, ``log (r0 / r̄0)`` (r̄0 the
    multiplicity-weighted mean r0 of the structure), ``log`` of the smallest
    and of the largest r0 of the structure, and the coordination number.
``structure_afp`` (site, 256)
    The multiplicity-weighted mean over the structure's sites of their
    perspective-averaged AFP: a fingerprint of the whole template.

Sites are grouped by ``(structure, draw)``, so each augmentation draw of a
structure has its own context. This module is numpy only (no torch): training
and inference compute the context with the same function.
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np

from afpx import AfpxError

#: Names of the columns of ``descriptors``, in order.
DESCRIPTORS: Final = (
    "log_r0",
    "dmin_ratio",
    "log_site_fraction",
    "log_multiplicity",
    "log_unique_sites",
    "log_cell_atoms",
    "log_r0_relative",
    "log_r0_min",
    "log_r0_max",
    "coordination",
)
N_DESCRIPTORS: Final = len(DESCRIPTORS)


def context_groups(structure: np.ndarray, draw: np.ndarray | None = None) -> np.ndarray:
    """Dense group index of each site: one group per ``(structure, draw)``.

    Parameters
    ----------
    structure : ndarray of shape (n,), int
        Structure index of each site.
    draw : ndarray of shape (n,), int, optional
        Augmentation draw of each site (all 0 when None).

    Returns
    -------
    ndarray of shape (n,) int64
        Group ids 0..n_groups-1.
    """
    structure = np.asarray(structure, dtype=np.int64).reshape(-1)
    d = np.zeros_like(structure) if draw is None else np.asarray(draw, dtype=np.int64).reshape(-1)
    if d.shape != structure.shape:
        raise AfpxError(f"structure and draw differ in length: {structure.size} vs {d.size}")
    if structure.size == 0:
        return structure
    key = structure * (int(d.max()) + 1) + d
    return np.unique(key, return_inverse=True)[1].astype(np.int64)


def group_mean(values: np.ndarray, weights: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Weighted mean of ``values`` within each group, broadcast back to the sites.

    Parameters
    ----------
    values : ndarray of shape (n, k)
    weights : ndarray of shape (n,)
        Non-negative weights (multiplicities); every group needs a positive sum.
    group : ndarray of shape (n,)
        From :func:`context_groups`.

    Returns
    -------
    ndarray of shape (n, k) float64
    """
    values = np.asarray(values, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    n_groups = int(group.max()) + 1 if group.size else 0
    total = np.bincount(group, weights=w, minlength=n_groups)
    if np.any(total <= 0):
        raise AfpxError("every structure needs a positive total multiplicity")
    sums = np.zeros((n_groups, values.shape[1]))
    np.add.at(sums, group, values * w[:, None])
    return (sums / total[:, None])[group]


def site_descriptors(
    r0: np.ndarray,
    dmin_ratio: np.ndarray,
    multiplicity: np.ndarray,
    coordination: np.ndarray,
    group: np.ndarray,
) -> np.ndarray:
    """The ``descriptors`` array (see the module docstring).

    Parameters
    ----------
    r0, dmin_ratio : ndarray of shape (n,)
        Nearest-neighbour distance (Å, positive) and dmin / r0 of each site.
    multiplicity, coordination : ndarray of shape (n,)
        Site multiplicity in the cell (≥ 1) and coordination number.
    group : ndarray of shape (n,)
        From :func:`context_groups`.

    Returns
    -------
    ndarray of shape (n, 10) float32
    """
    r0 = np.asarray(r0, dtype=np.float64).reshape(-1)
    mult = np.asarray(multiplicity, dtype=np.float64).reshape(-1)
    arrays = (dmin_ratio, multiplicity, coordination, group)
    if any(np.asarray(a).reshape(-1).shape != r0.shape for a in arrays):
        raise AfpxError("r0, dmin_ratio, multiplicity, coordination and group differ in length")
    if r0.size and (not np.all(r0 > 0) or not np.all(mult >= 1)):
        raise AfpxError("context needs r0 > 0 and multiplicity >= 1 on every site")
    if r0.size == 0:
        return np.zeros((0, N_DESCRIPTORS), np.float32)
    n_groups = int(group.max()) + 1
    cell_atoms = np.bincount(group, weights=mult, minlength=n_groups)
    unique_sites = np.bincount(group, minlength=n_groups).astype(np.float64)
    log_r0 = np.log(r0)
    mean_r0 = group_mean(r0[:, None], mult, group)[:, 0]
    r0_min = np.full(n_groups, np.inf)
    np.minimum.at(r0_min, group, r0)
    r0_max = np.zeros(n_groups)
    np.maximum.at(r0_max, group, r0)
    cols = [
        log_r0,
        np.asarray(dmin_ratio, dtype=np.float64).reshape(-1),
        np.log(mult / cell_atoms[group]),
        np.log(mult),
        np.log(unique_sites[group]),
        np.log(cell_atoms[group]),
        log_r0 - np.log(mean_r0),
        np.log(r0_min[group]),
        np.log(r0_max[group]),
        np.asarray(coordination, dtype=np.float64).reshape(-1),
    ]
    return np.stack(cols, axis=1).astype(np.float32)


def structure_afp(afp_mean: np.ndarray, multiplicity: np.ndarray, group: np.ndarray) -> np.ndarray:
    """The ``structure_afp`` array: the multiplicity-weighted mean AFP of each site's structure.

    Parameters
    ----------
    afp_mean : ndarray of shape (n, n_bins)
        Perspective-averaged AFP of each site.
    multiplicity : ndarray of shape (n,)
    group : ndarray of shape (n,)
        From :func:`context_groups`.

    Returns
    -------
    ndarray of shape (n, n_bins) float32
    """
    afp_mean = np.asarray(afp_mean)
    if afp_mean.ndim != 2 or afp_mean.shape[0] != np.asarray(group).size:
        raise AfpxError(
            f"afp_mean must be (n_sites, n_bins) with one row per site, got {afp_mean.shape}"
        )
    return group_mean(afp_mean, multiplicity, group).astype(np.float32)


def site_context(
    afp_mean: np.ndarray,
    r0: np.ndarray,
    dmin_ratio: np.ndarray,
    multiplicity: np.ndarray,
    coordination: np.ndarray,
    structure: np.ndarray,
    draw: np.ndarray | None = None,
) -> np.ndarray:
    """Descriptors and structure AFP of every site, side by side.

    Parameters
    ----------
    afp_mean : ndarray of shape (n, n_bins)
        Perspective-averaged AFP of each site.
    r0, dmin_ratio, multiplicity, coordination, structure : ndarray of shape (n,)
    draw : ndarray of shape (n,), optional

    Returns
    -------
    ndarray of shape (n, 10 + n_bins) float32
        ``descriptors`` then ``structure_afp``; all sites of a structure must
        be present (the context of a partial structure would be wrong).

    Examples
    --------
    Two sites of one rock-salt-like structure share their structure AFP:

    >>> import numpy as np
    >>> ctx = site_context(
    ...     np.ones((2, 4)), np.array([2.8, 2.8]), np.ones(2), np.array([4, 4]),
    ...     np.array([6, 6]), np.array([0, 0]))
    >>> ctx.shape, float(np.exp(ctx[0, 2]))
    ((2, 14), 0.5)
    """
    group = context_groups(structure, draw)
    desc = site_descriptors(r0, dmin_ratio, multiplicity, coordination, group)
    if len(desc) == 0:
        return np.zeros((0, N_DESCRIPTORS + np.asarray(afp_mean).shape[-1]), np.float32)
    return np.hstack([desc, structure_afp(afp_mean, multiplicity, group)])


def context_from_store(group: Any, *, block_sites: int = 16384) -> np.ndarray:
    """:func:`site_context` of every site of a cube's zarr group.

    Reads ``afp`` once, block by block (memory bounded by ``block_sites``), and
    the small per-site arrays.

    Parameters
    ----------
    group : zarr.Group
        An opened cube store (``afp``, ``r0``, ``dmin_ratio``, ``multiplicity``,
        ``coordination``, ``structure``; ``draw`` optional).
    block_sites : int
        Sites read at a time.

    Returns
    -------
    ndarray of shape (n_sites, 10 + n_bins) float32
    """
    from afpx import schema

    need = (
        schema.AFP,
        schema.R0,
        schema.DMIN_RATIO,
        schema.MULTIPLICITY,
        schema.COORDINATION,
        schema.STRUCTURE_INDEX,
    )
    missing = [name for name in need if name not in group]
    if missing:
        raise AfpxError(
            f"the template context needs {', '.join(missing)}, which the cube lacks; "
            "rebuild it with `afpx build-cube`"
        )
    afp = group[schema.AFP]
    n = int(afp.shape[0])
    afp_mean = np.empty((n, int(afp.shape[2])), np.float32)
    for a in range(0, n, block_sites):
        afp_mean[a : a + block_sites] = np.asarray(afp[a : a + block_sites]).mean(axis=1)
    draw = np.asarray(group[schema.DRAW][:]) if schema.DRAW in group else None
    return site_context(
        afp_mean,
        np.asarray(group[schema.R0][:]),
        np.asarray(group[schema.DMIN_RATIO][:]),
        np.asarray(group[schema.MULTIPLICITY][:]),
        np.asarray(group[schema.COORDINATION][:]),
        np.asarray(group[schema.STRUCTURE_INDEX][:]),
        draw,
    )
