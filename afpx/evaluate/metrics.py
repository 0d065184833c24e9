"""Metric kernels (ranks of known items, optimality score, hit@k, confusion matrix,
likelihood histograms) and the per-site metrics of a cube (softmax error rate).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from afpx import AfpxError, schema
from afpx.calibration import reliability_of
from afpx.evaluate.params import KIND, LIKELIHOOD_BIN, PREDICTED_ELEMENT, TRUE_ELEMENT
from afpx.templates.ties import DEFAULT_TIE_TOLERANCE, tie_ranks

if TYPE_CHECKING:
    import xarray as xr

__all__ = [
    "as_str_array",
    "confusion_counts",
    "error_rate",
    "first_known_metrics",
    "known_positions",
    "likelihood_histogram",
    "optimality_score",
    "per_site_metrics",
    "site_arrays",
]


def known_positions(
    scores: np.ndarray, known: np.ndarray, *, tolerance: float = DEFAULT_TIE_TOLERANCE
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions of the known items of a ranked list, three ways of breaking ties.

    Parameters
    ----------
    scores : ndarray of shape (n,)
        Scores of all n items; higher is better.
    known : ndarray of shape (n,), bool
        Which items are known.
    tolerance : float
        Relative tie tolerance (:func:`afpx.templates.tie_ranks`).

    Returns
    -------
    mid : ndarray of shape (Q,), float64
        Mid-ranks of the known items (:func:`tie_ranks`).
    optimistic : ndarray of shape (Q,), int64
        Distinct positions when, in every tie group, the known items come first.
    pessimistic : ndarray of shape (Q,), int64
        Distinct positions when, in every tie group, the known items come last.

    Notes
    -----
    The optimality score is linear in the sum of positions, so its value on
    the mid-ranks is the mean of its values on the optimistic and pessimistic
    positions.
    """
    known = np.asarray(known, dtype=bool)
    mid, opt, pes, _ = tie_ranks(scores, tolerance=tolerance)
    if known.shape != mid.shape:
        raise AfpxError(f"known has shape {known.shape}, scores {mid.shape}")
    idx = np.flatnonzero(known)
    # items of one tie group share their optimistic rank; order known ones inside groups
    order = idx[np.argsort(opt[idx], kind="stable")]
    group_start = opt[order]
    _, first, n_in_group = np.unique(group_start, return_index=True, return_counts=True)
    offset = np.arange(order.size) - np.repeat(first, n_in_group)
    optimistic = np.empty(order.size, dtype=np.int64)
    pessimistic = np.empty(order.size, dtype=np.int64)
    optimistic_sorted = group_start + offset
    pessimistic_sorted = pes[order] - (np.repeat(n_in_group, n_in_group) - 1 - offset)
    # back to the order of ``idx``
    back = np.argsort(np.argsort(opt[idx], kind="stable"), kind="stable")
    optimistic[:] = optimistic_sorted[back]
    pessimistic[:] = pessimistic_sorted[back]
    return mid[idx], optimistic, pessimistic


def optimality_score(positions: np.ndarray, n_total: int) -> float:
    """The paper's optimality score of the known items in a ranked list.

    Parameters
    ----------
    positions : ndarray of shape (Q,)
        1-based positions (mid-ranks allowed) of the Q known items.
    n_total : int
        N, the length of the ranked list.

    Returns
    -------
    float
        ``OS = (N Q + Q - 2 Σ q_i) / (N Q - Q²)``: 1 when the known items fill
        the top Q positions, -1 when they fill the bottom Q, 0 in expectation
        for a random order. NaN when the score is undefined: Q = 0 (nothing
        known) or Q = N (every item known, so no order can be better than any
        other); these are counted apart in reports, never averaged in.

    Examples
    --------
    >>> optimality_score(np.array([1, 2]), 10)
    1.0
    >>> optimality_score(np.array([9, 10]), 10)
    -1.0
    """
    q = np.asarray(positions, dtype=np.float64)
    n_known = q.size
    if n_known and (q.min() < 1 or q.max() > n_total):
        raise AfpxError(f"positions must lie in 1..{n_total}, got {q.min()}..{q.max()}")
    if n_known == 0 or n_known >= n_total:
        return math.nan
    return float((n_total * n_known + n_known - 2.0 * q.sum()) / (n_total * n_known - n_known**2))


