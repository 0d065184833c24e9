from __future__ import annotations

import numpy as np
import pytest

from afpx import AfpxError, schema
from afpx.baselines import (
    BASELINES,
    BaselineParams,
    baseline_likelihoods,
    constant_likelihood,
    coordination_frequency,
    coordination_likelihood,
    element_frequency,
    frequency_likelihood,
    random_likelihood,
)


def test_constant_is_constant_and_checked() -> None:
    lk = constant_likelihood(5, value=0.3)
    assert lk.shape == (5, schema.N_ELEMENTS)
    assert lk.dtype == np.float32
    assert np.all(lk == np.float32(0.3))
    with pytest.raises(AfpxError, match=r"in \(0, 1\]"):
        constant_likelihood(5, value=0.0)


def test_random_is_seeded_and_positive() -> None:
    a = random_likelihood(50, rng=np.random.default_rng(3))
    b = random_likelihood(50, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    assert a.min() > 0 and a.max() <= 1
    assert abs(a.mean() - 0.5) < 0.01


def test_element_frequency_counts_and_smoothing() -> None:
    z = np.array([8, 8, 8, 26])
    f = element_frequency(z, alpha=0.0)
    assert f[7] == pytest.approx(0.75) and f[25] == pytest.approx(0.25)
    assert f.sum() == pytest.approx(1.0)
    g = element_frequency(z, alpha=1.0)
    assert g[0] == pytest.approx(1 / (4 + schema.N_ELEMENTS))  # unseen H keeps alpha
    lk = frequency_likelihood(3, f)
    assert lk.shape == (3, schema.N_ELEMENTS)
    np.testing.assert_allclose(lk[2], f, rtol=1e-6)


def test_element_frequency_errors() -> None:
    with pytest.raises(AfpxError, match=r"1\.\.118"):
        element_frequency(np.array([0, 8]))
    with pytest.raises(AfpxError, match="non-negative"):
        element_frequency(np.array([8]), alpha=-1)
    with pytest.raises(AfpxError, match="no training sites"):
        element_frequency(np.array([], dtype=int), alpha=0.0)


def test_coordination_frequency_conditions_on_cn() -> None:
    # O sits on 2-coordinated sites, Fe on 6-coordinated ones
    z = np.array([8] * 10 + [26] * 10)
    cn = np.array([2] * 10 + [6] * 10)
    table, prior = coordination_frequency(z, cn, alpha=0.0, beta=1.0)
    assert table.shape == (7, schema.N_ELEMENTS)
    assert table[2, 7] > 0.9 and table[2, 25] < 0.1
    assert table[6, 25] > 0.9
    np.testing.assert_allclose(table[4], prior)  # unseen CN falls back to P(e)
    np.testing.assert_allclose(table.sum(axis=1), 1.0)
    lk = coordination_likelihood(np.array([2, 6, 4, 40]), table, prior)
    assert lk[0, 7] > lk[0, 25] and lk[1, 25] > lk[1, 7]
    np.testing.assert_allclose(lk[3], prior, rtol=1e-6)  # beyond the table: P(e)


def test_coordination_frequency_errors() -> None:
    with pytest.raises(AfpxError, match="differ in shape"):
        coordination_frequency(np.array([8, 8]), np.array([2]))
    with pytest.raises(AfpxError, match="non-negative"):
        coordination_frequency(np.array([8]), np.array([-1]))
    with pytest.raises(AfpxError, match="beta must be positive"):
        coordination_frequency(np.array([8]), np.array([2]), beta=0.0)


def test_baseline_likelihoods_uses_training_sites_only() -> None:
    z = np.array([8, 8, 26, 3])
    cn = np.array([2, 2, 6, 4])
    train = np.array([True, True, True, False])
    out = baseline_likelihoods(z, cn, train, params=BaselineParams(alpha=0.0))
    assert tuple(out) == BASELINES
    for lk in out.values():
        assert lk.shape == (4, schema.N_ELEMENTS) and lk.dtype == np.float32
        assert lk.min() >= 0 and lk.max() <= 1
    assert out["frequency"][0, 2] == 0.0  # Li is only on the test site
    assert out["frequency"][0, 7] == pytest.approx(2 / 3)


def test_baseline_likelihoods_errors() -> None:
    z = np.array([8])
    with pytest.raises(AfpxError, match="unknown baseline"):
        baseline_likelihoods(z, z, np.array([True]), names=["nope"])
    with pytest.raises(AfpxError, match="none are marked train"):
        baseline_likelihoods(z, z, np.array([False]), names=["frequency"])
