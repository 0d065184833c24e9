"""Site likelihoods: the trained network over every site of a cube, written back.

:func:`predict` runs the sigmoid classifier over every site of a cube, one
block of sites at a time (memory bounded by ``block_sites``), and writes into
the cube's store, next to ``afp`` (which it never touches):

``likelihood`` (site, element) float32
    sigmoid output of the network for Z = 1..118 on each site, in [0, 1].
``likelihood_mean`` (site, element) float32, only when the cube has draws > 1
    for each site, the mean of ``likelihood`` over all draws of its unique
    site (identical for every draw of one unique site). Ranking uses it when
    present, else ``likelihood``, on the sites with ``draw == 0``
    (:func:`site_likelihood`).
``softmax_pred`` (site) int16
    atomic number predicted by the auxiliary softmax classifier (evaluation).

Each variable's attributes identify the model (path, SHA-256 of its weights,
preset, configuration) and say whether the write completed.

:func:`score_afp` scores fingerprints held in memory, and
:func:`score_structures` scores the unique sites of pymatgen structures.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import uuid
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from afpx import AfpxError, schema
from afpx.features import (
    SHELL_GEOMETRY,
    context_width,
    shell_pairs,
    site_context,
    stored_shell_pairs,
)

if TYPE_CHECKING:
    import xarray as xr

    from afpx.checkpoint import TrainedModel

log = logging.getLogger(__name__)

#: The command that creates the likelihoods, for error messages.
FIX = "run `afpx likelihood CUBE --model MODEL` first"


def _load(model: str | os.PathLike[str] | TrainedModel, device: str) -> TrainedModel:
    from afpx.checkpoint import TrainedModel, load_model

    if isinstance(model, TrainedModel):
        return model
    return load_model(model, device=device)


def score_afp(
    model: str | os.PathLike[str] | TrainedModel,
    afp: np.ndarray,
    r0: np.ndarray,
    dmin_ratio: np.ndarray,
    *,
    context: np.ndarray | None = None,
    batch_size: int = 2048,
    device: str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Site likelihoods and softmax predictions of fingerprints in memory.

    Parameters
    ----------
    model : path or TrainedModel
        A model folder written by ``afpx train``, or a loaded model.
    afp : ndarray of shape (n, 12, 256)
    r0, dmin_ratio : ndarray of shape (n,)
    context : ndarray of shape (n, width), optional
        Template context of the sites (:func:`afpx.features.site_context`,
        computed over whole structures, with ``shell_pairs`` for a
        ``context_shell`` model); required by models that read it.
    batch_size : int
        Sites per forward pass.
    device : {"cpu", "cuda"}

    Returns
    -------
    likelihood : ndarray of shape (n, 118) float32
        Sigmoid output for Z = 1..118, in [0, 1].
    softmax_pred : ndarray of shape (n,) int16
        Atomic number predicted by the auxiliary softmax classifier.
    """
    import torch

    m = _load(model, device)
    afp = np.ascontiguousarray(afp, dtype=np.float32)
    if afp.ndim != 3 or afp.shape[1:] != (m.config.n_perspectives, m.config.n_bins):
        raise AfpxError(
            f"afp has shape {afp.shape}, expected (n, {m.config.n_perspectives}, {m.config.n_bins})"
        )
    r0 = np.ascontiguousarray(r0, dtype=np.float32).reshape(-1)
    dmin_ratio = np.ascontiguousarray(dmin_ratio, dtype=np.float32).reshape(-1)
    if not len(r0) == len(dmin_ratio) == len(afp):
        raise AfpxError(
            f"afp, r0 and dmin_ratio have {len(afp)}, {len(r0)}, {len(dmin_ratio)} sites"
        )
    if m.needs_context:
        if context is None:
            raise AfpxError(
                "this model reads the template context of each site; pass "
                "context=afpx.features.site_context(...) computed over whole structures"
            )
        context = np.ascontiguousarray(context, dtype=np.float32)
        if context.shape[0] != len(afp):
            raise AfpxError(f"context has {context.shape[0]} rows for {len(afp)} sites")
        width = context_width(m.config.n_bins, shell=m.needs_shell)
        if context.ndim != 2 or context.shape[1] != width:
            raise AfpxError(
                f"context has shape {context.shape}, this model reads {width} columns per site: "
                + (
                    "pass shell_pairs to site_context"
                    if m.needs_shell
                    else "call site_context without shell_pairs"
                )
            )
    dev = next(m.net.parameters()).device
    m.net.eval()
    lik = np.empty((len(afp), m.config.n_elements), np.float32)
    pred = np.empty(len(afp), np.int16)
    with torch.no_grad():
        for a in range(0, len(afp), batch_size):
            b = a + batch_size
            out = m.net(
                torch.from_numpy(afp[a:b]).to(dev),
                torch.from_numpy(r0[a:b]).to(dev),
                torch.from_numpy(dmin_ratio[a:b]).to(dev),
                None if context is None else torch.from_numpy(context[a:b]).to(dev),
            )
            lik[a:b] = torch.sigmoid(out.sigmoid_logits).cpu().numpy()
            pred[a:b] = (out.softmax_logits.argmax(1) + 1).cpu().numpy().astype(np.int16)
    return lik, pred