def first_known_metrics(positions: np.ndarray, hit_k: Iterable[int]) -> dict[str, float]:
    """Reciprocal rank and hit@k of the best-placed known item.

    Parameters
    ----------
    positions : ndarray of shape (Q,)
        1-based mid-ranks of the known items.
    hit_k : iterable of int
        The k of hit@k.

    Returns
    -------
    dict
        ``first_rank`` (the smallest position, NaN without known items),
        ``reciprocal_rank`` (1 / first_rank, 0 without known items) and
        ``hit@k`` (1.0 when first_rank <= k, else 0.0).
    """
    q = np.asarray(positions, dtype=np.float64)
    first = float(q.min()) if q.size else math.nan
    out = {"first_rank": first, "reciprocal_rank": 1.0 / first if q.size else 0.0}
    for k in hit_k:
        out[f"hit@{k}"] = float(q.size > 0 and first <= k)
    return out


def confusion_counts(true_z: np.ndarray, predicted_z: np.ndarray) -> np.ndarray:
    """Counts of (true element, predicted element) pairs.

    Parameters
    ----------
    true_z, predicted_z : ndarray of shape (n_sites,)
        Atomic numbers 1..118.

    Returns
    -------
    ndarray of shape (118, 118), int64
        Entry ``[Zt - 1, Zp - 1]`` counts sites of element Zt predicted as Zp.
    """
    t = np.asarray(true_z).astype(np.int64)
    p = np.asarray(predicted_z).astype(np.int64)
    if t.shape != p.shape:
        raise AfpxError(f"true and predicted elements differ in shape: {t.shape} vs {p.shape}")
    for name, a in (("true", t), ("predicted", p)):
        if a.size and (a.min() < 1 or a.max() > schema.N_ELEMENTS):
            raise AfpxError(
                f"{name} atomic numbers must lie in 1..{schema.N_ELEMENTS}, "
                f"got {a.min()}..{a.max()}"
            )
    flat = (t - 1) * schema.N_ELEMENTS + (p - 1)
    return np.bincount(flat, minlength=schema.N_ELEMENTS**2).reshape(
        schema.N_ELEMENTS, schema.N_ELEMENTS
    )


def error_rate(counts: np.ndarray) -> float:
    """Top-1 error rate of a confusion matrix: 1 - trace / total (NaN when empty)."""
    total = counts.sum()
    return float(1.0 - np.trace(counts) / total) if total else math.nan


def likelihood_histogram(
    likelihood: np.ndarray, z: np.ndarray, *, bins: int = 50
) -> tuple[np.ndarray, np.ndarray]:
    """Histograms of the likelihood of the true element and of every other element.

    Parameters
    ----------
    likelihood : ndarray of shape (n_sites, 118)
        Sigmoid likelihoods in [0, 1].
    z : ndarray of shape (n_sites,)
        True atomic numbers.
    bins : int
        Equal bins over [0, 1].

    Returns
    -------
    true : ndarray of shape (bins,), int64
        Counts of the n_sites true-element likelihoods.
    other : ndarray of shape (bins,), int64
        Counts of the n_sites × 117 other likelihoods.
    """
    lk = np.asarray(likelihood, dtype=np.float64)
    zi = np.asarray(z).astype(np.int64) - 1
    if lk.ndim != 2 or lk.shape[0] != zi.size:
        raise AfpxError(f"likelihood {lk.shape} does not match {zi.size} sites")
    idx = np.clip((lk * bins).astype(np.int64), 0, bins - 1)
    all_counts = np.bincount(idx.ravel(), minlength=bins)
    true_idx = idx[np.arange(zi.size), zi]
    true = np.bincount(true_idx, minlength=bins)
    return true, all_counts - true


def as_str_array(values: Any) -> np.ndarray:
    """Any array of labels as an object array of ``str``."""
    return np.asarray([str(v) for v in np.asarray(values).tolist()], dtype=object)


def site_arrays(ds: xr.Dataset) -> dict[str, np.ndarray]:
    """Per-site ``z``, ``draw``, ``structure``, (``coordination``) and per-structure ``split``."""
    # small per-site and per-structure arrays, loaded eagerly (see STACK-NOTES)
    out = {
        "z": np.asarray(ds[schema.Z].values).astype(np.int64),
        "draw": np.asarray(ds[schema.DRAW].values).astype(np.int64),
        "structure": np.asarray(ds[schema.STRUCTURE_INDEX].values).astype(np.int64),
        "split": as_str_array(ds[schema.SPLIT].values),
    }
    if schema.COORDINATION in ds.variables:
        out["coordination"] = np.asarray(ds[schema.COORDINATION].values).astype(np.int64)
    return out


