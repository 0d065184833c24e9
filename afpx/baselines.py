"""Element-blind and element-aware baseline site likelihoods.

Every baseline returns a site × element array of shape ``(n_sites, 118)``
with values in (0, 1], one row per site of the given (draw-0) site table, so
that :meth:`afpx.templates.TemplateLibrary.with_likelihood` turns it into a
template library scored exactly as the model's is. Statistics are estimated
on the sites of the training split only.

========================  =================================================================
baseline                  likelihood of element *e* on site *s*
========================  =================================================================
``constant``              0.5 for every site and element (the pure template prior: a
                          candidate's score depends only on its number of unique sites)
``random``                independent uniform draws in (0, 1) (seeded)
``frequency``             P(e): share of training sites carrying *e* (add-α smoothed)
``coordination``          P(e | CN(s)): share among training sites with the same
                          coordination number, shrunk towards P(e) (Dirichlet prior β)
========================  =================================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final

import numpy as np

from afpx import AfpxError, schema

#: Names of the baselines, in the order they are reported.
BASELINES: Final = ("constant", "random", "frequency", "coordination")


@dataclass(frozen=True)
class BaselineParams:
    """Parameters of the baselines (recorded in every report).

    Attributes
    ----------
    constant : float
        The constant likelihood; any value in (0, 1) gives the same ranking.
    seed : int
        Seed of the random baseline.
    alpha : float
        Add-α pseudo-count per element of the frequency baseline, so that an
        element never seen in training keeps a small non-zero likelihood.
    beta : float
        Strength of the prior P(e) in the coordination baseline: P(e | CN) =
        (n(e, CN) + β P(e)) / (n(CN) + β). Coordination numbers never seen in
        training get P(e).
    """

    constant: float = 0.5
    seed: int = 0
    alpha: float = 1.0
    beta: float = 10.0

    def to_attrs(self) -> dict[str, Any]:
        """The parameters as a JSON-able dict."""
        return asdict(self)


def _check_z(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z)
    if z.size and (z.min() < 1 or z.max() > schema.N_ELEMENTS):
        raise AfpxError(
            f"atomic numbers must lie in 1..{schema.N_ELEMENTS}, got {z.min()}..{z.max()}"
        )
    return z.astype(np.int64)


def constant_likelihood(n_sites: int, *, value: float = 0.5) -> np.ndarray:
    """The same likelihood for every site and element.

    Parameters
    ----------
    n_sites : int
        Number of sites.
    value : float
        The likelihood, in (0, 1].

    Returns
    -------
    ndarray of shape (n_sites, 118), float32
    """
    if not 0.0 < value <= 1.0:
        raise AfpxError(f"the constant likelihood must lie in (0, 1], got {value}")
    return np.full((n_sites, schema.N_ELEMENTS), value, dtype=np.float32)


def random_likelihood(n_sites: int, *, rng: np.random.Generator) -> np.ndarray:
    """Independent uniform likelihoods in (0, 1).

    Parameters
    ----------
    n_sites : int
        Number of sites.
    rng : numpy.random.Generator
        Source of randomness.

    Returns
    -------
    ndarray of shape (n_sites, 118), float32
    """
    u = rng.random((n_sites, schema.N_ELEMENTS), dtype=np.float32)
    # rng.random is in [0, 1): map to (0, 1] so that no likelihood is exactly zero
    return (1.0 - u).astype(np.float32)


def element_frequency(z_train: np.ndarray, *, alpha: float = 1.0) -> np.ndarray:
    """Share of training sites carrying each element, add-α smoothed.

    Parameters
    ----------
    z_train : ndarray of shape (n_train_sites,)
        Atomic numbers of the training sites.
    alpha : float
        Pseudo-count added to every element.

    Returns
    -------
    ndarray of shape (118,), float64, summing to 1; entry ``Z - 1`` is element Z.
    """
    z = _check_z(z_train)
    if alpha < 0:
        raise AfpxError(f"alpha must be non-negative, got {alpha}")
    counts = np.bincount(z - 1, minlength=schema.N_ELEMENTS).astype(np.float64) + alpha
    total = counts.sum()
    if total <= 0:
        raise AfpxError("no training sites to estimate element frequencies from (and alpha = 0)")
    return counts / total


def frequency_likelihood(n_sites: int, frequency: np.ndarray) -> np.ndarray:
    """Every site gets the element frequencies as its likelihoods.

    Parameters
    ----------
    n_sites : int
        Number of sites.
    frequency : ndarray of shape (118,)
        From :func:`element_frequency`.

    Returns
    -------
    ndarray of shape (n_sites, 118), float32
    """
    frequency = np.asarray(frequency, dtype=np.float32)
    return np.broadcast_to(frequency, (n_sites, schema.N_ELEMENTS)).copy()


def coordination_frequency(
    z_train: np.ndarray,
    coordination_train: np.ndarray,
    *,
    alpha: float = 1.0,
    beta: float = 10.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Element frequencies conditioned on the coordination number.

    Parameters
    ----------
    z_train : ndarray of shape (n_train_sites,)
        Atomic numbers of the training sites.
    coordination_train : ndarray of shape (n_train_sites,)
        Their coordination numbers (neighbours within 1.2 × r0).
    alpha : float
        Pseudo-count of the unconditioned frequency P(e).
    beta : float
        Weight of P(e) as a prior: P(e | CN) = (n(e, CN) + β P(e)) / (n(CN) + β).

    Returns
    -------
    table : ndarray of shape (max_cn + 1, 118), float64
        Row CN is P(e | CN); rows of unseen CN equal P(e).
    prior : ndarray of shape (118,), float64
        P(e), used for coordination numbers beyond the table.
    """
    z = _check_z(z_train)
    cn = np.asarray(coordination_train).astype(np.int64)
    if cn.shape != z.shape:
        raise AfpxError(f"z and coordination differ in shape: {z.shape} vs {cn.shape}")
    if cn.size and cn.min() < 0:
        raise AfpxError(f"coordination numbers must be non-negative, got {cn.min()}")
    if beta <= 0:
        raise AfpxError(f"beta must be positive, got {beta}")
    prior = element_frequency(z, alpha=alpha)
    n_cn = int(cn.max()) + 1 if cn.size else 1
    counts = np.zeros((n_cn, schema.N_ELEMENTS))
    np.add.at(counts, (cn, z - 1), 1.0)
    table = (counts + beta * prior) / (counts.sum(axis=1, keepdims=True) + beta)
    return table, prior


