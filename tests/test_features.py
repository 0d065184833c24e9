"""Template context: exact small cases and invariances."""

from __future__ import annotations

import numpy as np
import pytest

from afpx import AfpxError
from afpx.features import (
    DESCRIPTORS,
    N_DESCRIPTORS,
    context_groups,
    group_mean,
    site_context,
)


def _two_structures() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "afp_mean": rng.random((5, 8)),
        "r0": np.array([2.0, 2.5, 1.9, 3.0, 2.2]),
        "dmin_ratio": np.array([1.0, 0.8, 1.0, 0.9, 1.0]),
        "multiplicity": np.array([4, 4, 2, 6, 1]),
        "coordination": np.array([6, 6, 4, 8, 12]),
        "structure": np.array([0, 0, 1, 1, 1]),
    }


def test_exact_descriptors_of_a_small_case() -> None:
    a = _two_structures()
    ctx = site_context(**a)
    assert ctx.shape == (5, N_DESCRIPTORS + 8)
    d = dict(zip(DESCRIPTORS, ctx[:, :N_DESCRIPTORS].T, strict=True))
    np.testing.assert_allclose(np.exp(d["log_site_fraction"]), [0.5, 0.5, 2 / 9, 6 / 9, 1 / 9])
    np.testing.assert_allclose(np.exp(d["log_cell_atoms"]), [8, 8, 9, 9, 9], rtol=1e-6)
    np.testing.assert_allclose(np.exp(d["log_unique_sites"]), [2, 2, 3, 3, 3], rtol=1e-6)
    np.testing.assert_allclose(np.exp(d["log_r0_min"]), [2.0, 2.0, 1.9, 1.9, 1.9], rtol=1e-6)
    np.testing.assert_allclose(np.exp(d["log_r0_max"]), [2.5, 2.5, 3.0, 3.0, 3.0], rtol=1e-6)
    mean0 = (4 * 2.0 + 4 * 2.5) / 8
    np.testing.assert_allclose(np.exp(d["log_r0_relative"][:2]), [2.0 / mean0, 2.5 / mean0])
    np.testing.assert_allclose(d["coordination"], a["coordination"])
    expected = (4 * a["afp_mean"][0] + 4 * a["afp_mean"][1]) / 8
    np.testing.assert_allclose(ctx[0, N_DESCRIPTORS:], expected, rtol=1e-6)
    np.testing.assert_allclose(ctx[1, N_DESCRIPTORS:], expected, rtol=1e-6)


def test_context_does_not_depend_on_other_structures_or_site_order() -> None:
    a = _two_structures()
    full = site_context(**a)
    alone = site_context(**{k: v[2:] for k, v in a.items()})
    np.testing.assert_allclose(full[2:], alone, rtol=1e-6)
    perm = np.array([4, 2, 0, 3, 1])
    permuted = site_context(**{k: v[perm] for k, v in a.items()})
    np.testing.assert_allclose(permuted, full[perm], rtol=1e-6)


def test_supercell_keeps_fractions_and_structure_afp() -> None:
    a = _two_structures()
    doubled = dict(a, multiplicity=a["multiplicity"] * 2)
    x, y = site_context(**a), site_context(**doubled)
    i = DESCRIPTORS.index("log_site_fraction")
    np.testing.assert_allclose(x[:, i], y[:, i], rtol=1e-6)
    np.testing.assert_allclose(x[:, N_DESCRIPTORS:], y[:, N_DESCRIPTORS:], rtol=1e-6)
    j = DESCRIPTORS.index("log_cell_atoms")
    np.testing.assert_allclose(y[:, j] - x[:, j], np.log(2.0), rtol=1e-6)


def test_draws_are_separate_groups() -> None:
    g = context_groups(np.array([0, 0, 0, 0]), np.array([0, 1, 0, 1]))
    assert g.tolist() == [0, 1, 0, 1]
    assert context_groups(np.array([3, 3, 7])).tolist() == [0, 0, 1]


def test_context_errors() -> None:
    a = _two_structures()
    with pytest.raises(AfpxError, match="differ in length"):
        context_groups(np.zeros(3), np.zeros(2))
    with pytest.raises(AfpxError, match="r0 > 0 and multiplicity >= 1"):
        site_context(**dict(a, r0=-a["r0"]))
    with pytest.raises(AfpxError, match="differ in length"):
        site_context(**dict(a, coordination=a["coordination"][:3]))
    with pytest.raises(AfpxError, match="one row per site"):
        site_context(**dict(a, afp_mean=a["afp_mean"][:2]))
    with pytest.raises(AfpxError, match="positive total multiplicity"):
        group_mean(np.ones((2, 1)), np.zeros(2), np.array([0, 0]))
    assert site_context(**{k: v[:0] for k, v in a.items()}).shape == (0, N_DESCRIPTORS + 8)