def per_site_metrics(ds: xr.Dataset, *, bins: int = 50) -> tuple[dict[str, Any], xr.Dataset]:
    """Softmax error rate, confusion matrix and likelihood histograms per split.

    Every site of the cube (all draws) is one example, as in training.

    Parameters
    ----------
    ds : xarray.Dataset
        The cube, with ``likelihood`` and (for the error rate) ``softmax_pred``.
    bins : int
        Bins of the likelihood histograms over [0, 1].

    Returns
    -------
    metrics : dict
        Per split: ``n_sites``, ``error_rate`` (NaN without ``softmax_pred``).
    arrays : xarray.Dataset
        ``confusion`` (split, true_element, predicted_element) counts,
        ``confusion_normalised`` (rows sum to 1; NaN rows for absent elements),
        ``likelihood_histogram`` (split, kind, likelihood_bin).
    """
    import xarray as xr

    sites = site_arrays(ds)
    split_of_site = sites["split"][sites["structure"]]
    has_pred = schema.SOFTMAX_PRED in ds.variables
    pred = np.asarray(ds[schema.SOFTMAX_PRED].values).astype(np.int64) if has_pred else None
    lk_name = schema.LIKELIHOOD if schema.LIKELIHOOD in ds.variables else schema.LIKELIHOOD_MEAN
    n_el = schema.N_ELEMENTS
    confusion = np.zeros((len(schema.SPLITS), n_el, n_el), dtype=np.int64)
    hist = np.zeros((len(schema.SPLITS), 2, bins), dtype=np.int64)
    metrics: dict[str, Any] = {}
    chunk = 65536
    for i, split in enumerate(schema.SPLITS):
        idx = np.flatnonzero(split_of_site == split)
        best_lik, hit, rank = [], [], []
        for a in range(0, idx.size, chunk):
            part = idx[a : a + chunk]
            lk = np.asarray(ds[lk_name][part].values)
            t, o = likelihood_histogram(lk, sites["z"][part], bins=bins)
            hist[i, 0] += t
            hist[i, 1] += o
            rows = np.arange(part.size)
            best = lk.argmax(1)
            true = lk[rows, sites["z"][part] - 1]
            best_lik.append(lk[rows, best])
            hit.append(best == sites["z"][part] - 1)
            rank.append(1 + (lk > true[:, None]).sum(1))
        if pred is not None:
            confusion[i] = confusion_counts(sites["z"][idx], pred[idx])
        ranks = np.concatenate(rank) if rank else np.zeros(0, np.int64)
        calibration = reliability_of(
            np.concatenate(best_lik) if best_lik else np.zeros(0),
            np.concatenate(hit) if hit else np.zeros(0, bool),
        )
        metrics[split] = {
            "n_sites": int(idx.size),
            "error_rate": error_rate(confusion[i]) if pred is not None else math.nan,
            # the likelihoods that ranking multiplies: is the true element first / in the top 5?
            "likelihood_top1_error": float(np.mean(ranks > 1)) if ranks.size else math.nan,
            "likelihood_top5_error": float(np.mean(ranks > 5)) if ranks.size else math.nan,
            "likelihood_mean_rank": float(ranks.mean()) if ranks.size else math.nan,
            "likelihood_ece": calibration["ece"],
            "likelihood_reliability": calibration,
        }
    metrics["softmax_available"] = bool(has_pred)
    coords = schema.element_coords()
    row = confusion.sum(axis=2, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        normalised = np.where(row > 0, confusion / np.where(row > 0, row, 1), np.nan)
    edges = np.linspace(0.0, 1.0, bins + 1)
    arrays = xr.Dataset(
        {
            "confusion": (("split", TRUE_ELEMENT, PREDICTED_ELEMENT), confusion),
            "confusion_normalised": (("split", TRUE_ELEMENT, PREDICTED_ELEMENT), normalised),
            "likelihood_histogram": (("split", KIND, LIKELIHOOD_BIN), hist),
        },
        coords={
            "split": list(schema.SPLITS),
            TRUE_ELEMENT: coords[schema.ELEMENT][1],
            PREDICTED_ELEMENT: coords[schema.ELEMENT][1],
            f"{TRUE_ELEMENT}_symbol": (TRUE_ELEMENT, coords[schema.SYMBOL][1].astype(str)),
            f"{PREDICTED_ELEMENT}_symbol": (
                PREDICTED_ELEMENT,
                coords[schema.SYMBOL][1].astype(str),
            ),
            KIND: ["true", "other"],
            "bin_lower": (LIKELIHOOD_BIN, edges[:-1]),
            "bin_upper": (LIKELIHOOD_BIN, edges[1:]),
        },
    )
    return metrics, arrays
