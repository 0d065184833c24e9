"""Periodic neighbour shells of unique sites, as flat arrays.

Arrays in, arrays out: a lattice (rows are the lattice vectors, Å), fractional
coordinates and the atom indices of the sites of interest ("centres"). The
search itself is pymatgen's C routine
:func:`pymatgen.optimization.neighbors.find_points_in_spheres`, the engine
behind ``Structure.get_neighbor_list``, called directly to skip building
pymatgen objects.

Every function excludes the centre atom itself (distance below ``tol``) but
keeps its periodic images, which are genuine neighbours.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from afpx import AfpxError

#: Distances below this (Å) are the centre itself.
SELF_TOLERANCE = 1e-8

_PBC = np.ones(3, dtype=np.int64)
#: Centres whose query radii differ by less than this factor share one query.
RADIUS_GROUP_RATIO = 1.25


def _find(cart: np.ndarray, centres: np.ndarray, radius: float, lattice: np.ndarray) -> Any:
    from pymatgen.optimization.neighbors import find_points_in_spheres

    return find_points_in_spheres(cart, centres, float(radius), _PBC, lattice, tol=SELF_TOLERANCE)


def _prepare(lattice: Any, frac_coords: Any) -> tuple[np.ndarray, np.ndarray]:
    lat = np.ascontiguousarray(lattice, dtype=np.float64)
    frac = np.asarray(frac_coords, dtype=np.float64)
    if lat.shape != (3, 3) or frac.ndim != 2 or frac.shape[1] != 3 or len(frac) == 0:
        raise AfpxError(
            f"expected a (3, 3) lattice and (n, 3) fractional coordinates, got "
            f"{lat.shape} and {frac.shape}"
        )
    volume = abs(float(np.linalg.det(lat)))
    if not np.all(np.isfinite(lat)) or not np.all(np.isfinite(frac)) or volume < 1e-6:
        raise AfpxError(f"degenerate cell (volume {volume:.3g} Å³) or non-finite coordinates")
    cart = np.ascontiguousarray((frac - np.floor(frac)) @ lat)
    return lat, cart


def nearest_neighbour_distances(lattice: Any, frac_coords: Any, centres: Any) -> np.ndarray:
    """Distance from each centre atom to its nearest neighbour (``r0``).

    A first query reaches 1.5 × the cube root of the volume per atom (a few
    shells in any solid) and widens by 1.5× for centres that found nothing.

    Parameters
    ----------
    lattice : array_like of shape (3, 3)
        Lattice vectors as rows (Å).
    frac_coords : array_like of shape (n_atoms, 3)
        Fractional coordinates of every atom of the cell.
    centres : array_like of shape (n_centres,), int
        Atom indices of the sites.

    Returns
    -------
    ndarray of shape (n_centres,), float64
        ``r0`` in Å.
    """
    lat, cart = _prepare(lattice, frac_coords)
    idx = np.asarray(centres, dtype=np.int64)
    r0 = np.full(len(idx), np.inf)
    radius = 1.5 * (abs(np.linalg.det(lat)) / len(cart)) ** (1.0 / 3.0)
    todo = np.arange(len(idx))
    while len(todo):
        c, _, _, dist = _find(cart, np.ascontiguousarray(cart[idx[todo]]), radius, lat)
        keep = dist > SELF_TOLERANCE
        np.minimum.at(r0, todo[c[keep]], dist[keep])
        todo = todo[~np.isfinite(r0[todo])]
        radius *= 1.5
    return r0


def neighbour_shells(
    lattice: Any, frac_coords: Any, centres: Any, radii: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Displacements to every neighbour within a radius of each centre.

    Centres whose radii lie within :data:`RADIUS_GROUP_RATIO` of each other
    share one query at the largest of their radii (the search's set-up cost is
    paid once), and each keeps only its own neighbours.

    Parameters
    ----------
    lattice : array_like of shape (3, 3)
        Lattice vectors as rows (Å).
    frac_coords : array_like of shape (n_atoms, 3)
        Fractional coordinates of every atom of the cell.
    centres : array_like of shape (n_centres,), int
        Atom indices of the sites.
    radii : array_like of shape (n_centres,)
        Query radius of each centre (Å); a neighbour at distance ``<= radius``
        is kept.

    Returns
    -------
    vectors : ndarray of shape (n_pairs, 3), float64
        Neighbour minus centre (Å), grouped by centre in the order given;
        within a centre ordered by periodic image, then atom index.
    counts : ndarray of shape (n_centres,), int64
        Neighbours of each centre.
    """
    lat, cart = _prepare(lattice, frac_coords)
    idx = np.asarray(centres, dtype=np.int64)
    radii = np.broadcast_to(np.asarray(radii, dtype=np.float64), idx.shape)
    n_atoms = len(cart)
    by_radius = np.argsort(radii, kind="stable")
    owners, points, images = [], [], []
    first = 0
    while first < len(idx):
        last = first + 1
        while (
            last < len(idx)
            and radii[by_radius[last]] <= radii[by_radius[first]] * RADIUS_GROUP_RATIO
        ):
            last += 1
        group = by_radius[first:last]
        c, p, img, dist = _find(cart, np.ascontiguousarray(cart[idx[group]]), radii[group[-1]], lat)
        keep = (dist > SELF_TOLERANCE) & (dist <= radii[group][c])
        owners.append(group[c[keep]])
        points.append(p[keep])
        images.append(img[keep])
        first = last
    owner = np.concatenate(owners) if owners else np.zeros(0, dtype=np.int64)
    point = np.concatenate(points) if points else np.zeros(0, dtype=np.int64)
    image = np.concatenate(images) if images else np.zeros((0, 3))
    # a canonical order (centre, then periodic image, then atom) whatever the search's
    # internals, so that the jitter drawn for the k-th neighbour always hits the same atom
    columns = np.ascontiguousarray(image.T)  # (3, n_pairs): contiguous passes below
    order = _canonical_order(owner, columns.astype(np.int64), point, len(idx), n_atoms)
    owner, point, columns = owner[order], point[order], columns[:, order]
    # elementwise on contiguous columns, not BLAS: a pair's vector must not depend on
    # the other pairs (BLAS blocking could make it)
    cart_t = np.ascontiguousarray(cart.T)
    centre_atom = idx[owner]
    vectors = np.empty((len(point), 3))
    for j in range(3):
        v = cart_t[j][point] - cart_t[j][centre_atom]
        v += columns[0] * lat[0, j] + columns[1] * lat[1, j] + columns[2] * lat[2, j]
        vectors[:, j] = v
    counts = np.bincount(owner, minlength=len(idx)).astype(np.int64)
    return vectors, counts


