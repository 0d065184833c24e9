"""What is scored: the model's likelihoods (from the cube or a model folder) and the baselines'.

This is the only evaluation module that loads a model (:func:`with_model_likelihoods`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from afpx import AfpxError, schema

if TYPE_CHECKING:
    import xarray as xr

    from afpx.baselines import BaselineParams, SiteFeatures
    from afpx.templates.library import TemplateLibrary

__all__ = ["scored_libraries", "with_model_likelihoods"]


def with_model_likelihoods(
    ds: xr.Dataset,
    model: str | os.PathLike[str],
    *,
    device: str = "cpu",
    block_sites: int = 8192,
    batch_size: int = 2048,
) -> xr.Dataset:
    """The cube with ``likelihood`` (and ``likelihood_mean``, ``softmax_pred``) of a model.

    The sites are scored in memory, block by block; the cube's store is not
    written (``afpx likelihood`` writes them into the store instead).

    Parameters
    ----------
    ds : xarray.Dataset
        The cube, with ``afp``, ``r0``, ``dmin_ratio`` and ``draw``.
    model : path
        A model folder written by ``afpx train``.
    device : {"cpu", "cuda"}
    block_sites : int
        Sites read at a time (never splitting the draws of a unique site).
    batch_size : int
        Sites per forward pass.

    Returns
    -------
    xarray.Dataset
        ``ds`` with the three variables replaced, attributes identifying the model.
    """
    from afpx.checkpoint import check_fingerprint, load_model
    from afpx.likelihood import dataset_context, draw_means, score_afp

    schema.require_variables(
        ds,
        [schema.AFP, schema.R0, schema.DMIN_RATIO, schema.DRAW],
        what="scoring a cube with a model",
        fix="build it with `afpx build-cube`",
    )
    m = load_model(model, device=device)
    check_fingerprint(m.fingerprint, dict(ds.attrs.get("fingerprint", {})), cube="the cube")
    draw = np.asarray(ds[schema.DRAW].values).astype(np.int64)
    context = dataset_context(ds, m)
    n = draw.size
    starts = np.append(np.flatnonzero(draw == 0), n)
    lik = np.empty((n, schema.N_ELEMENTS), dtype=np.float32)
    pred = np.empty(n, dtype=np.int16)
    a = 0
    while a < n:
        i = min(int(np.searchsorted(starts, a + block_sites)), starts.size - 1)
        b = int(starts[i])
        b = n if b <= a else b
        lik[a:b], pred[a:b] = score_afp(
            m,
            np.asarray(ds[schema.AFP][a:b].values),
            np.asarray(ds[schema.R0][a:b].values),
            np.asarray(ds[schema.DMIN_RATIO][a:b].values),
            context=None if context is None else context[a:b],
            batch_size=batch_size,
            device=device,
        )
        a = b
    attrs = {**m.identity(), "complete": True, "scored_in_memory": True}
    dims = (schema.SITE, schema.ELEMENT)
    out = ds.drop_vars(
        [v for v in (schema.LIKELIHOOD, schema.LIKELIHOOD_MEAN, schema.SOFTMAX_PRED) if v in ds]
    ).assign(
        {
            schema.LIKELIHOOD: (dims, lik, attrs),
            schema.SOFTMAX_PRED: ((schema.SITE,), pred, attrs),
        }
    )
    if n and int(draw.max()) > 0:
        out[schema.LIKELIHOOD_MEAN] = (dims, draw_means(lik, draw), attrs)
    return out


def site_features(ds: xr.Dataset, sites: np.ndarray) -> SiteFeatures:
    """What the ``knn`` and ``mlp`` baselines read of the given sites of a cube.

    The AFP is averaged over perspectives block by block (lazy cube, bounded memory).
    """
    from afpx.baselines import SiteFeatures

    afp = ds[schema.AFP].isel({schema.SITE: sites}).mean(schema.PERSPECTIVE)
    return SiteFeatures(
        np.asarray(afp.values, dtype=np.float32),
        np.asarray(ds[schema.R0].values)[sites],
        np.asarray(ds[schema.DMIN_RATIO].values)[sites],
    )


def scored_libraries(
    library: TemplateLibrary,
    sites: dict[str, np.ndarray],
    baselines: Sequence[str],
    baseline_params: BaselineParams,
    ds: xr.Dataset | None = None,
    *,
    timing: dict[str, float] | None = None,
) -> dict[str, TemplateLibrary]:
    """The model's library and one library per baseline, same templates, other likelihoods.

    Parameters
    ----------
    library : TemplateLibrary
        The cube's templates with the model's likelihoods.
    sites : dict
        :func:`afpx.evaluate.metrics.site_arrays` of the cube.
    baselines : sequence of str
        Names passed to :func:`afpx.baselines.baseline_likelihoods`; every
        baseline it returns is scored, under the name it returns.
    baseline_params : BaselineParams
    ds : xarray.Dataset, optional
        The cube: the ``knn`` and ``mlp`` baselines read its fingerprints.
    timing : dict, optional
        Filled with the seconds of reading the fingerprints (``features_s``)
        and of each baseline (``<name>_s``).

    Returns
    -------
    dict
        ``"model"`` first, then each baseline by name.
    """
    from afpx.baselines import FEATURE_BASELINES, baseline_likelihoods

    # the library's sites: draw 0, grouped by structure (as TemplateLibrary.from_cube orders them)
    draw0 = np.flatnonzero(sites["draw"] == 0)
    draw0 = draw0[np.argsort(sites["structure"][draw0], kind="stable")]
    if draw0.size != library.z.size or not np.array_equal(sites["z"][draw0], library.z):
        raise AfpxError("the template library's sites are not the cube's draw-0 sites in order")
    if "coordination" not in sites and any(b == "coordination" for b in baselines):
        raise AfpxError("the coordination baseline needs `coordination`, which the cube lacks")
    coordination = sites.get("coordination", np.zeros_like(sites["z"]))[draw0]
    is_train = sites["split"][sites["structure"][draw0]] == "train"
    t0 = time.perf_counter()
    features = (
        site_features(ds, draw0)
        if ds is not None and any(b in FEATURE_BASELINES for b in baselines)
        else None
    )
    if timing is not None:
        timing["features_s"] = time.perf_counter() - t0
    base = baseline_likelihoods(
        library.z,
        coordination,
        is_train,
        names=tuple(baselines),
        params=baseline_params,
        features=features,
        timing=timing,
    )
    libraries: dict[str, TemplateLibrary] = {"model": library}
    libraries.update({name: library.with_likelihood(lk) for name, lk in base.items()})
    return libraries