def dataset_context(ds: xr.Dataset, model: TrainedModel) -> np.ndarray | None:
    """Template context of every site of a cube opened as a Dataset, if ``model`` reads it.

    Parameters
    ----------
    ds : xarray.Dataset
        A cube (lazy is fine: the AFP is averaged over perspectives block by block);
        for a ``context_shell`` model, with its template geometry.
    model : TrainedModel

    Returns
    -------
    ndarray of shape (n_sites, width) float32, or None
    """
    if not model.needs_context:
        return None
    names = [
        schema.AFP,
        schema.R0,
        schema.DMIN_RATIO,
        schema.MULTIPLICITY,
        schema.COORDINATION,
        schema.STRUCTURE_INDEX,
    ]
    shell = model.needs_shell
    schema.require_variables(
        ds,
        names + (list(SHELL_GEOMETRY) if shell else []),
        what="the template context",
        fix="rebuild it with `afpx build-cube`",
    )
    afp_mean = np.asarray(ds[schema.AFP].mean(schema.PERSPECTIVE).values)
    r0, dmin, mult, cn, structure = (np.asarray(ds[n].values) for n in names[1:])
    draw = np.asarray(ds[schema.DRAW].values) if schema.DRAW in ds.variables else None
    pairs = stored_shell_pairs(ds, structure, draw) if shell else None
    return site_context(afp_mean, r0, dmin, mult, cn, structure, draw, pairs)


def _block_ends(
    draw: np.ndarray, block_sites: int, chunk: int | None = None
) -> list[tuple[int, int]]:
    """Blocks of about ``block_sites`` sites that never split the draws of a unique site.

    With ``chunk``, every block but the last also ends on a multiple of
    ``chunk`` (a zarr chunk boundary), so that blocks written in parallel never
    share a chunk; blocks then hold at least one chunk.
    """
    n = len(draw)
    starts = np.flatnonzero(draw == 0)
    if len(starts) == 0 or starts[0] != 0:
        starts = np.concatenate([[0], starts])
    if chunk is not None:
        starts = starts[starts % chunk == 0]
        block_sites = max(block_sites, chunk)
    blocks, a = [], 0
    while a < n:
        target = a + block_sites
        if target >= n:
            b = n
        else:
            i = int(np.searchsorted(starts, target))
            b = int(starts[i]) if i < len(starts) else n
        blocks.append((a, b))
        a = b
    return blocks


def draw_means(values: np.ndarray, draw: np.ndarray) -> np.ndarray:
    """Mean of ``values`` over the consecutive draws of each unique site.

    Parameters
    ----------
    values : ndarray of shape (n, k)
    draw : ndarray of shape (n,)
        Draw index of each site; a new unique site starts where ``draw == 0``.

    Returns
    -------
    ndarray of shape (n, k)
        For every site, the mean over its unique site's draws.
    """
    group = np.cumsum(draw == 0) - 1
    if len(group) and group[0] < 0:
        group = group - group[0]
    n_groups = int(group.max()) + 1 if len(group) else 0
    sums = np.zeros((n_groups, values.shape[1]), np.float64)
    np.add.at(sums, group, values)
    counts = np.bincount(group, minlength=n_groups)[:, None]
    return (sums / counts)[group].astype(values.dtype)


