"""How far site likelihoods can be read as probabilities: accuracy, reliability, temperature.

Ranking multiplies site likelihoods, so a candidate's score is a probability
only as far as the likelihoods are calibrated. These functions measure that on
a labelled split (numpy only):

- :func:`topk_errors`: share of sites whose true element is not among the k
  highest likelihoods;
- :func:`reliability`: the top-label reliability curve (mean likelihood of
  the best element vs how often it is the true one, per likelihood bin) and
  the expected calibration error (ECE) it implies;
- :func:`fit_temperature`: the temperature T that makes ``sigmoid(logit(p) /
  T)`` best fit the one-vs-rest labels of every (site, element) pair
  (binary cross-entropy), fitted on the holdout split.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from afpx import AfpxError

_EPS = 1e-7


def _check(likelihood: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lik = np.asarray(likelihood, dtype=np.float64)
    z = np.asarray(z).astype(np.int64).reshape(-1)
    if lik.ndim != 2 or lik.shape[0] != z.size:
        raise AfpxError(f"likelihood must be (n_sites, n_elements) for {z.size} sites")
    if z.size and (z.min() < 1 or z.max() > lik.shape[1]):
        raise AfpxError(f"atomic numbers must lie in 1..{lik.shape[1]}")
    return lik, z


def topk_errors(
    likelihood: np.ndarray, z: np.ndarray, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Top-k error of site likelihoods (ties counted against the true element).

    Parameters
    ----------
    likelihood : ndarray of shape (n_sites, n_elements)
        Column ``Z - 1`` is element Z.
    z : ndarray of shape (n_sites,)
        True atomic numbers.
    ks : sequence of int

    Returns
    -------
    dict
        ``top{k}_error`` for each k, and ``mean_rank`` of the true element
        (1 = first).
    """
    lik, z = _check(likelihood, z)
    if z.size == 0:
        return {**{f"top{k}_error": float("nan") for k in ks}, "mean_rank": float("nan")}
    true = lik[np.arange(z.size), z - 1]
    rank = 1 + (lik >= true[:, None]).sum(1) - 1  # elements at least as likely, itself excluded
    out = {f"top{k}_error": float(np.mean(rank > k)) for k in ks}
    out["mean_rank"] = float(rank.mean())
    return out


def reliability(likelihood: np.ndarray, z: np.ndarray, *, bins: int = 10) -> dict[str, Any]:
    """Top-label reliability curve and expected calibration error.

    Parameters
    ----------
    likelihood : ndarray of shape (n_sites, n_elements)
    z : ndarray of shape (n_sites,)
    bins : int
        Equal-width bins of the best element's likelihood over [0, 1].

    Returns
    -------
    dict
        ``bin_lower``, ``bin_upper``, ``count``, ``confidence`` (mean best
        likelihood), ``accuracy`` (share of sites whose best element is the
        true one) per bin, and ``ece`` = Σ_b (n_b / n) |accuracy_b - confidence_b|.
    """
    lik, z = _check(likelihood, z)
    best = lik.argmax(1)
    return reliability_of(lik[np.arange(z.size), best], best == z - 1, bins=bins)


def reliability_of(confidence: np.ndarray, hit: np.ndarray, *, bins: int = 10) -> dict[str, Any]:
    """:func:`reliability` from each site's best likelihood and whether it is the true element.

    For likelihoods too large to hold at once: collect ``confidence`` (the
    best likelihood of each site) and ``hit`` block by block, then call this.
    """
    if bins < 1:
        raise AfpxError(f"bins must be at least 1, got {bins}")
    conf = np.clip(np.asarray(confidence, dtype=np.float64).reshape(-1), 0.0, 1.0)
    hit = np.asarray(hit, dtype=np.float64).reshape(-1)
    z = hit  # one entry per site
    which = np.minimum((conf * bins).astype(np.int64), bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, weights=conf, minlength=bins) / count
        accuracy = np.bincount(which, weights=hit, minlength=bins) / count
    filled = count > 0
    ece = (
        float(np.sum(count[filled] * np.abs(accuracy[filled] - mean_conf[filled])) / z.size)
        if z.size
        else float("nan")
    )
    edges = np.linspace(0.0, 1.0, bins + 1)
    return {
        "bin_lower": edges[:-1].tolist(),
        "bin_upper": edges[1:].tolist(),
        "count": count.tolist(),
        "confidence": [float(v) if f else None for v, f in zip(mean_conf, filled, strict=True)],
        "accuracy": [float(v) if f else None for v, f in zip(accuracy, filled, strict=True)],
        "ece": ece,
    }


def apply_temperature(likelihood: np.ndarray, temperature: float) -> np.ndarray:
    """``sigmoid(logit(p) / T)`` elementwise (float32)."""
    if not temperature > 0:
        raise AfpxError(f"the temperature must be positive, got {temperature}")
    p = np.clip(np.asarray(likelihood, dtype=np.float64), _EPS, 1 - _EPS)
    logit = np.log(p) - np.log1p(-p)
    return (1.0 / (1.0 + np.exp(-logit / temperature))).astype(np.float32)


def fit_temperature(likelihood: np.ndarray, z: np.ndarray) -> float:
    """The temperature that minimises the one-vs-rest binary cross-entropy.

    Parameters
    ----------
    likelihood : ndarray of shape (n_sites, n_elements)
        Sigmoid likelihoods of a held-out split.
    z : ndarray of shape (n_sites,)

    Returns
    -------
    float
        T > 1 softens over-confident likelihoods, T < 1 sharpens them.
    """
    from scipy.optimize import minimize_scalar

    lik, z = _check(likelihood, z)
    if z.size == 0:
        raise AfpxError("fitting a temperature needs labelled sites")
    p = np.clip(lik, _EPS, 1 - _EPS)
    logit = np.log(p) - np.log1p(-p)
    target = np.zeros_like(logit)
    target[np.arange(z.size), z - 1] = 1.0

    def bce(log_t: float) -> float:
        x = logit / np.exp(log_t)
        # log(1 + e^-x) for positives, log(1 + e^x) for negatives, stable
        return float(np.mean(np.logaddexp(0.0, -x) * target + np.logaddexp(0.0, x) * (1 - target)))

    res = minimize_scalar(bce, bounds=(-3.0, 3.0), method="bounded")
    return float(np.exp(res.x))