def _canonical_order(
    owner: np.ndarray, image: np.ndarray, point: np.ndarray, n_centres: int, n_atoms: int
) -> np.ndarray:
    """Permutation sorting pairs by (centre, image x, image y, image z, atom).

    ``image`` has shape (3, n_pairs).
    """
    if len(owner) == 0:
        return np.zeros(0, dtype=np.int64)
    lo = image.min(axis=1)
    span = image.max(axis=1) - lo + 1
    total = int(span[0]) * int(span[1]) * int(span[2]) * n_atoms
    if total * n_centres < 2**62:
        # one int64 key: a plain argsort is several times faster than lexsort
        key = (image[0] - lo[0]) * span[1]
        key += image[1] - lo[1]
        key *= span[2]
        key += image[2] - lo[2]
        key *= n_atoms
        key += point
        key += owner * total
        return np.argsort(key)  # keys are unique, so the order is fully determined
    return np.lexsort((point, image[2], image[1], image[0], owner))


def count_within(vectors: Any, counts: Any, radii: Any) -> np.ndarray:
    """Number of neighbours of each centre strictly closer than its radius.

    Parameters
    ----------
    vectors : ndarray of shape (n_pairs, 3)
        Displacements grouped by centre (as from :func:`neighbour_shells`).
    counts : ndarray of shape (n_centres,), int
    radii : array_like of shape (n_centres,)

    Returns
    -------
    ndarray of shape (n_centres,), int64
    """
    counts = np.asarray(counts, dtype=np.int64)
    owner = np.repeat(np.arange(len(counts)), counts)
    radii = np.broadcast_to(np.asarray(radii, dtype=np.float64), counts.shape)
    inside = np.linalg.norm(vectors, axis=1) < radii[owner]
    return np.bincount(owner[inside], minlength=len(counts)).astype(np.int64)


def neighbour_atoms(lattice: Any, frac_coords: Any, centres: Any, radii: Any) -> np.ndarray:
    """Atoms strictly closer to each centre than its radius, as (centre, atom) pairs.

    The same shell as :func:`count_within` (distance ``< radius``, the centre
    itself excluded, periodic images included, each image once).

    Parameters
    ----------
    lattice : array_like of shape (3, 3)
        Lattice vectors as rows (Å).
    frac_coords : array_like of shape (n_atoms, 3)
    centres : array_like of shape (n_centres,), int
        Atom indices of the centres.
    radii : array_like of shape (n_centres,)
        Radius of each centre's shell (Å).

    Returns
    -------
    ndarray of shape (n_pairs, 2), int64
        ``[position in centres, neighbour atom index]``, sorted.

    Examples
    --------
    Rock salt: six chlorines within 1.2 × 2.82 Å of the sodium.

    >>> import numpy as np
    >>> lattice = 5.64 * np.eye(3)
    >>> frac = [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5],
    ...         [0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5], [0.5, 0.5, 0.5]]
    >>> pairs = neighbour_atoms(lattice, frac, [0], [1.2 * 2.82])
    >>> len(pairs), sorted(set(pairs[:, 1].tolist()))
    (6, [4, 5, 6])
    """
    lat, cart = _prepare(lattice, frac_coords)
    idx = np.asarray(centres, dtype=np.int64).reshape(-1)
    radii = np.broadcast_to(np.asarray(radii, dtype=np.float64), idx.shape)
    if idx.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    if not np.all(np.isfinite(radii)) or np.any(radii <= 0):
        raise AfpxError(f"shell radii must be positive and finite, got {radii.tolist()}")
    c, p, _, dist = _find(cart, np.ascontiguousarray(cart[idx]), float(radii.max()), lat)
    keep = (dist > SELF_TOLERANCE) & (dist < radii[c])
    pairs = np.stack([np.asarray(c, np.int64)[keep], np.asarray(p, np.int64)[keep]], axis=1)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