#: Suffixes of the arrays of a likelihood write in progress, and of the ones it replaces.
PARTIAL_SUFFIX = "__partial"
OLD_SUFFIX = "__replaced"
LOCK_SUFFIX = ".afpx-likelihood.lock"


def lock_path(cube: str | os.PathLike[str]) -> str:
    """The lock file of a likelihood write: a hidden sibling of the cube (zarr ignores it)."""
    head, tail = os.path.split(os.path.normpath(os.fspath(cube)))
    return os.path.join(head, f".{tail}{LOCK_SUFFIX}")


def _remove_array(path: str, name: str) -> None:
    import shutil

    shutil.rmtree(os.path.join(path, name), ignore_errors=True)


@contextlib.contextmanager
def _writer_lock(path: str) -> Iterator[None]:
    """Hold the cube's lock file (:func:`lock_path`) while writing; refuse a second writer.

    A lock left by a process that no longer runs (killed) is taken over.
    """
    lock = lock_path(path)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(lock) as f:
                    pid = int(f.read().strip() or "0")
            except (OSError, ValueError):
                pid = 0
            if pid and _alive(pid):
                raise AfpxError(
                    f"another `afpx likelihood` (process {pid}) is writing into {path!r}; "
                    f"wait for it to finish (or remove {lock} if no such process runs)"
                ) from None
            os.unlink(lock)  # stale: its writer was killed
            continue
        except OSError as exc:
            raise AfpxError(f"cannot write into the cube {path!r}: {exc.strerror or exc}") from exc
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        break
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _store_is_consolidated(path: str) -> bool:
    import zarr

    try:
        g = zarr.open_group(path, mode="r")
        meta = getattr(g, "metadata", None)
        return getattr(meta, "consolidated_metadata", None) is not None
    except Exception:  # pragma: no cover - v2 stores
        return False


def _score_block(
    path: str,
    names: dict[str, str],
    a: int,
    b: int,
    model: TrainedModel,
    r0: np.ndarray,
    dmin_ratio: np.ndarray,
    context: np.ndarray | None,
    draw: np.ndarray | None,
    batch_size: int,
) -> tuple[int, int] | None:
    """Score sites ``a:b`` of the cube at ``path`` and write them (one Dask task).

    ``names`` maps each output (``likelihood``, ``softmax_pred``, optionally
    ``likelihood_mean``) to the array it is written to. Returns ``(a, b)``
    without writing when the model gives a non-finite likelihood, else None.
    """
    from afpx.store import open_group

    group = open_group(path, mode="r+")
    afp = np.asarray(group[schema.AFP][a:b], dtype=np.float32)
    lik, pred = score_afp(model, afp, r0, dmin_ratio, context=context, batch_size=batch_size)
    if not np.all(np.isfinite(lik)):
        return (a, b)
    group[names[schema.LIKELIHOOD]][a:b] = lik
    group[names[schema.SOFTMAX_PRED]][a:b] = pred
    if draw is not None:
        group[names[schema.LIKELIHOOD_MEAN]][a:b] = draw_means(lik, draw)
    return None


