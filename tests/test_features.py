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
