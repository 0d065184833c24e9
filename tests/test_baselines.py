from __future__ import annotations

import numpy as np
import pytest

from afpx import AfpxError, schema
from afpx.baselines import (
    BASELINES,
    FEATURE_BASELINES,
    BaselineParams,
    SiteFeatures,
    baseline_likelihoods,
    constant_likelihood,
    coordination_frequency,
    coordination_likelihood,
    element_frequency,
    frequency_likelihood,
    knn_likelihood,
    mlp_likelihood,
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
    names = [b for b in BASELINES if b not in FEATURE_BASELINES]
    out = baseline_likelihoods(z, cn, train, names=names, params=BaselineParams(alpha=0.0))
    assert tuple(out) == tuple(names)
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


# -- fingerprint baselines -------------------------------------------------------


def _clusters(n_per: int = 30, seed: int = 0) -> tuple[SiteFeatures, np.ndarray, np.ndarray]:
    """Three well-separated AFP clusters carrying elements 8, 11 and 26."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, 16)) * 5
    z = np.repeat([8, 11, 26], n_per)
    afp = centres[np.repeat(np.arange(3), n_per)] + rng.normal(scale=0.1, size=(3 * n_per, 16))
    r0 = np.repeat([1.9, 2.4, 2.6], n_per) + rng.normal(scale=0.01, size=3 * n_per)
    is_train = rng.random(3 * n_per) < 0.7
    return SiteFeatures(afp, r0, np.ones(3 * n_per)), z, is_train


def test_knn_finds_the_cluster_and_leaves_one_out() -> None:
    features, z, is_train = _clusters()
    lik = knn_likelihood(features, z, is_train, k=3, components=4)
    assert lik.shape == (z.size, 118) and np.all(lik > 0)
    np.testing.assert_array_equal(lik.argmax(1) + 1, z)
    np.testing.assert_allclose(lik.sum(1), 1.0, rtol=1e-5)
    # a training site alone with its element: leave-one-out must not see its own label
    afp = np.vstack([features.afp_mean, np.full((1, 16), 100.0)])
    f2 = SiteFeatures(afp, np.append(features.r0, 2.0), np.ones(afp.shape[0]))
    z2, t2 = np.append(z, 79), np.append(is_train, True)
    lone = knn_likelihood(f2, z2, t2, k=3, components=4)[-1]
    assert lone.argmax() + 1 != 79


def _knn_brute_force(emb: np.ndarray, z: np.ndarray, is_train: np.ndarray, k: int) -> np.ndarray:
    # the obvious k nearest training sites of every site, itself left out, and the votes
    train = np.flatnonzero(is_train)
    d = np.sqrt(((emb[:, None, :] - emb[None, train, :]) ** 2).sum(-1))
    d[train, np.arange(train.size)] = np.inf
    nn = np.argsort(d, axis=1, kind="stable")[:, :k]
    dist = np.take_along_axis(d, nn, axis=1)
    w = 1.0 / (dist + 1e-6)
    w /= w.sum(1, keepdims=True)
    prior = element_frequency(z[train])
    votes = np.zeros((z.size, 118))
    for i in range(z.size):
        for j in range(k):
            votes[i, z[train][nn[i, j]] - 1] += w[i, j]
    return (votes + 0.1 * prior) / 1.1


@pytest.mark.parametrize("components", [2, 4])
def test_knn_equals_brute_force_neighbours(components: int) -> None:
    def standardise(v: np.ndarray) -> np.ndarray:
        std = v[is_train].std(0)
        return (v - v[is_train].mean(0)) / np.where(std > 0, std, 1.0)

    rng = np.random.default_rng(components)
    n = 150
    features = SiteFeatures(
        rng.normal(size=(n, 12)), rng.uniform(1.5, 3.0, n), rng.uniform(0.8, 1.0, n)
    )
    z = rng.choice([3, 8, 25, 32], size=n)
    is_train = rng.random(n) < 0.6
    got = knn_likelihood(features, z, is_train, k=4, components=components, n_jobs=1)
    # the embedding, written out again: PCs of the standardised AFP, scaled size features
    x = features.matrix()
    afp = standardise(x[:, :-2])
    vt = np.linalg.svd(afp[np.flatnonzero(is_train)], full_matrices=False)[2]
    pcs = afp @ vt[:components].T
    emb = np.hstack([pcs, standardise(x[:, -2:]) * pcs[is_train, 0].std()])
    want = _knn_brute_force(emb.astype(np.float32).astype(np.float64), z, is_train, 4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    # the number of query threads changes nothing
    np.testing.assert_array_equal(
        got, knn_likelihood(features, z, is_train, k=4, components=components, n_jobs=2)
    )


def test_mlp_baseline_learns_separable_sites() -> None:
    features, z, is_train = _clusters()
    params = BaselineParams(mlp_hidden=32, mlp_layers=2, mlp_epochs=30, mlp_batch_size=16)
    lik = mlp_likelihood(features, z, is_train, params=params)
    assert lik.shape == (z.size, 118) and np.all(lik > 0)
    np.testing.assert_allclose(lik.sum(1), 1.0, rtol=1e-4)
    assert (lik[~is_train].argmax(1) + 1 == z[~is_train]).mean() == 1.0
    again = mlp_likelihood(features, z, is_train, params=params)
    np.testing.assert_array_equal(lik, again)  # seeded


def test_baselines_are_tasks_and_the_same_on_every_scheduler() -> None:
    # one Dask task per baseline (knn and mlp side by side); one BLAS and one torch
    # thread in each: a 2-process cluster gives the threaded scheduler's numbers bit
    # for bit, and the caller's torch threads are left as they were
    distributed = pytest.importorskip("distributed")
    torch = pytest.importorskip("torch")
    from afpx.scheduler import use_scheduler

    features, z, is_train = _clusters()
    cn = np.where(z == 8, 2, 6)
    params = BaselineParams(mlp_hidden=16, mlp_layers=1, mlp_epochs=3, mlp_batch_size=16)
    torch.set_num_threads(2)
    timing: dict[str, float] = {}
    with use_scheduler("threads", workers=2):
        threads = baseline_likelihoods(
            z, cn, is_train, params=params, features=features, timing=timing
        )
    assert torch.get_num_threads() == 2
    assert tuple(threads) == BASELINES
    assert set(timing) == {f"{b}_{t}" for b in BASELINES for t in ("s", "cpu_s")}
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
        distributed.get_task_stream(client) as stream,
    ):
        on_cluster = baseline_likelihoods(z, cn, is_train, params=params, features=features)
    keys = {str(t["key"]).rsplit("-", 1)[0] for t in stream.data}
    assert keys >= {f"baseline-{b}" for b in BASELINES}
    for name in BASELINES:
        np.testing.assert_array_equal(threads[name], on_cluster[name], err_msg=name)


def test_fingerprint_baseline_errors() -> None:
    features, z, is_train = _clusters()
    with pytest.raises(AfpxError, match="read the fingerprints"):
        baseline_likelihoods(z, np.zeros_like(z), is_train, names=["knn"])
    with pytest.raises(AfpxError, match="more than k=10 training sites"):
        knn_likelihood(features, z, np.arange(z.size) < 5)
    with pytest.raises(AfpxError, match="k >= 1"):
        knn_likelihood(features, z, is_train, k=0)
    with pytest.raises(AfpxError, match="disagree in length"):
        SiteFeatures(features.afp_mean, features.r0[:3], features.dmin_ratio).matrix()
    with pytest.raises(AfpxError, match="r0 must be positive"):
        SiteFeatures(features.afp_mean, -features.r0, features.dmin_ratio).matrix()
    with pytest.raises(AfpxError, match="needs training sites"):
        mlp_likelihood(features, z, np.zeros(z.size, bool))
    out = baseline_likelihoods(
        z,
        np.zeros_like(z),
        is_train,
        names=["knn", "mlp"],
        params=BaselineParams(knn_k=3, mlp_epochs=2, mlp_hidden=8, mlp_layers=1),
        features=features,
    )
    assert set(out) == {"knn", "mlp"}


def test_baseline_inputs_are_sent_to_a_cluster_once() -> None:
    # the sites' arrays and fingerprints are scattered, not embedded in every task:
    # distributed warns about a graph above 10 MB, and six tasks would carry ~6 copies
    import warnings

    distributed = pytest.importorskip("distributed")
    rng = np.random.default_rng(0)
    n = 60_000
    features = SiteFeatures(
        rng.normal(size=(n, 48)).astype(np.float32), rng.uniform(1.5, 3.0, n), np.ones(n)
    )
    z, cn, is_train = rng.integers(1, 90, n), rng.integers(1, 12, n), rng.random(n) < 0.6
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster),
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        out = baseline_likelihoods(
            z, cn, is_train, names=("constant", "frequency"), features=features
        )
    assert not [w for w in caught if "large graph" in str(w.message)]
    np.testing.assert_array_equal(out["constant"], constant_likelihood(n))