# -- the coordination shell --------------------------------------------------------


def _perovskite():  # type: ignore[no-untyped-def]
    from pymatgen.core import Lattice, Structure

    return Structure.from_spacegroup(
        "Pm-3m",
        Lattice.cubic(3.905),
        ["Sr", "Ti", "O"],
        [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0]],
    )


def test_shell_of_a_perovskite_is_its_coordination_polyhedra() -> None:
    from afpx.features import structure_shell_pairs
    from afpx.structures import unique_sites

    s = _perovskite()
    table = unique_sites(s)
    pairs = structure_shell_pairs(s.lattice.matrix, s.frac_coords, s.atomic_numbers, table.index)
    z = table.z.tolist()
    seen = {(z[a], z[b]): 0 for a in range(3) for b in range(3)}
    for a, b in pairs.tolist():
        seen[(z[a], z[b])] += 1
    # Ti sits in an O6 octahedron; O has two Ti at r0 (Sr at sqrt(2) r0 lies outside
    # 1.2 r0); Sr's nearest neighbours are its twelve O (at 2.76 A < Sr-Ti 3.38 A)
    assert {k: v for k, v in seen.items() if v} == {(22, 8): 6, (8, 22): 2, (38, 8): 12}


def test_shell_is_the_same_in_a_supercell_and_after_a_rigid_motion() -> None:
    from afpx.features import structure_shell_pairs
    from afpx.structures import unique_sites

    def shell_counts(structure) -> list[tuple[int, int, int]]:  # type: ignore[no-untyped-def]
        table = unique_sites(structure)
        pairs = structure_shell_pairs(
            structure.lattice.matrix, structure.frac_coords, structure.atomic_numbers, table.index
        )
        z = table.z
        counts: dict[tuple[int, int], int] = {}
        for a, b in pairs.tolist():
            counts[(int(z[a]), int(z[b]))] = counts.get((int(z[a]), int(z[b])), 0) + 1
        # per representative atom, so a supercell (more atoms per orbit) keeps the counts
        return sorted((a, b, n) for (a, b), n in counts.items())

    s = _perovskite()
    big = s.copy()
    big.make_supercell([2, 1, 1])
    moved = s.copy()
    moved.translate_sites(list(range(len(moved))), [0.13, 0.27, 0.41])
    assert shell_counts(big) == shell_counts(s) == shell_counts(moved)


def test_shell_context_exact_small_case_and_errors() -> None:
    from afpx.features import SHELL_DESCRIPTORS, context_groups, shell_context

    afp = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    r0 = np.array([2.0, 3.0, 1.0])
    cn = np.array([4, 6, 0])
    mult = np.array([1, 3, 2])
    group = context_groups(np.array([0, 0, 1]))
    # site 0 sees site 1 three times; site 1 sees site 0 once and itself once; site 2 nothing
    pairs = np.array([[0, 1], [0, 1], [0, 1], [1, 0], [1, 1]])
    out = shell_context(afp, r0, cn, mult, group, pairs)
    assert out.shape == (3, len(SHELL_DESCRIPTORS) + 2)
    np.testing.assert_allclose(out[0], [np.log(3), np.log(1.5), 6, np.log(0.75), 0, 1], rtol=1e-6)
    mean_log_r0 = (np.log(2) + np.log(3)) / 2
    np.testing.assert_allclose(
        out[1],
        [mean_log_r0, mean_log_r0 - np.log(3), 5, (np.log(0.25) + np.log(0.75)) / 2, 0.5, 0.5],
        rtol=1e-6,
    )
    np.testing.assert_array_equal(out[2], 0)  # no shell: zeros
    with pytest.raises(AfpxError, match=r"outside 0\.\.2"):
        shell_context(afp, r0, cn, mult, group, np.array([[0, 3]]))
    with pytest.raises(AfpxError, match="two different structures"):
        shell_context(afp, r0, cn, mult, group, np.array([[0, 2]]))


