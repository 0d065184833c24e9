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

``shell`` (site, 4 + n_bins), for models that read it (``descriptor_input =
"context_shell"``)
    The site's first coordination shell as the other unique sites of the
    template seen from it: over the atoms strictly closer than 1.2 × r0 (the
    atoms counted by ``coordination``), the mean of their sites' ``log r0``,
    ``log (r0_neighbour / r0)``, coordination number and ``log`` share of the
    atoms of the cell, then the mean of their perspective-averaged AFPs. One
    step of message passing over the template's own bonds: an anion learns
    whether its cations sit in octahedra or tetrahedra. Which atom belongs to
    which unique site comes from spglib's crystallographic orbits of the
    stored geometry (:func:`afpx.structures.site_of_atoms`), with the
    tolerances the sites were found with.

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

#: Names of the first columns of ``shell`` (the mean AFP of the shell follows).
SHELL_DESCRIPTORS: Final = (
    "shell_log_r0",
    "shell_log_r0_relative",
    "shell_coordination",
    "shell_log_site_fraction",
)
N_SHELL_DESCRIPTORS: Final = len(SHELL_DESCRIPTORS)

#: Radius of the coordination shell in units of the site's r0 (as ``coordination``).
SHELL_FACTOR: Final = 1.2


#: Cube variables the shell needs besides the per-site ones, in :func:`shell_pairs` order.
SHELL_GEOMETRY: Final = ("site_index", "lattice", "n_atoms", "atom_frac_coords", "atom_z")