def predict(
    cube: str | os.PathLike[str],
    model: str | os.PathLike[str] | TrainedModel,
    *,
    block_sites: int = 8192,
    batch_size: int = 2048,
    device: str = "cpu",
    progress: bool | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
) -> xr.Dataset:
    """Write ``likelihood``, ``softmax_pred`` (and ``likelihood_mean``) into a cube.

    Every block of sites is one Dask task that reads its fingerprints, scores
    them and writes its rows (blocks end on zarr chunk boundaries, so tasks
    never write the same chunk); the tasks run on the current Dask scheduler
    or the one ``scheduler``/``workers`` name (:func:`afpx.scheduler.use_scheduler`).
    The values do not depend on the scheduler.

    A local cube gets the new arrays under temporary names, renamed over the
    old ones once all are written (a killed run keeps the previous
    likelihoods). A cube at a URL (object stores have no rename) is written
    in place: its arrays say ``complete: false`` until every block is written,
    and :func:`require_likelihood` refuses them until then.

    Parameters
    ----------
    cube : str or PathLike
        The cube's zarr store, a local path or a URL; written in place
        (``afp`` is not touched).
    model : path or TrainedModel
        The trained model. Its fingerprint parameters must equal the cube's.
    block_sites : int
        Sites read and scored by one task (bounds the memory of each; at
        least one zarr chunk).
    batch_size : int
        Sites per forward pass.
    device : {"cpu", "cuda"}
    progress : bool, optional
        Progress bar (default: only on a terminal).
    scheduler, workers
        Where the blocks run (see :func:`afpx.scheduler.use_scheduler`).

    Returns
    -------
    xarray.Dataset
        The cube, reopened lazily, with the new variables.

    Raises
    ------
    AfpxError
        When the cube lacks fingerprints or is damaged, its fingerprint
        parameters differ from the model's, another process writes into it,
        or the model gives non-finite likelihoods (the previous ones are kept
        in a local cube).
    """
    import dask
    import dask.array as da
    import xarray as xr
    import zarr

    from afpx.checkpoint import check_fingerprint
    from afpx.features import context_from_store
    from afpx.scheduler import compute, use_scheduler
    from afpx.store import check_chunks, is_url, open_group

    path = str(cube)
    remote = is_url(path)
    if not remote and not os.path.exists(path):
        raise AfpxError(f"cube {path!r} does not exist; build it with `afpx build-cube`")
    m = _load(model, device)
    g = open_group(path)
    if not remote:
        from pathlib import Path

        check_chunks(Path(path))  # a lost chunk reads as NaN: refuse it by name first
    missing = [n for n in (schema.AFP, schema.R0, schema.DMIN_RATIO) if n not in g]
    if missing:
        raise AfpxError(
            f"site likelihoods need {', '.join(missing)}, which the cube {path!r} lacks; "
            "build it with `afpx build-cube`"
        )
    attrs = dict(g.attrs)
    check_fingerprint(m.fingerprint, dict(attrs.get("fingerprint", {})), cube=repr(path))
    afp_arr = g[schema.AFP]
    n = int(afp_arr.shape[0])
    chunk = int(afp_arr.chunks[0])
    draw = np.asarray(g[schema.DRAW][:]) if schema.DRAW in g else np.zeros(n, np.int16)
    with_mean = bool(len(draw) and int(draw.max()) > 0)
    r0_all = np.asarray(g[schema.R0][:], dtype=np.float32)
    dmin_all = np.asarray(g[schema.DMIN_RATIO][:], dtype=np.float32)
    # one pass over afp: the context of a site depends on its whole structure
    context = context_from_store(g, shell=m.needs_shell) if m.needs_context else None

    # 1. one writer at a time (local cubes); leftovers of a killed run go
    with contextlib.nullcontext() if remote else _writer_lock(path):
        suffix = "" if remote else PARTIAL_SUFFIX
        for name in list(g.array_keys()):
            if name.endswith((PARTIAL_SUFFIX, OLD_SUFFIX)):
                _remove_array(path, name)
        # 2. create the new variables (metadata only; root attributes kept as they are)
        identity = m.identity()
        n_el = m.config.n_elements
        lik_attrs = {
            **identity,
            "complete": False,
            "long_name": "site likelihood (sigmoid output) of elements Z = 1..118",
            "used_for_ranking": not with_mean,
        }
        final: dict[str, Any] = {
            schema.LIKELIHOOD: (
                (schema.SITE, schema.ELEMENT),
                da.zeros((n, n_el), chunks=(chunk, n_el), dtype=np.float32),
                lik_attrs,
            ),
            schema.SOFTMAX_PRED: (
                (schema.SITE,),
                da.zeros(n, chunks=chunk, dtype=np.int16),
                {
                    **identity,
                    "complete": False,
                    "long_name": "Z predicted by the softmax classifier",
                },
            ),
        }
        if with_mean:
            final[schema.LIKELIHOOD_MEAN] = (
                (schema.SITE, schema.ELEMENT),
                da.zeros((n, n_el), chunks=(chunk, n_el), dtype=np.float32),
                {
                    **identity,
                    "complete": False,
                    "long_name": "likelihood averaged over the draws of each unique site",
                    "used_for_ranking": True,
                },
            )
        if remote:
            # in place: the old arrays go first (their replacements say complete: false)
            gw = open_group(path, mode="r+")
            for name in (*final, schema.LIKELIHOOD_MEAN):
                if name in gw:
                    del gw[name]
        template = xr.Dataset(
            {name + suffix: v for name, v in final.items()},
            coords=schema.element_coords(),
            attrs=attrs,
        )
        consolidated = _store_is_consolidated(path)
        template.to_zarr(path, mode="a", compute=False, consolidated=consolidated)

        # 3. fill them block by block, one task each (blocks never split the draws
        #    of a unique site, and end on chunk boundaries)
        names = {name: name + suffix for name in final}
        blocks = _block_ends(draw, max(block_sites, 1), chunk)
        model_key = dask.delayed(m, name=f"afpx-model-{uuid.uuid4().hex}")
        score = dask.delayed(_score_block, pure=False)
        tasks = [
            score(
                path,
                names,
                a,
                b,
                model_key,
                r0_all[a:b],
                dmin_all[a:b],
                None if context is None else context[a:b],
                draw[a:b] if with_mean else None,
                batch_size,
            )
            for a, b in blocks
        ]
        if progress is None:
            progress = sys.stderr.isatty()
        with use_scheduler(scheduler, workers=workers):
            bad = [r for r in compute(*tasks, progress=bool(progress)) if r is not None]
        if bad:
            a, b = bad[0]
            kept = " (the cube's previous likelihoods are kept)" if not remote else ""
            raise AfpxError(
                f"the model gave non-finite likelihoods on sites {a}..{b - 1} of {path!r}: "
                f"their fingerprints are damaged (check with `afpx info --verify`){kept}"
            )
        # 4. complete: provenance and the flag go with the arrays, which then
        #    replace the previous ones (each by one directory rename)
        gw = zarr.open_group(path, mode="r+")
        for name in final:
            gw[names[name]].attrs.update({"complete": True})
        if not remote:
            _swap_in(path, final, with_mean, gw)
        if consolidated:
            zarr.consolidate_metadata(path)
    return _open(path)