def test_site_context_with_shell_appends_its_columns() -> None:
    from afpx.features import context_width

    a = _two_structures()
    plain = site_context(**a)
    pairs = np.array([[0, 1], [1, 0], [2, 3], [3, 4], [4, 2]])
    full = site_context(**a, shell_pairs=pairs)
    assert full.shape == (5, context_width(8, shell=True)) == (5, N_DESCRIPTORS + 8 + 4 + 8)
    np.testing.assert_array_equal(full[:, : plain.shape[1]], plain)
    np.testing.assert_allclose(full[0, plain.shape[1] + 4 :], a["afp_mean"][1], rtol=1e-6)
    empty = site_context(**{k: v[:0] for k, v in a.items()}, shell_pairs=np.zeros((0, 2)))
    assert empty.shape == (0, context_width(8, shell=True))


def test_shell_pairs_of_a_built_cube_match_its_coordination(
    tmp_path: pytest.TempPathFactory, data_dir
) -> None:  # type: ignore[no-untyped-def]
    """Neighbour counts of the shell equal the cube's ``coordination``; draws pair apart."""
    from click.testing import CliRunner

    from afpx import schema
    from afpx.cli import main
    from afpx.features import context_from_store, context_width, shell_pairs
    from afpx.store import open_group

    cifs = [str(p) for p in sorted((data_dir / "cod").glob("*.cif"))[:6]]
    cube = str(tmp_path / "cube.zarr")  # type: ignore[operator]
    r = CliRunner().invoke(main, ["build-cube", *cifs, "-o", cube, "--draws", "2", "--no-progress"])
    assert r.exit_code == 0, r.output
    g = open_group(cube)
    arr = {k: np.asarray(g[k][:]) for k in g.array_keys()}
    pairs = shell_pairs(
        arr[schema.STRUCTURE_INDEX], arr[schema.SITE_INDEX], arr[schema.DRAW],
        arr[schema.LATTICE], arr[schema.N_ATOMS], arr[schema.ATOM_FRAC_COORDS], arr[schema.ATOM_Z],
    )  # fmt: skip
    n = len(arr[schema.R0])
    assert n and len(pairs)
    np.testing.assert_array_equal(np.bincount(pairs[:, 0], minlength=n), arr[schema.COORDINATION])
    d = arr[schema.DRAW]
    assert set(d.tolist()) == {0, 1}
    np.testing.assert_array_equal(d[pairs[:, 0]], d[pairs[:, 1]])
    st = arr[schema.STRUCTURE_INDEX]
    np.testing.assert_array_equal(st[pairs[:, 0]], st[pairs[:, 1]])
    # the same shells, by site, in both draws
    key = lambda m: sorted(  # noqa: E731
        (int(st[a]), int(arr[schema.SITE_INDEX][a]), int(arr[schema.SITE_INDEX][b]))
        for a, b in pairs[m].tolist()
    )
    assert key(d[pairs[:, 0]] == 0) == key(d[pairs[:, 0]] == 1)
    ctx = context_from_store(g, shell=True)
    assert ctx.shape == (n, context_width(int(g[schema.AFP].shape[2]), shell=True))
    assert np.isfinite(ctx).all()
    with pytest.raises(AfpxError, match="geometry holds 1 structures"):
        shell_pairs(
            st, arr[schema.SITE_INDEX], d, arr[schema.LATTICE][:1], arr[schema.N_ATOMS][:1],
            arr[schema.ATOM_FRAC_COORDS], arr[schema.ATOM_Z],
        )  # fmt: skip
    # sites found with other tolerances: the orbits do not meet the representatives
    wrong = arr[schema.SITE_INDEX].copy()
    wrong[st == 0] = 0
    with pytest.raises(AfpxError, match="structure 0: the orbits of atoms"):
        shell_pairs(
            st, wrong, d, arr[schema.LATTICE], arr[schema.N_ATOMS],
            arr[schema.ATOM_FRAC_COORDS], arr[schema.ATOM_Z],
        )  # fmt: skip


def test_context_from_store_names_the_missing_geometry(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import zarr

    from afpx.features import context_from_store

    g = zarr.open_group(str(tmp_path / "c.zarr"), mode="w")
    for name, shape in (
        ("afp", (2, 12, 8)),
        ("r0", (2,)),
        ("dmin_ratio", (2,)),
        ("multiplicity", (2,)),
        ("coordination", (2,)),
        ("structure", (2,)),
    ):
        g.create_array(name, shape=shape, dtype="float32", fill_value=1.0)
    with pytest.raises(AfpxError, match="needs site_index, lattice, n_atoms"):
        context_from_store(g, shell=True)
    assert context_from_store(g).shape == (2, N_DESCRIPTORS + 8)