def coordination_likelihood(
    coordination: np.ndarray, table: np.ndarray, prior: np.ndarray
) -> np.ndarray:
    """Look up P(e | CN) for every site.

    Parameters
    ----------
    coordination : ndarray of shape (n_sites,)
        Coordination number of each site.
    table, prior
        From :func:`coordination_frequency`.

    Returns
    -------
    ndarray of shape (n_sites, 118), float32
    """
    cn = np.asarray(coordination).astype(np.int64)
    out = np.empty((cn.size, schema.N_ELEMENTS), dtype=np.float32)
    inside = (cn >= 0) & (cn < table.shape[0])
    out[inside] = table[cn[inside]]
    out[~inside] = prior
    return out


def baseline_likelihoods(
    z: np.ndarray,
    coordination: np.ndarray,
    is_train: np.ndarray,
    *,
    names: Sequence[str] = BASELINES,
    params: BaselineParams = BaselineParams(),
) -> dict[str, np.ndarray]:
    """Every requested baseline for one table of sites.

    Parameters
    ----------
    z : ndarray of shape (n_sites,)
        Atomic number of each site (used only where ``is_train``).
    coordination : ndarray of shape (n_sites,)
        Coordination number of each site.
    is_train : ndarray of shape (n_sites,), bool
        Which sites belong to the training split (the statistics come from these).
    names : sequence of str
        Baselines to compute, from :data:`BASELINES`.
    params : BaselineParams
        Their parameters.

    Returns
    -------
    dict of str to ndarray of shape (n_sites, 118), float32
    """
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise AfpxError(
            f"unknown baseline(s) {', '.join(unknown)}; choose from {', '.join(BASELINES)}"
        )
    z = np.asarray(z)
    coordination = np.asarray(coordination)
    is_train = np.asarray(is_train, dtype=bool)
    n_sites = z.size
    if not is_train.any() and any(n in ("frequency", "coordination") for n in names):
        raise AfpxError("the frequency baselines need training sites, and none are marked train")
    out: dict[str, np.ndarray] = {}
    for name in names:
        if name == "constant":
            out[name] = constant_likelihood(n_sites, value=params.constant)
        elif name == "random":
            out[name] = random_likelihood(n_sites, rng=np.random.default_rng(params.seed))
        elif name == "frequency":
            out[name] = frequency_likelihood(
                n_sites, element_frequency(z[is_train], alpha=params.alpha)
            )
        else:
            table, prior = coordination_frequency(
                z[is_train], coordination[is_train], alpha=params.alpha, beta=params.beta
            )
            out[name] = coordination_likelihood(coordination, table, prior)
    return out