def context_width(n_bins: int, *, shell: bool = False) -> int:
    """Columns of :func:`site_context`: descriptors, structure AFP (and the shell)."""
    return N_DESCRIPTORS + n_bins + ((N_SHELL_DESCRIPTORS + n_bins) if shell else 0)


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
    shell_pairs: np.ndarray | None = None,
) -> np.ndarray:
    """Descriptors and structure AFP of every site, side by side (and the shell).

    Parameters
    ----------
    afp_mean : ndarray of shape (n, n_bins)
        Perspective-averaged AFP of each site.
    r0, dmin_ratio, multiplicity, coordination, structure : ndarray of shape (n,)
    draw : ndarray of shape (n,), optional
    shell_pairs : ndarray of shape (n_pairs, 2), int, optional
        ``[site, neighbour's site]`` rows, one per neighbour atom of the
        coordination shell (:func:`shell_pairs`); with it the ``shell`` columns
        are appended.

    Returns
    -------
    ndarray of shape (n, context_width(n_bins, shell=...)) float32
        ``descriptors`` then ``structure_afp`` (then ``shell``); all sites of a
        structure must be present (the context of a partial structure would be
        wrong).

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
    n_bins = np.asarray(afp_mean).shape[-1]
    if len(desc) == 0:
        return np.zeros((0, context_width(n_bins, shell=shell_pairs is not None)), np.float32)
    parts = [desc, structure_afp(afp_mean, multiplicity, group)]
    if shell_pairs is not None:
        parts.append(shell_context(afp_mean, r0, coordination, multiplicity, group, shell_pairs))
    return np.hstack(parts)


def shell_context(
    afp_mean: np.ndarray,
    r0: np.ndarray,
    coordination: np.ndarray,
    multiplicity: np.ndarray,
    group: np.ndarray,
    pairs: np.ndarray,
) -> np.ndarray:
    """The ``shell`` array (see the module docstring): means over each site's shell.

    Parameters
    ----------
    afp_mean : ndarray of shape (n, n_bins)
    r0, coordination, multiplicity : ndarray of shape (n,)
    group : ndarray of shape (n,)
        From :func:`context_groups` (for the share of the atoms of the cell).
    pairs : ndarray of shape (n_pairs, 2), int
        ``[site, neighbour's site]``, one row per neighbour atom (row indices
        into the arrays above, both in the same group).

    Returns
    -------
    ndarray of shape (n, 4 + n_bins) float32
        Zeros for a site without a pair.
    """
    import scipy.sparse as sp

    afp_mean = np.asarray(afp_mean, dtype=np.float64)
    n = afp_mean.shape[0]
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if pairs.size and (pairs.min() < 0 or pairs.max() >= n):
        raise AfpxError(f"shell pairs index sites outside 0..{n - 1}")
    group = np.asarray(group).reshape(-1)
    if pairs.size and np.any(group[pairs[:, 0]] != group[pairs[:, 1]]):
        raise AfpxError("a shell pair joins sites of two different structures or draws")
    r0 = np.asarray(r0, dtype=np.float64).reshape(-1)
    mult = np.asarray(multiplicity, dtype=np.float64).reshape(-1)
    cell_atoms = np.bincount(group, weights=mult)
    per_site = np.stack(
        [
            np.log(r0),
            np.zeros(n),
            np.asarray(coordination, dtype=np.float64).reshape(-1),
            np.log(mult / cell_atoms[group]),
        ],
        axis=1,
    )
    shell = sp.csr_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    size = np.asarray(shell.sum(axis=1)).reshape(-1)
    out = np.hstack([shell @ per_site, shell @ afp_mean]) / np.maximum(size, 1)[:, None]
    has = size > 0
    out[has, 1] = out[has, 0] - np.log(r0[has])  # mean log(r0_neighbour / r0)
    return out.astype(np.float32)


def structure_shell_pairs(
    lattice: np.ndarray,
    frac_coords: np.ndarray,
    numbers: np.ndarray,
    representatives: np.ndarray,
    *,
    symprec: float = 0.01,
    angle_tolerance: float = 5.0,
    factor: float = SHELL_FACTOR,
) -> np.ndarray:
    """Coordination-shell pairs of the unique sites of one structure.

    Parameters
    ----------
    lattice : ndarray of shape (3, 3)
        Lattice vectors as rows (Å).
    frac_coords : ndarray of shape (n_atoms, 3)
    numbers : ndarray of shape (n_atoms,), int
        Atomic numbers (they separate the orbits, as when the sites were found).
    representatives : ndarray of shape (n_unique,), int
        Representative atom of each unique site (``site_index``).
    symprec, angle_tolerance : float
        The tolerances the unique sites were found with.
    factor : float
        Shell radius in units of the site's nearest-neighbour distance.

    Returns
    -------
    ndarray of shape (n_pairs, 2), int64
        ``[unique site, neighbour's unique site]`` (positions in
        ``representatives``), one row per neighbour atom strictly closer than
        ``factor`` × r0, r0 measured on the same geometry.

    Examples
    --------
    Rock salt: each site sees six atoms of the other site.

    >>> from pymatgen.core import Lattice, Structure
    >>> s = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"],
    ...                               [[0, 0, 0], [0.5, 0.5, 0.5]])
    >>> pairs = structure_shell_pairs(s.lattice.matrix, s.frac_coords,
    ...                               s.atomic_numbers, np.array([0, 4]))
    >>> np.bincount(pairs[:, 0] * 2 + pairs[:, 1], minlength=4).tolist()
    [0, 6, 6, 0]
    """
    from afpx.neighbours import nearest_neighbour_distances, neighbour_atoms
    from afpx.structures import site_of_atoms

    reps = np.asarray(representatives, dtype=np.int64).reshape(-1)
    site = site_of_atoms(
        lattice, frac_coords, numbers, reps, symprec=symprec, angle_tolerance=angle_tolerance
    )
    r0 = nearest_neighbour_distances(lattice, frac_coords, reps)
    pairs = neighbour_atoms(lattice, frac_coords, reps, factor * r0)
    return np.stack([pairs[:, 0], site[pairs[:, 1]]], axis=1)


def shell_pairs(
    structure: np.ndarray,
    site_index: np.ndarray,
    draw: np.ndarray | None,
    lattice: np.ndarray,
    n_atoms: np.ndarray,
    atom_frac_coords: np.ndarray,
    atom_z: np.ndarray,
    *,
    symprec: float = 0.01,
    angle_tolerance: float = 5.0,
    factor: float = SHELL_FACTOR,
    block_structures: int = 2048,
) -> np.ndarray:
    """Coordination-shell pairs of every site (row) of a cube, from its stored geometry.

    Parameters
    ----------
    structure, site_index : ndarray of shape (n,), int
        Structure and representative atom of each row.
    draw : ndarray of shape (n,), int, optional
        Augmentation draw of each row; each draw's rows pair among themselves.
    lattice : ndarray of shape (n_structures, 3, 3)
    n_atoms : ndarray of shape (n_structures,), int
        Atoms of each structure's cell (they follow each other along ``atom``).
    atom_frac_coords : ndarray of shape (n_total_atoms, 3)
    atom_z : ndarray of shape (n_total_atoms,), int
    symprec, angle_tolerance, factor
        As for :func:`structure_shell_pairs`.
    block_structures : int
        Structures per Dask task (computed on the current scheduler).

    Returns
    -------
    ndarray of shape (n_pairs, 2), int64
        ``[row, neighbour's row]``.
    """
    import dask

    from afpx.scheduler import compute

    structure = np.asarray(structure, dtype=np.int64).reshape(-1)
    site_index = np.asarray(site_index, dtype=np.int64).reshape(-1)
    draw = (
        np.zeros(structure.shape, np.int64)
        if draw is None
        else np.asarray(draw, dtype=np.int64).reshape(-1)
    )
    n_atoms = np.asarray(n_atoms, dtype=np.int64).reshape(-1)
    atom_start = np.concatenate([[0], np.cumsum(n_atoms)])
    if len(structure) and structure.max() >= len(n_atoms):
        raise AfpxError(
            f"sites refer to structure {int(structure.max())} but the geometry holds "
            f"{len(n_atoms)} structures"
        )
    order = np.lexsort((draw, site_index, structure))
    bounds = np.searchsorted(structure[order], np.arange(len(n_atoms) + 1))
    present = np.flatnonzero(np.diff(bounds))
    blocks = [present[a : a + block_structures] for a in range(0, len(present), block_structures)]

    def block_pairs(ts: np.ndarray) -> np.ndarray:
        out = []
        for t in ts.tolist():
            rows = order[bounds[t] : bounds[t + 1]]
            reps, local = np.unique(site_index[rows], return_inverse=True)
            a0, a1 = atom_start[t], atom_start[t + 1]
            try:
                pairs = structure_shell_pairs(
                    lattice[t],
                    atom_frac_coords[a0:a1],
                    atom_z[a0:a1],
                    reps,
                    symprec=symprec,
                    angle_tolerance=angle_tolerance,
                    factor=factor,
                )
            except AfpxError as exc:
                raise AfpxError(f"structure {t}: {exc}") from exc
            # row of (unique site, draw); a missing draw of a site leaves -1
            draws = np.unique(draw[rows])
            table = np.full((len(reps), len(draws)), -1, dtype=np.int64)
            table[local, np.searchsorted(draws, draw[rows])] = rows
            a, b = table[pairs[:, 0]], table[pairs[:, 1]]
            ok = (a >= 0) & (b >= 0)
            out.append(np.stack([a[ok], b[ok]], axis=1))
        return np.concatenate(out) if out else np.zeros((0, 2), np.int64)

    tasks = [dask.delayed(block_pairs)(ts) for ts in blocks]
    parts = compute(*tasks) if tasks else ()
    return np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)


def context_from_store(group: Any, *, shell: bool = False, block_sites: int = 16384) -> np.ndarray:
    """:func:`site_context` of every site of a cube's zarr group.

    Reads ``afp`` once, block by block (memory bounded by ``block_sites``), and
    the small per-site arrays; with ``shell``, the template geometry too.

    Parameters
    ----------
    group : zarr.Group
        An opened cube store (``afp``, ``r0``, ``dmin_ratio``, ``multiplicity``,
        ``coordination``, ``structure``; ``draw`` optional; with ``shell``,
        ``site_index``, ``lattice``, ``n_atoms``, ``atom_frac_coords``, ``atom_z``).
    shell : bool
        Append the coordination-shell columns.
    block_sites : int
        Sites read at a time.

    Returns
    -------
    ndarray of shape (n_sites, context_width(n_bins, shell=shell)) float32
    """
    from afpx import schema

    need = [
        schema.AFP,
        schema.R0,
        schema.DMIN_RATIO,
        schema.MULTIPLICITY,
        schema.COORDINATION,
        schema.STRUCTURE_INDEX,
    ]
    if shell:
        need += list(SHELL_GEOMETRY)
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
    structure = np.asarray(group[schema.STRUCTURE_INDEX][:])
    pairs = stored_shell_pairs(group, structure, draw) if shell else None
    return site_context(
        afp_mean,
        np.asarray(group[schema.R0][:]),
        np.asarray(group[schema.DMIN_RATIO][:]),
        np.asarray(group[schema.MULTIPLICITY][:]),
        np.asarray(group[schema.COORDINATION][:]),
        structure,
        draw,
        pairs,
    )


def stored_shell_pairs(cube: Any, structure: np.ndarray, draw: np.ndarray | None) -> np.ndarray:
    """:func:`shell_pairs` of a cube, from its stored geometry and symmetry tolerances.

    Parameters
    ----------
    cube : zarr.Group or xarray.Dataset
        Holding :data:`SHELL_GEOMETRY` (checked by the caller) and the
        ``filters`` attribute the sites were found with.
    structure, draw : ndarray of shape (n,)
        Structure and draw of each site (``draw`` may be None).

    Returns
    -------
    ndarray of shape (n_pairs, 2), int64
    """
    filters = dict(cube.attrs.get("filters", {}))
    site_index, lattice, n_atoms, frac, numbers = (np.asarray(cube[n]) for n in SHELL_GEOMETRY)
    return shell_pairs(
        structure,
        site_index,
        draw,
        lattice,
        n_atoms,
        frac,
        numbers,
        symprec=float(filters.get("symprec", 0.01)),
        angle_tolerance=float(filters.get("angle_tolerance", 5.0)),
    )