def _swap_in(path: str, final: dict[str, Any], with_mean: bool, gw: Any) -> None:
    """Rename the finished temporary arrays of a local cube over the previous ones."""
    for name in final:
        if name in gw:
            os.replace(os.path.join(path, name), os.path.join(path, name + OLD_SUFFIX))
        os.replace(os.path.join(path, name + PARTIAL_SUFFIX), os.path.join(path, name))
    if schema.LIKELIHOOD_MEAN in gw and not with_mean:
        os.replace(
            os.path.join(path, schema.LIKELIHOOD_MEAN),
            os.path.join(path, schema.LIKELIHOOD_MEAN + OLD_SUFFIX),
        )
    for name in final | {schema.LIKELIHOOD_MEAN: None}:
        if os.path.isdir(os.path.join(path, name + OLD_SUFFIX)):
            _remove_array(path, name + OLD_SUFFIX)


def _open(path: str) -> xr.Dataset:
    """Open a cube lazily (:func:`afpx.cube.open_cube`)."""
    from afpx.cube import open_cube

    return open_cube(path)


def require_likelihood(ds: xr.Dataset, *, what: str = "ranking") -> None:
    """Raise :class:`AfpxError` naming ``afpx likelihood`` when a cube lacks likelihoods.

    Also refuses likelihoods whose write did not complete (``complete`` attribute
    false) and variables written by different models (a write interrupted
    between swapping its arrays in).
    """
    schema.require_variables(ds, [schema.LIKELIHOOD], what=what, fix=FIX)
    names = [
        n
        for n in (schema.LIKELIHOOD, schema.LIKELIHOOD_MEAN, schema.SOFTMAX_PRED)
        if n in ds.variables
    ]
    for name in names:
        if ds[name].attrs.get("complete", True) in (False, 0, "false"):
            raise AfpxError(f"`{name}` in the cube was not completely written; {FIX}")
    models = {str(ds[n].attrs.get("model_sha256", "")) for n in names}
    if len(models) > 1:
        raise AfpxError(
            f"the cube's {', '.join(names)} come from different models (an interrupted "
            f"`afpx likelihood`); {FIX}"
        )


