"""Periodic neighbour shells against pymatgen's own neighbour search."""

from __future__ import annotations

import numpy as np
import pytest
from invariants import rock_salt, triclinic, wurtzite
from pymatgen.core import Lattice, Structure

from afpx import AfpxError
from afpx.neighbours import count_within, nearest_neighbour_distances, neighbour_shells


def test_rock_salt_nearest_distance_and_coordination() -> None:
    nacl = rock_salt(5.64)
    atoms = [0, 4]
    r0 = nearest_neighbour_distances(nacl.lattice.matrix, nacl.frac_coords, atoms)
    np.testing.assert_allclose(r0, 2.82)
    vectors, counts = neighbour_shells(nacl.lattice.matrix, nacl.frac_coords, atoms, 1.3 * r0)
    assert counts.tolist() == [6, 6]
    assert count_within(vectors, counts, 1.2 * r0).tolist() == [6, 6]
    # shells of rock salt within 1.5 r0: 6 at r0 and 12 at sqrt(2) r0
    vectors, counts = neighbour_shells(nacl.lattice.matrix, nacl.frac_coords, atoms, 1.5 * r0)
    assert counts.tolist() == [18, 18]


def test_single_atom_cell_sees_its_own_images() -> None:
    cubic = Structure(Lattice.cubic(3.0), ["Po"], [[0.2, 0.2, 0.2]])
    r0 = nearest_neighbour_distances(cubic.lattice.matrix, cubic.frac_coords, [0])
    assert r0.tolist() == pytest.approx([3.0])
    vectors, counts = neighbour_shells(cubic.lattice.matrix, cubic.frac_coords, [0], [3.01])
    assert counts.tolist() == [6]
    np.testing.assert_allclose(np.sort(np.abs(vectors).sum(axis=1)), 3.0)


def test_sparse_cell_widens_the_first_query() -> None:
    """One atom pair far apart in a big cell: the nearest neighbour is still found."""
    s = Structure(Lattice.cubic(20.0), ["Xe", "Xe"], [[0, 0, 0], [0.05, 0, 0]])
    r0 = nearest_neighbour_distances(s.lattice.matrix, s.frac_coords, [0, 1])
    np.testing.assert_allclose(r0, 1.0)
    lone = Structure(Lattice.orthorhombic(3.0, 3.0, 40.0), ["Xe"], [[0, 0, 0]])
    assert nearest_neighbour_distances(
        lone.lattice.matrix, lone.frac_coords, [0]
    ).tolist() == pytest.approx([3.0])


@pytest.mark.parametrize("make", [wurtzite, triclinic])
def test_shells_match_pymatgen(make: object) -> None:
    s = make()  # type: ignore[operator]
    atoms = list(range(len(s)))
    radii = np.linspace(6.0, 9.0, len(atoms))
    vectors, counts = neighbour_shells(s.lattice.matrix, s.frac_coords, atoms, radii)
    start = 0
    for atom, radius, n in zip(atoms, radii, counts, strict=True):
        mine = vectors[start : start + n]
        start += n
        theirs = np.array([nb.coords - s[atom].coords for nb in s.get_neighbors(s[atom], radius)])
        assert n == len(theirs)
        key = lambda a: np.lexsort(np.round(a, 6).T)  # noqa: E731
        np.testing.assert_allclose(mine[key(mine)], theirs[key(theirs)], atol=1e-9)
        assert np.all(np.linalg.norm(mine, axis=1) <= radius)
        assert np.all(np.linalg.norm(mine, axis=1) > 0.1)  # the centre itself is excluded


def test_order_does_not_depend_on_grouping() -> None:
    """A centre's neighbours come out identical, bit for bit, alone or with others."""
    s = triclinic(seed=3, n=6)
    radii = [7.0, 9.5, 7.2, 12.0, 7.1, 7.3]
    together, counts = neighbour_shells(s.lattice.matrix, s.frac_coords, range(6), radii)
    ends = np.cumsum(counts)
    for i in range(6):
        alone, _ = neighbour_shells(s.lattice.matrix, s.frac_coords, [i], [radii[i]])
        np.testing.assert_array_equal(alone, together[ends[i] - counts[i] : ends[i]])
    # wrapped and unwrapped fractional coordinates give the same vectors
    moved = s.frac_coords + np.array([1, -2, 0])
    shifted, _ = neighbour_shells(s.lattice.matrix, moved, [0], [radii[0]])
    np.testing.assert_allclose(shifted, together[: counts[0]], atol=1e-9)


def test_count_within_is_strict() -> None:
    vectors = np.array([[1.0, 0, 0], [0, 2.0, 0], [0, 0, 3.0]])
    assert count_within(vectors, np.array([2, 1]), np.array([2.0, 3.5])).tolist() == [1, 1]


@pytest.mark.parametrize(
    ("lattice", "frac"),
    [
        (np.eye(2), np.zeros((1, 3))),
        (np.eye(3), np.zeros((0, 3))),
        (np.zeros((3, 3)), np.zeros((1, 3))),
        (np.eye(3), np.full((1, 3), np.nan)),
    ],
)
def test_bad_cells_raise(lattice: np.ndarray, frac: np.ndarray) -> None:
    with pytest.raises(AfpxError):
        nearest_neighbour_distances(lattice, frac, [0])


def test_neighbour_atoms_is_the_coordination_shell() -> None:
    from afpx.neighbours import count_within, neighbour_atoms, neighbour_shells

    rng = np.random.default_rng(3)
    lattice = np.diag([4.0, 5.0, 6.0]) + rng.normal(0, 0.2, (3, 3))
    frac = rng.random((7, 3))
    centres = np.array([0, 3, 5])
    radii = np.array([2.5, 3.0, 3.5])
    pairs = neighbour_atoms(lattice, frac, centres, radii)
    vectors, counts = neighbour_shells(lattice, frac, centres, radii)
    np.testing.assert_array_equal(
        np.bincount(pairs[:, 0], minlength=3), count_within(vectors, counts, radii)
    )
    with pytest.raises(AfpxError, match="positive and finite"):
        neighbour_atoms(lattice, frac, centres, [1.0, 0.0, 2.0])
    assert neighbour_atoms(lattice, frac, [], []).shape == (0, 2)
