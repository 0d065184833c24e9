"""Reusable physics assertions about atomic fingerprints (in the spirit of dscribe's).

Each ``assert_*`` takes pymatgen structures, computes deterministic AFPs
(no rotation, no jitter) with :func:`afpx.cube.fingerprint_structures` or
:func:`atom_fingerprints`, and fails with a message naming the structure and
the size of the disagreement. Any fingerprint implementation with the same
signature can be checked by passing ``fingerprint=``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
from pymatgen.core import Lattice, Structure
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

from afpx.kernels import FingerprintParams, afp_kernel, output_positions
from afpx.neighbours import count_within, nearest_neighbour_distances, neighbour_shells

#: Fingerprints of the same environment computed from different cells differ only
#: by float32 rounding of the FFT (~1e-6 of the largest value).
ATOL = 1e-4

Fingerprint = Callable[[Structure, Sequence[int]], np.ndarray]


def atom_fingerprints(
    structure: Structure, atoms: Sequence[int], *, params: FingerprintParams | None = None
) -> np.ndarray:
    """Deterministic AFPs of chosen atoms (not only unique sites).

    Returns
    -------
    ndarray of shape (len(atoms), n_perspectives, n_bins), float32
    """
    params = params or FingerprintParams()
    lattice, frac = structure.lattice.matrix, structure.frac_coords
    r0 = nearest_neighbour_distances(lattice, frac, atoms)
    radii = [params.query_radius(r, deterministic=True) for r in r0]
    vectors, counts = neighbour_shells(lattice, frac, atoms, radii)
    return np.asarray(afp_kernel(vectors, counts, r0, params=params))


def coordination(structure: Structure, atoms: Sequence[int], factor: float = 1.2) -> np.ndarray:
    """Neighbours within ``factor × r0`` of each atom."""
    lattice, frac = structure.lattice.matrix, structure.frac_coords
    r0 = nearest_neighbour_distances(lattice, frac, atoms)
    vectors, counts = neighbour_shells(lattice, frac, atoms, factor * r0 * 1.001)
    return count_within(vectors, counts, factor * r0)


def _close(a: np.ndarray, b: np.ndarray, what: str, atol: float = ATOL) -> None:
    diff = float(np.max(np.abs(np.asarray(a, float) - np.asarray(b, float))))
    assert diff <= atol * max(1.0, float(np.max(np.abs(a)))), f"{what}: max difference {diff:.3g}"


def assert_translation_invariant(
    structure: Structure,
    *,
    shift: Sequence[float] = (0.137, 0.291, 0.413),
    fingerprint: Fingerprint = atom_fingerprints,
) -> None:
    """Moving every atom by the same vector changes no fingerprint."""
    moved = structure.copy()
    moved.translate_sites(list(range(len(moved))), shift, frac_coords=True, to_unit_cell=True)
    atoms = list(range(len(structure)))
    _close(
        fingerprint(structure, atoms),
        fingerprint(moved, atoms),
        f"translation of {structure.formula}",
    )


def assert_supercell_invariant(
    structure: Structure,
    *,
    scaling: Sequence[int] = (2, 1, 1),
    fingerprint: Fingerprint = atom_fingerprints,
) -> None:
    """An atom has the same fingerprint in a supercell (same Cartesian frame)."""
    big = structure * scaling
    atoms = list(range(len(structure)))
    _close(
        fingerprint(structure, atoms),
        fingerprint(big, [_same_atom(big, site.coords) for site in structure]),
        f"supercell {tuple(scaling)} of {structure.formula}",
    )


def _same_atom(structure: Structure, cart: np.ndarray) -> int:
    """Index of the atom of ``structure`` at Cartesian position ``cart`` (modulo the lattice)."""
    frac = structure.lattice.get_fractional_coords(cart)
    delta = structure.frac_coords - frac
    delta -= np.round(delta)
    return int(np.argmin(np.linalg.norm(delta @ structure.lattice.matrix, axis=1)))


def assert_scale_invariant(
    a: Structure, b: Structure, *, fingerprint: Fingerprint = atom_fingerprints
) -> None:
    """Two structures of one type at different scales have equal fingerprints (R / r0)."""
    atoms = list(range(len(a)))
    _close(fingerprint(a, atoms), fingerprint(b, atoms), f"{a.formula} against {b.formula}")


def assert_equivalent_sites_agree(
    structure: Structure,
    *,
    fingerprint: Fingerprint = atom_fingerprints,
    up_to_perspective_order: bool = False,
) -> None:
    """Symmetry-equivalent atoms have the same fingerprint.

    Atoms related by a lattice translation (centring) give identical
    perspectives. Atoms related by a rotation that maps the reference
    tetrahedron onto itself (cubic 2- and 3-fold axes) give the same
    perspectives in another order: pass ``up_to_perspective_order=True``,
    which compares the perspectives of each tetrahedron as sorted sets.
    """
    with warnings.catch_warnings():
        # pymatgen runs spglib in its deprecated error mode, which spglib warns about
        warnings.filterwarnings("ignore", "Set OLD_ERROR_HANDLING", DeprecationWarning)
        analyzer = SpacegroupAnalyzer(structure, symprec=0.01)
        equivalent = analyzer.get_symmetry_dataset().equivalent_atoms
    atoms = list(range(len(structure)))
    afp = fingerprint(structure, atoms)
    if up_to_perspective_order:
        afp = _sorted_perspectives(afp)
    for orbit in np.unique(equivalent):
        members = np.flatnonzero(equivalent == orbit)
        for m in members[1:]:
            _close(afp[members[0]], afp[m], f"{structure.formula}: atoms {members[0]} and {m}")


def _sorted_perspectives(afp: np.ndarray) -> np.ndarray:
    n_sites, n_p, n_bins = afp.shape
    groups = afp.reshape(n_sites, n_p // 4, 4, n_bins)
    # order the 4 vertices of each tetrahedron by their weighted centre of mass
    key = (groups * np.arange(n_bins)).sum(-1) / groups.sum(-1)
    order = np.argsort(key, axis=-1)
    return np.take_along_axis(groups, order[..., None], axis=2).reshape(afp.shape)


def first_peaks(afp: np.ndarray, params: FingerprintParams | None = None) -> np.ndarray:
    """R (units of r0) of the first local maximum of every perspective.

    Maxima lower than half the peak of one isolated neighbour are ignored
    (float32 noise of the FFT far from any neighbour).

    Parameters
    ----------
    afp : ndarray of shape (..., n_bins)

    Returns
    -------
    ndarray of shape afp.shape[:-1]
    """
    params = params or FingerprintParams()
    r = output_positions(params)
    w = np.kaiser(params.kaiser_width, params.kaiser_beta)
    one_neighbour = params.downsample * w.max() / w.sum()
    x = np.asarray(afp, dtype=float)
    inner = x[..., 1:-1]
    is_peak = (inner > x[..., :-2]) & (inner >= x[..., 2:]) & (inner > 0.5 * one_neighbour)
    first = np.argmax(is_peak, axis=-1) + 1
    return r[first]


def assert_first_peak_near_one(
    afp: np.ndarray, params: FingerprintParams | None = None, *, what: str = ""
) -> None:
    """The first peak of every perspective lies at R ≈ 1, within the perspective offsets.

    From an origin at distance ``d · r0`` off the site, the nearest neighbour
    is between ``1 - d`` and ``1 + d``; one output bin of slack for sampling.
    Holds when the first shell shows as a maximum of its own: a shell of one or
    two atoms followed closely (~4 window σ) by a shell of 12 (the O of a
    cubic perovskite) is only a shoulder.
    """
    params = params or FingerprintParams()
    peaks = first_peaks(afp, params)
    slack = max(params.perspective_distances) + params.r_max / params.n_bins
    bad = np.abs(peaks - 1.0) > slack
    assert not bad.any(), (
        f"{what}: first peaks at {np.unique(peaks[bad])} (expected 1 ± {slack:.3f})"
    )


# -- structures used by the tests ---------------------------------------------------------------
# Cells are written out atom by atom: pymatgen's Structure.from_spacegroup takes
# seconds per call building the group.
def rock_salt(a: float, cation: str = "Na", anion: str = "Cl") -> Structure:
    """Conventional rock-salt cell (8 atoms, Fm-3m): cations 0-3, anions 4-7."""
    fcc = np.array([[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]])
    coords = np.concatenate([fcc, (fcc + 0.5) % 1.0])
    return Structure(Lattice.cubic(a), [cation] * 4 + [anion] * 4, coords)


def perovskite(a: float = 3.905) -> Structure:
    """Cubic SrTiO3 (5 atoms): the three O are related by the 3-fold axis."""
    coords = [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]
    return Structure(Lattice.cubic(a), ["Sr", "Ti", "O", "O", "O"], coords)


def wurtzite(a: float = 3.25, c: float = 5.21, u: float = 0.382) -> Structure:
    """Hexagonal ZnO (4 atoms, P6_3mc): a non-cubic cell."""
    coords = [[1 / 3, 2 / 3, 0], [2 / 3, 1 / 3, 0.5], [1 / 3, 2 / 3, u], [2 / 3, 1 / 3, 0.5 + u]]
    return Structure(Lattice.hexagonal(a, c), ["Zn", "Zn", "O", "O"], coords)


def triclinic(seed: int = 0, n: int = 5) -> Structure:
    """A random triclinic cell without short distances (P1, every atom its own site)."""
    rng = np.random.default_rng(seed)
    lattice = Lattice.from_parameters(5.1, 6.3, 7.2, 81.0, 97.0, 104.0)
    coords: list[np.ndarray] = []
    while len(coords) < n:
        x = rng.random(3)
        s = Structure(lattice, ["C"] * (len(coords) + 1), [*coords, x])
        if len(coords) == 0 or s.distance_matrix[-1, :-1].min() > 1.5:
            coords.append(x)
    species = ["Li", "O", "Mn", "Ge", "O", "O", "Li", "Mn"][:n]
    return Structure(lattice, species, coords)
