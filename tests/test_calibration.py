"""Accuracy, reliability and temperature of site likelihoods."""

from __future__ import annotations

import numpy as np
import pytest

from afpx import AfpxError
from afpx.calibration import apply_temperature, fit_temperature, reliability, topk_errors


def test_topk_errors_exact_case() -> None:
    lik = np.array([[0.9, 0.1, 0.0], [0.2, 0.5, 0.3], [0.3, 0.3, 0.4]])
    out = topk_errors(lik, np.array([1, 3, 2]), ks=(1, 2))
    assert out["top1_error"] == pytest.approx(2 / 3)
    # site 3: element 2 ties element 1 (0.3 = 0.3), ties count against it: rank 3
    assert out["top2_error"] == pytest.approx(1 / 3)
    assert out["mean_rank"] == pytest.approx((1 + 2 + 3) / 3)


def test_calibrated_likelihoods_have_small_ece_and_overconfident_ones_do_not() -> None:
    rng = np.random.default_rng(0)
    n, k = 20000, 4
    logits = rng.normal(scale=2.0, size=(n, k))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    z = 1 + np.array([rng.choice(k, p=row) for row in p])
    good = reliability(p, z, bins=10)
    assert good["ece"] < 0.02 and sum(good["count"]) == n
    sharp = np.exp(3 * logits) / np.exp(3 * logits).sum(1, keepdims=True)
    assert reliability(sharp, z, bins=10)["ece"] > 0.1


def test_fit_temperature_recovers_a_known_scaling() -> None:
    rng = np.random.default_rng(1)
    n, k = 4000, 6
    logit = rng.normal(scale=1.5, size=(n, k))
    p = 1 / (1 + np.exp(-logit))
    # labels drawn from the calibrated one-vs-rest probabilities of one true element
    z = 1 + np.array([rng.choice(k, p=row / row.sum()) for row in p])
    t_true = fit_temperature(p, z)
    overconfident = 1 / (1 + np.exp(-2 * logit))
    assert fit_temperature(overconfident, z) == pytest.approx(2 * t_true, rel=1e-3)
    np.testing.assert_allclose(apply_temperature(overconfident, 2.0), p, atol=1e-5)


def test_calibration_errors() -> None:
    with pytest.raises(AfpxError, match="must be \\(n_sites, n_elements\\)"):
        topk_errors(np.ones((2, 3)), np.array([1]))
    with pytest.raises(AfpxError, match=r"atomic numbers must lie in 1\.\.3"):
        reliability(np.ones((1, 3)), np.array([4]))
    with pytest.raises(AfpxError, match="bins must be at least 1"):
        reliability(np.ones((1, 3)), np.array([1]), bins=0)
    with pytest.raises(AfpxError, match="temperature must be positive"):
        apply_temperature(np.ones((1, 3)), 0.0)
    with pytest.raises(AfpxError, match="needs labelled sites"):
        fit_temperature(np.ones((0, 3)), np.array([], int))
    assert np.isnan(topk_errors(np.ones((0, 3)), np.array([], int))["top1_error"])