def site_likelihood(ds: xr.Dataset) -> xr.DataArray:
    """The (site, element) likelihoods that ranking uses, on the sites with draw 0.

    ``likelihood_mean`` when present, else ``likelihood``; the result is lazy.
    """
    require_likelihood(ds)
    name = schema.LIKELIHOOD_MEAN if schema.LIKELIHOOD_MEAN in ds.variables else schema.LIKELIHOOD
    da = ds[name]
    if schema.DRAW in ds.variables:
        first = np.flatnonzero(np.asarray(ds[schema.DRAW].values) == 0)
        da = da.isel({schema.SITE: first})
    return da


def score_structures(
    structures: Sequence[Any],
    model: str | os.PathLike[str] | TrainedModel,
    *,
    params: Any = None,
    seed: int = 0,
    device: str = "cpu",
) -> xr.Dataset:
    """Site likelihoods of the unique sites of pymatgen structures.

    Parameters
    ----------
    structures : sequence of pymatgen Structure
    model : path or TrainedModel
    params : afpx.cube.FingerprintParams, optional
        Fingerprint parameters; by default the model's (they must match it).
    seed : int
        Seed of the random rotation and jitter of the fingerprints.
    device : {"cpu", "cuda"}

    Returns
    -------
    xarray.Dataset
        Along ``site`` (unique sites, structure by structure): ``likelihood``
        (site, element), ``softmax_pred``, ``z``, ``multiplicity``,
        ``structure``; ``element`` and ``symbol`` coordinates.
    """
    import xarray as xr

    from afpx.checkpoint import check_fingerprint
    from afpx.cube import FingerprintParams, analyse_structures, fingerprint_structures

    m = _load(model, device)
    if params is None:
        params = FingerprintParams(**m.fingerprint) if m.fingerprint else FingerprintParams()
    check_fingerprint(m.fingerprint, params.to_attrs(), cube="the requested fingerprints")
    analysed = analyse_structures(list(structures))
    fp = fingerprint_structures(analysed, params=params, seed=seed)
    afp = np.asarray(fp[schema.AFP])
    context = None
    if m.needs_context:
        structure = np.asarray(fp[schema.STRUCTURE_INDEX])
        draw = np.asarray(fp[schema.DRAW]) if schema.DRAW in fp else None
        pairs = None
        if m.needs_shell:
            pairs = shell_pairs(
                structure,
                np.asarray(fp[schema.SITE_INDEX]),
                draw,
                np.stack([a.lattice for a in analysed]),
                np.asarray([a.n_atoms for a in analysed]),
                np.concatenate([np.reshape(a.frac_coords, (-1, 3)) for a in analysed]),
                np.concatenate([np.reshape(a.numbers, -1) for a in analysed]),
            )
        context = site_context(
            afp.mean(axis=1),
            np.asarray(fp[schema.R0]),
            np.asarray(fp[schema.DMIN_RATIO]),
            np.asarray(fp[schema.MULTIPLICITY]),
            np.asarray(fp[schema.COORDINATION]),
            structure,
            draw,
            pairs,
        )
    lik, pred = score_afp(
        m, afp, np.asarray(fp[schema.R0]), np.asarray(fp[schema.DMIN_RATIO]), context=context
    )
    out = xr.Dataset(
        {
            schema.LIKELIHOOD: ((schema.SITE, schema.ELEMENT), lik, m.identity()),
            schema.SOFTMAX_PRED: ((schema.SITE,), pred),
        },
        coords=schema.element_coords(),
    )
    for name in (schema.Z, schema.MULTIPLICITY, schema.STRUCTURE_INDEX):
        if name in fp:
            out[name] = ((schema.SITE,), np.asarray(fp[name]))
    return out
