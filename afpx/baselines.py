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
``knn``                   distance-weighted vote of the k nearest training sites in the
                          space of the AFP's principal components, log r0 and dmin_ratio
                          (leave-one-out on training sites), shrunk towards P(e)
``mlp``                   softmax output of a plain MLP (3 × 512, ELU) on the standardised
                          perspective-averaged AFP, log r0 and dmin_ratio, trained with
                          cross-entropy on the training sites (needs torch)
========================  =================================================================

``knn`` and ``mlp`` are the strongest simple competitors on the same
fingerprints; they need the sites' features (:class:`SiteFeatures`).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final

import numpy as np

from afpx import AfpxError, schema

logger = logging.getLogger(__name__)

#: Names of the baselines, in the order they are reported.
BASELINES: Final = ("constant", "random", "frequency", "coordination", "knn", "mlp")
#: Baselines that read the fingerprints (and need :class:`SiteFeatures`).
FEATURE_BASELINES: Final = ("knn", "mlp")


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
    knn_k, knn_components, knn_prior : int, int, float
        Neighbours, principal components of the AFP, and the weight of P(e)
        added to the neighbours' votes (whose weights sum to 1).
    mlp_hidden, mlp_layers, mlp_epochs, mlp_batch_size, mlp_lr
        Width, hidden layers, epochs, batch size and Adam learning rate of the
        plain MLP (natural sampling, no schedule, seeded by ``seed``).
    """

    constant: float = 0.5
    seed: int = 0
    alpha: float = 1.0
    beta: float = 10.0
    knn_k: int = 10
    knn_components: int = 64
    knn_prior: float = 0.1
    mlp_hidden: int = 512
    mlp_layers: int = 3
    mlp_epochs: int = 12
    mlp_batch_size: int = 256
    mlp_lr: float = 1e-3

    def to_attrs(self) -> dict[str, Any]:
        """The parameters as a JSON-able dict."""
        return asdict(self)


@dataclass(frozen=True)
class SiteFeatures:
    """What the fingerprint baselines read of each site.

    Attributes
    ----------
    afp_mean : ndarray of shape (n_sites, n_bins)
        Perspective-averaged AFP.
    r0, dmin_ratio : ndarray of shape (n_sites,)
    """

    afp_mean: np.ndarray
    r0: np.ndarray
    dmin_ratio: np.ndarray

    def matrix(self) -> np.ndarray:
        """``[afp_mean, log r0, dmin_ratio]`` as one (n_sites, n_bins + 2) float64 array."""
        afp = np.asarray(self.afp_mean, dtype=np.float64)
        r0 = np.asarray(self.r0, dtype=np.float64).reshape(-1, 1)
        d = np.asarray(self.dmin_ratio, dtype=np.float64).reshape(-1, 1)
        if not (afp.ndim == 2 and afp.shape[0] == r0.shape[0] == d.shape[0]):
            raise AfpxError(
                f"site features disagree in length: afp_mean {afp.shape}, r0 {r0.shape[0]}, "
                f"dmin_ratio {d.shape[0]}"
            )
        if r0.size and not np.all(r0 > 0):
            raise AfpxError("r0 must be positive on every site")
        return np.hstack([afp, np.log(r0), d])


def _standardise(x: np.ndarray, fit: np.ndarray) -> np.ndarray:
    mean, std = x[fit].mean(0), x[fit].std(0)
    return (x - mean) / np.where(std > 0, std, 1.0)


def knn_likelihood(
    features: SiteFeatures,
    z: np.ndarray,
    is_train: np.ndarray,
    *,
    k: int = 10,
    components: int = 64,
    prior_weight: float = 0.1,
    alpha: float = 1.0,
    n_jobs: int = -1,
) -> np.ndarray:
    """Distance-weighted k-nearest-neighbour site likelihoods.

    Parameters
    ----------
    features : SiteFeatures
    z : ndarray of shape (n_sites,)
        Atomic numbers (read only on training sites).
    is_train : ndarray of shape (n_sites,), bool
    k, components, prior_weight, alpha
        See :class:`BaselineParams`.
    n_jobs : int
        Threads of the neighbour queries (-1: every core); the result does not
        depend on it.

    Returns
    -------
    ndarray of shape (n_sites, 118), float32

    Notes
    -----
    The AFP is standardised per bin on the training sites and projected on
    its first ``components`` principal components; log r0 and dmin_ratio,
    standardised, are scaled to the spread of the first component so that size
    counts as much as the leading shape feature. With neighbour distances
    ``d_j`` and weights ``w_j ∝ 1 / (d_j + ε)`` summing to 1::

        L(e) = (Σ_j w_j [z_j = e] + λ P(e)) / (1 + λ)

    A training site never counts as its own neighbour (leave-one-out), so its
    likelihoods are as honest as a test site's. The neighbours are exact
    (Euclidean, in float64 on the float32 embedding): one k-d tree of the
    training sites (:class:`scipy.spatial.cKDTree`) answers every query; the
    embedding's intrinsic dimension is low (the first 16 components carry 94 %
    of the AFP's variance on oqmd-icsd), which is what makes the tree fast.
    """
    from scipy.spatial import cKDTree

    is_train = np.asarray(is_train, dtype=bool)
    z = np.asarray(z)
    if k < 1 or components < 1 or prior_weight < 0:
        raise AfpxError("knn needs k >= 1, components >= 1 and prior_weight >= 0")
    train = np.flatnonzero(is_train)
    if train.size <= k:
        raise AfpxError(f"the knn baseline needs more than k={k} training sites, got {train.size}")
    zt = _check_z(z[train])
    x = features.matrix()
    afp = _standardise(x[:, :-2], is_train)
    rng = np.random.default_rng(0)
    sample = train if train.size <= 20_000 else rng.choice(train, 20_000, replace=False)
    _, _, vt = np.linalg.svd(afp[sample], full_matrices=False)
    pcs = afp @ vt[: min(components, vt.shape[0])].T
    scale = pcs[train, 0].std() or 1.0
    emb = np.hstack([pcs, _standardise(x[:, -2:], is_train) * scale]).astype(np.float32)
    emb64 = emb.astype(np.float64)
    prior = element_frequency(zt, alpha=alpha)
    tree = cKDTree(emb64[train])
    # k + 1 neighbours: a training site finds itself (at distance 0) and drops it
    dist, nn = tree.query(emb64, k=k + 1, workers=n_jobs)
    own = np.full(len(z), -1, np.int64)
    own[train] = np.arange(train.size)
    is_self = nn == own[:, None]
    # drop the site itself where found, else the farthest of the k + 1
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k)
    keep = np.ones(nn.shape, dtype=bool)
    keep[np.arange(len(z)), drop] = False
    nn = nn[keep].reshape(len(z), k)
    dist = dist[keep].reshape(len(z), k)
    w = 1.0 / (dist + 1e-6)
    w /= w.sum(1, keepdims=True)
    votes = np.zeros((len(z), schema.N_ELEMENTS))
    np.add.at(votes, (np.repeat(np.arange(len(z)), k), zt[nn].ravel() - 1), w.ravel())
    return ((votes + prior_weight * prior) / (1.0 + prior_weight)).astype(np.float32)


def mlp_likelihood(
    features: SiteFeatures,
    z: np.ndarray,
    is_train: np.ndarray,
    *,
    params: BaselineParams | None = None,
) -> np.ndarray:
    """Softmax probabilities of a plain MLP trained on the training sites.

    Parameters
    ----------
    features : SiteFeatures
    z : ndarray of shape (n_sites,)
    is_train : ndarray of shape (n_sites,), bool
    params : BaselineParams, optional
        ``mlp_*`` fields and ``seed``.

    Returns
    -------
    ndarray of shape (n_sites, 118), float32
        Rows sum to 1; every entry is at least 1e-7 (no zero likelihoods).
    """
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - torch is installed in tests
        raise AfpxError(
            'the mlp baseline needs torch: pip install "afpx[train]" (or leave out "mlp")'
        ) from exc
    p = params or BaselineParams()
    is_train = np.asarray(is_train, dtype=bool)
    train = np.flatnonzero(is_train)
    if train.size == 0:
        raise AfpxError("the mlp baseline needs training sites, and none are marked train")
    threads = torch.get_num_threads()
    # one thread: the same weights on every scheduler and core count (a local
    # cluster's workers have one); restored after
    torch.set_num_threads(1)
    try:
        return _train_mlp(features, z, train, is_train, p)
    finally:
        torch.set_num_threads(threads)


def _train_mlp(
    features: SiteFeatures,
    z: np.ndarray,
    train: np.ndarray,
    is_train: np.ndarray,
    p: BaselineParams,
) -> np.ndarray:
    import torch
    from torch import nn

    target = torch.from_numpy(_check_z(np.asarray(z)[train]) - 1)
    x = torch.from_numpy(_standardise(features.matrix(), is_train).astype(np.float32))
    gen = torch.Generator().manual_seed(p.seed)
    layers: list[nn.Module] = []
    width = x.shape[1]
    with torch.random.fork_rng():  # seeded initialisation, global RNG untouched
        torch.manual_seed(p.seed)
        for _ in range(p.mlp_layers):
            layers += [nn.Linear(width, p.mlp_hidden), nn.ELU()]
            width = p.mlp_hidden
        layers.append(nn.Linear(width, schema.N_ELEMENTS))
        net = nn.Sequential(*layers)
    opt = torch.optim.Adam(net.parameters(), lr=p.mlp_lr)
    xt = x[torch.from_numpy(train)]
    for _ in range(p.mlp_epochs):
        order = torch.randperm(len(train), generator=gen)
        for a in range(0, len(train), p.mlp_batch_size):
            b = order[a : a + p.mlp_batch_size]
            loss = nn.functional.cross_entropy(net(xt[b]), target[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    out = np.empty((x.shape[0], schema.N_ELEMENTS), np.float32)
    net.eval()
    with torch.no_grad():
        for a in range(0, x.shape[0], 8192):
            out[a : a + 8192] = torch.softmax(net(x[a : a + 8192]), dim=1).numpy()
    return np.maximum(out, 1e-7)


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
    features: SiteFeatures | None = None,
    timing: dict[str, float] | None = None,
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
    features : SiteFeatures, optional
        The sites' fingerprints and descriptors, needed by ``knn`` and ``mlp``.
    timing : dict, optional
        Filled with the seconds each baseline took (``"<name>_s"``) and the
        CPU seconds of the thread that computed it (``"<name>_cpu_s"``; the
        threads of knn's tree query are not counted).

    Notes
    -----
    Each baseline is one Dask task on the current scheduler
    (:func:`afpx.scheduler.compute`), so knn and mlp, the slow ones, run side
    by side. Every task uses one BLAS thread and mlp one torch thread: the
    likelihoods are the same on every scheduler and machine.

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
    if not is_train.any() and any(n != "constant" and n != "random" for n in names):
        raise AfpxError("the learned baselines need training sites, and none are marked train")
    wanted = [n for n in names if n in FEATURE_BASELINES]
    if wanted and features is None:
        raise AfpxError(
            f"the {', '.join(wanted)} baseline(s) read the fingerprints: pass features="
            "SiteFeatures(afp_mean, r0, dmin_ratio)"
        )
    import dask
    from threadpoolctl import threadpool_limits

    from afpx.scheduler import active_client, compute

    # one task per baseline on the current scheduler: knn and mlp, the slow ones,
    # run side by side (on a local cluster each in its own worker). One BLAS thread
    # in the caller and in every task, so that the numbers are the same everywhere.
    run = uuid.uuid4().hex  # keys of their own: another run on the same cluster may be going
    inputs: Any = _Inputs(z, coordination, is_train, features)
    client = active_client()
    if client is not None:
        # sent once to the workers, not embedded in every task (~30 MB of fingerprints)
        inputs = client.scatter(inputs, hash=False)
    tasks = {
        name: dask.delayed(_one_baseline, pure=False)(
            name, inputs, params, dask_key_name=f"baseline-{name}-{run}"
        )
        for name in names
    }
    try:
        with threadpool_limits(1):
            (results,) = compute(tasks)
    finally:
        if client is not None:
            inputs.release()
    out: dict[str, np.ndarray] = {}
    for name in names:
        out[name], seconds, cpu = results[name]
        logger.info("baseline %s: %.1f s (%.1f s CPU)", name, seconds, cpu)
        if timing is not None:
            timing[f"{name}_s"] = seconds
            timing[f"{name}_cpu_s"] = cpu
    return out


@dataclass(frozen=True)
class _Inputs:
    """What every baseline task reads (one object, sent once to a cluster)."""

    z: np.ndarray
    coordination: np.ndarray
    is_train: np.ndarray
    features: SiteFeatures | None


def _one_baseline(
    name: str, inputs: _Inputs, params: BaselineParams
) -> tuple[np.ndarray, float, float]:
    """One baseline's likelihoods, its wall seconds and the CPU seconds of its thread."""
    from afpx.scheduler import one_blas_thread

    z, coordination, is_train, features = (
        inputs.z,
        inputs.coordination,
        inputs.is_train,
        inputs.features,
    )

    t0, c0 = time.perf_counter(), time.thread_time()
    with one_blas_thread():
        if name == "constant":
            out = constant_likelihood(z.size, value=params.constant)
        elif name == "random":
            out = random_likelihood(z.size, rng=np.random.default_rng(params.seed))
        elif name == "frequency":
            out = frequency_likelihood(z.size, element_frequency(z[is_train], alpha=params.alpha))
        elif name == "knn":
            assert features is not None
            out = knn_likelihood(
                features,
                z,
                is_train,
                k=params.knn_k,
                components=params.knn_components,
                prior_weight=params.knn_prior,
                alpha=params.alpha,
            )
        elif name == "mlp":
            assert features is not None
            out = mlp_likelihood(features, z, is_train, params=params)
        else:
            table, prior = coordination_frequency(
                z[is_train], coordination[is_train], alpha=params.alpha, beta=params.beta
            )
            out = coordination_likelihood(coordination, table, prior)
    return out, time.perf_counter() - t0, time.thread_time() - c0
