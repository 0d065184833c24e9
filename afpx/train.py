"""Training: stream the cube from zarr into torch, schedules, checkpoints.

The training examples are the sites of the ``train`` split of an AFP cube.
:class:`AFPStream` reads whole zarr chunks of ``afp`` (never single rows,
which are ~100× slower), in a shuffled chunk order each epoch, mixes a few
chunks in a shuffle buffer and yields ready-made batches; DataLoader workers
each take their share of the chunks. Element-balanced oversampling draws, for
each epoch, how often every training site appears (a multinomial draw of as
many examples as the training split has, with weights that equalise the
elements), so the stream stays chunk-aligned.

:func:`train` runs Adam with the paper's warm-up learning-rate and KL-weight
schedules (every value a :class:`TrainConfig` field), logs every loss term for
training and validation (the ``holdout`` split) per epoch, and writes a
checkpoint folder::

    MODEL/
      model.pt       state_dict of the network (torch.load(weights_only=True))
      state.pt       optimiser state, step and RNG state for --resume (weights_only too)
      config.json    model and training configuration, the cube's fingerprint parameters
      metrics.csv    one row per epoch: every loss term, train_* and val_*
      metrics.json   the same rows as a JSON list
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from afpx import AfpxError, __version__, schema
from afpx.checkpoint import (
    CONFIG_FILE,
    FORMAT,
    METRICS_CSV,
    METRICS_JSON,
    MODEL_FILE,
    STATE_FILE,
    atomic_text,
    atomic_torch_save,
    check_fingerprint,
    load_weights,
    open_store,
    read_config,
    torch_device,
    write_manifest,
)
from afpx.features import context_from_store
from afpx.store import check_writable_folder, is_url

if TYPE_CHECKING:
    from afpx.model import AFPNet, ModelConfig, ModelOutput, SiteNet

log = logging.getLogger(__name__)

TRAIN_PRESETS = ("paper", "small", "context")
LR_SCHEDULES = ("paper", "onecycle")


@dataclass(frozen=True)
class TrainConfig:
    """Training parameters; defaults are the paper's.

    Schedules advance per *reference batch*: ``reference_batch_size`` examples.
    A batch of ``batch_size`` examples moves them by ``batch_size /
    reference_batch_size`` steps, so the learning rate and the KL weight reach
    the same values after the same number of examples whatever the batch size,
    and every learning-rate value is multiplied by ``(batch_size /
    reference_batch_size) ** lr_batch_exponent`` (0.5: the square-root rule
    usual for Adam; 1: linear; 0: none).

    Parameters
    ----------
    preset : str
        Name of the preset this came from (informational).
    epochs : int
        Passes over (an epoch-sized sample of) the training split.
    batch_size : int
        Examples per optimiser step (paper: 16).
    reference_batch_size : int
        Batch size that the schedule values below are quoted for (paper: 16).
    lr_batch_exponent : float
        Learning-rate scaling exponent for ``batch_size != reference_batch_size``.
    lr_start, lr_increment, lr_peak : float
        Warm-up: the learning rate starts at ``lr_start`` and rises by
        ``lr_increment`` per reference batch until ``lr_peak`` (paper: 3e-7,
        3e-10, 3e-5).
    lr_hold : int
        Reference batches at ``lr_peak`` before dropping to ``lr_final``
        (paper: 5,000, then 2.25e-5).
    lr_final : float
        Learning rate after the hold.
    kl_start, kl_increment, kl_max : float
        KL weight: from ``kl_start`` up by ``kl_increment`` per reference batch
        to ``kl_max`` (paper: 0.01, 0.001, 1.0).
    adam_betas : tuple of float
        Adam's β1, β2 (0.9, 0.999).
    adam_eps : float
        Adam's ε (1e-8).
    l2 : float
        Weight of the L2 penalty Σ w² over all layer weights (paper: 5e-4).
    recon_weight, bce_weight, ce_weight : float
        Weights of the reconstruction, sigmoid BCE and softmax CE terms (1).
    pos_weight : float
        Positive-class weight of the sigmoid BCE (paper: 118).
    oversample : bool
        Element-balanced oversampling of the training split.
    balance_power : float
        Sampling weight of a site is ``count(element) ** -balance_power``;
        1 equalises the elements (paper), 0 is uniform.
    standardisation_examples : int
        Training examples used to initialise the input offset and scale.
    val_max_sites : int or None
        Cap on the holdout sites evaluated after each epoch (None: all).
    shuffle_chunks : int
        Zarr chunks mixed in the shuffle buffer of the stream.
    num_workers : int
        DataLoader worker processes (0 reads in the main process).
    seed : int
        Seed of the initialisation, the sampling and the dropout.
    lr_schedule : {"paper", "onecycle"}
        ``paper``: the warm-up / hold / final schedule above. ``onecycle``:
        linear warm-up from ``lr_start`` to ``lr_peak`` over the first
        ``warmup_fraction`` of all training examples, then cosine decay to
        ``lr_final`` at the end of the last epoch (``lr_increment`` and
        ``lr_hold`` unused).
    warmup_fraction : float
        Share of the run spent warming up (``onecycle``).
    weight_decay : float
        Decoupled weight decay of AdamW (0: plain Adam, as the paper).
    split_protocol : {"composition", "site"}
        ``composition``: the cube's split (no composition shared between
        train, holdout and test). ``site``: the paper's protocol, unique sites
        split 60/20/20 at random (:func:`afpx.splits.random_site_split`,
        seeded by ``seed``), for comparison with the paper's error rate.
    mixed_precision : bool
        Run the forward pass under ``torch.autocast`` in bfloat16 (CUDA; on a
        CPU it is slower than float32 and meant only for testing).
    time_limit_s : float or None
        Stop after the first epoch that ends past this many seconds of
        training (the checkpoint is complete; ``--resume`` continues).
    keep_best : bool
        Keep in ``model.pt`` the weights of the epoch with the lowest holdout
        softmax error (the last epoch's weights stay in ``state.pt`` for
        ``--resume``). Off: ``model.pt`` is the last epoch.
    """

    preset: str = "paper"
    epochs: int = 50
    batch_size: int = 16
    reference_batch_size: int = 16
    lr_batch_exponent: float = 0.5
    lr_start: float = 3e-7
    lr_increment: float = 3e-10
    lr_peak: float = 3e-5
    lr_hold: int = 5000
    lr_final: float = 2.25e-5
    kl_start: float = 0.01
    kl_increment: float = 0.001
    kl_max: float = 1.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    l2: float = 5e-4
    recon_weight: float = 1.0
    bce_weight: float = 1.0
    ce_weight: float = 1.0
    pos_weight: float = 118.0
    oversample: bool = True
    balance_power: float = 1.0
    standardisation_examples: int = 10_000
    val_max_sites: int | None = None
    shuffle_chunks: int = 8
    num_workers: int = 0
    seed: int = 0
    lr_schedule: str = "paper"
    warmup_fraction: float = 0.1
    weight_decay: float = 0.0
    keep_best: bool = False
    split_protocol: str = "composition"
    mixed_precision: bool = False
    time_limit_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "reference_batch_size", "shuffle_chunks"):
            if getattr(self, name) < 1:
                raise AfpxError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise AfpxError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.lr_start <= 0 or self.lr_peak <= 0 or self.lr_final <= 0:
            raise AfpxError("learning rates must be positive")
        if self.lr_schedule not in LR_SCHEDULES:
            raise AfpxError(
                f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}"
            )
        if self.split_protocol not in ("composition", "site"):
            raise AfpxError(
                f"split_protocol must be 'composition' or 'site', got {self.split_protocol!r}"
            )
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise AfpxError(f"warmup_fraction must lie in [0, 1), got {self.warmup_fraction}")
        if self.weight_decay < 0 or self.l2 < 0 or self.pos_weight <= 0:
            raise AfpxError("weight_decay and l2 must be >= 0 and pos_weight > 0")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field."""
        d = asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys and wrong types raise :class:`AfpxError`."""
        return schema.config_from_dict(cls, d, what="training configuration")

    @classmethod
    def preset_config(cls, name: str, **overrides: Any) -> TrainConfig:
        """The training configuration of a named preset, with optional overrides.

        ``paper``: the paper's values (batch 16). ``small``: for the ``small``
        model on a CPU: batch 256, a warm-up/KL schedule compressed to the
        first epoch of ~100k sites, and 20 epochs (about 20 minutes on one
        free core for the ~105k training sites of oqmd-icsd). ``context``: for
        the ``context`` model (the shipped default): natural sampling, AdamW,
        one-cycle schedule over 16 epochs, a shuffle buffer of 64 chunks
        (~16k sites), the best holdout epoch kept.
        """
        if name == "paper":
            base = cls()
        elif name == "small":
            base = cls(
                preset="small",
                epochs=20,
                batch_size=256,
                reference_batch_size=256,
                lr_start=1e-4,
                lr_increment=2.5e-6,
                lr_peak=1e-3,
                lr_hold=2000,
                lr_final=5e-4,
                kl_start=0.01,
                kl_increment=0.005,
                kl_max=1.0,
                val_max_sites=20_000,
            )
        elif name == "context":
            base = cls(
                preset="context",
                epochs=16,
                batch_size=256,
                reference_batch_size=256,
                lr_schedule="onecycle",
                lr_start=1e-4,
                lr_peak=2e-3,
                lr_final=1e-6,
                warmup_fraction=0.1,
                weight_decay=1e-5,
                shuffle_chunks=64,
                l2=0.0,
                pos_weight=1.0,
                oversample=False,
                keep_best=True,
                val_max_sites=None,
            )
        else:
            raise AfpxError(
                f"unknown training preset {name!r}; choose one of {', '.join(TRAIN_PRESETS)}"
            )
        return cls.from_dict({**base.to_dict(), **overrides}) if overrides else base

    # -- schedules ----------------------------------------------------------
    def reference_steps(self, examples_seen: int) -> float:
        """Schedule position (in reference batches) after ``examples_seen`` examples."""
        return examples_seen / self.reference_batch_size

    def learning_rate(self, examples_seen: int, total_examples: int | None = None) -> float:
        """Learning rate for the next batch after ``examples_seen`` examples.

        ``total_examples`` (examples in the whole run) is needed by the
        ``onecycle`` schedule.

        Notes
        -----
        ``onecycle``, with progress ``u = examples_seen / total_examples`` and
        warm-up share ``w``: ``lr_start + (lr_peak - lr_start) u / w`` for
        ``u < w``, then ``lr_final + (lr_peak - lr_final) (1 + cos π v) / 2``
        with ``v = (u - w) / (1 - w)``. ``paper``:
        With t reference batches done, ``lr = min(lr_start + t lr_increment,
        lr_peak)`` until ``t`` passes the end of warm-up plus ``lr_hold``, then
        ``lr_final``; all times ``(batch_size / reference_batch_size) **
        lr_batch_exponent``.
        """
        scale = (self.batch_size / self.reference_batch_size) ** self.lr_batch_exponent
        if self.lr_schedule == "onecycle":
            if not total_examples:
                raise AfpxError("the onecycle schedule needs the total number of examples")
            u = min(examples_seen / total_examples, 1.0)
            w = self.warmup_fraction
            if u < w:
                return scale * (self.lr_start + (self.lr_peak - self.lr_start) * u / w)
            v = (u - w) / (1.0 - w)
            return scale * (
                self.lr_final + 0.5 * (self.lr_peak - self.lr_final) * (1 + math.cos(math.pi * v))
            )
        t = self.reference_steps(examples_seen)
        warmup = (
            max(0.0, (self.lr_peak - self.lr_start) / self.lr_increment)
            if self.lr_increment > 0
            else 0.0
        )
        if t >= warmup + self.lr_hold:
            lr = self.lr_final
        else:
            lr = min(self.lr_start + t * self.lr_increment, self.lr_peak)
        return lr * scale

    def kl_weight(self, examples_seen: int) -> float:
        """KL weight for the next batch: ``min(kl_start + t kl_increment, kl_max)``."""
        t = self.reference_steps(examples_seen)
        return min(self.kl_start + t * self.kl_increment, self.kl_max)


# -- the cube as seen by the stream -------------------------------------------


def _as_str(values: np.ndarray) -> np.ndarray:
    return np.asarray([str(v) for v in values], dtype=object)


@dataclass
class CubeIndex:
    """The small per-site arrays of a cube, loaded once, and its chunking.

    Attributes
    ----------
    path : str
        The store.
    n_sites : int
    chunk_sites : int
        Sites per zarr chunk (or shard) of ``afp``: the unit of reading.
    z : ndarray of shape (n_sites,) int16
    r0, dmin_ratio : ndarray of shape (n_sites,) float32
    draw : ndarray of shape (n_sites,) int16
    site_split : ndarray of shape (n_sites,) object
        Split (``train``/``holdout``/``test``) of each site's structure.
    fingerprint : dict
        ``attrs["fingerprint"]`` of the cube.
    context : ndarray of shape (n_sites, width) float32 or None
        Template context of every site (:func:`afpx.features.site_context`),
        when loaded with ``context=True``.
    """

    path: str
    n_sites: int
    chunk_sites: int
    z: np.ndarray
    r0: np.ndarray
    dmin_ratio: np.ndarray
    draw: np.ndarray
    site_split: np.ndarray
    fingerprint: dict[str, Any] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    context: np.ndarray | None = None

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        context: bool = False,
        shell: bool = False,
        split_protocol: str = "composition",
        seed: int = 0,
    ) -> CubeIndex:
        """Read the per-site arrays of the cube at ``path`` (and the template context).

        ``shell`` adds the coordination-shell columns to the context.

        ``split_protocol="site"`` replaces the cube's split by a seeded random
        split of unique sites (the paper's protocol).
        """
        g = open_store(path)
        from afpx.store import check_chunks

        if not is_url(path):  # chunk sizes are recorded for local cubes only
            check_chunks(Path(path))  # a lost or truncated chunk: one line, not a codec traceback
        missing = [
            n
            for n in (schema.AFP, schema.Z, schema.R0, schema.DMIN_RATIO, schema.STRUCTURE_INDEX)
            if n not in g
        ]
        if missing:
            raise AfpxError(
                f"training needs {', '.join(missing)}, which the cube {str(path)!r} lacks; "
                "build it with `afpx build-cube`"
            )
        afp = g[schema.AFP]
        n_sites = int(afp.shape[0])
        shards = getattr(afp, "shards", None)
        chunk_sites = int((shards or afp.chunks)[0])
        structure = np.asarray(g[schema.STRUCTURE_INDEX][:], dtype=np.int64)
        if split_protocol == "site":
            from afpx.splits import random_site_split

            site_index = (
                np.asarray(g[schema.SITE_INDEX][:])
                if schema.SITE_INDEX in g
                else np.arange(n_sites)
            )
            site_split = random_site_split(structure, site_index, seed=seed)
        elif schema.SPLIT in g:
            split = _as_str(g[schema.SPLIT][:])
            site_split = split[structure]
        else:
            site_split = np.full(n_sites, "train", dtype=object)
        draw = (
            np.asarray(g[schema.DRAW][:], dtype=np.int16)
            if schema.DRAW in g
            else np.zeros(n_sites, np.int16)
        )
        attrs = dict(g.attrs)
        return cls(
            path=str(path),
            n_sites=n_sites,
            chunk_sites=chunk_sites,
            z=np.asarray(g[schema.Z][:], dtype=np.int16),
            r0=np.asarray(g[schema.R0][:], dtype=np.float32),
            dmin_ratio=np.asarray(g[schema.DMIN_RATIO][:], dtype=np.float32),
            draw=draw,
            site_split=site_split,
            fingerprint=dict(attrs.get("fingerprint", {})),
            attrs=attrs,
            context=context_from_store(g, shell=shell) if context else None,
        )

    def sites(self, split: str | None) -> np.ndarray:
        """Indices of the sites of ``split`` (all sites for None), int64."""
        if split is None:
            return np.arange(self.n_sites, dtype=np.int64)
        return np.flatnonzero(self.site_split == split).astype(np.int64)


def balanced_counts(
    z: np.ndarray, n_draws: int, rng: np.random.Generator, *, power: float = 1.0
) -> np.ndarray:
    """How often each example is drawn in an element-balanced epoch.

    Parameters
    ----------
    z : ndarray of shape (n,)
        Element of each example.
    n_draws : int
        Epoch size (the number of examples of the split).
    rng : numpy.random.Generator
    power : float
        Weight of an example is ``count(z) ** -power``: 1 gives every element
        the same expected share, 0 is uniform sampling with replacement.

    Returns
    -------
    ndarray of shape (n,) int64
        Multinomial counts summing to ``n_draws``.
    """
    if len(z) == 0:
        return np.zeros(0, np.int64)
    _, inverse, counts = np.unique(z, return_inverse=True, return_counts=True)
    w = counts[inverse].astype(np.float64) ** -power
    return rng.multinomial(n_draws, w / w.sum()).astype(np.int64)


class AFPStream:
    """Chunk-aligned stream of batches of one split of a cube.

    Use through :meth:`dataset` (a ``torch.utils.data.IterableDataset``) and a
    ``DataLoader(batch_size=None)``, or iterate directly with :meth:`batches`.

    Parameters
    ----------
    path : str or PathLike
        The cube.
    split : str or None
        ``train``, ``holdout``, ``test`` or None (every site).
    batch_size : int
    shuffle : bool
        Shuffle the chunk order per epoch and the sites within the buffer.
    oversample : bool
        Element-balanced sampling with replacement, epoch size = split size.
    balance_power : float
        See :func:`balanced_counts`.
    shuffle_chunks : int
        Chunks mixed in one shuffle buffer.
    max_sites : int or None
        Use only the first chunks (in a seeded order fixed for all epochs)
        holding at least this many sites of the split.
    seed : int
    index : CubeIndex or None
        Pre-loaded index (loaded from ``path`` when None).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        split: str | None = "train",
        batch_size: int = 16,
        shuffle: bool = True,
        oversample: bool = False,
        balance_power: float = 1.0,
        shuffle_chunks: int = 8,
        max_sites: int | None = None,
        seed: int = 0,
        index: CubeIndex | None = None,
    ) -> None:
        self.path = str(path)
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.oversample = oversample
        self.balance_power = balance_power
        self.shuffle_chunks = shuffle_chunks
        self.seed = seed
        self.epoch = 0
        self.index = index if index is not None else CubeIndex.load(path)
        sites = self.index.sites(split)
        if max_sites is not None and len(sites) > max_sites:
            chunk_of = sites // self.index.chunk_sites
            order = np.random.default_rng([seed, 7919]).permutation(np.unique(chunk_of))
            per_chunk = np.bincount(chunk_of, minlength=int(chunk_of.max()) + 1)[order]
            keep = order[: int(np.searchsorted(np.cumsum(per_chunk), max_sites)) + 1]
            sites = sites[np.isin(chunk_of, keep)]
        self.sites = sites

    def __len__(self) -> int:
        """Examples per epoch."""
        return len(self.sites)

    def n_batches(self) -> int:
        """Batches per epoch (the last one may be short)."""
        return math.ceil(len(self.sites) / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch (it seeds the chunk order and the oversampling)."""
        self.epoch = epoch

    def epoch_counts(self) -> np.ndarray:
        """How often each of ``self.sites`` appears this epoch, shape (n,) int64."""
        if not self.oversample:
            return np.ones(len(self.sites), np.int64)
        rng = np.random.default_rng([self.seed, self.epoch, 1])
        return balanced_counts(
            self.index.z[self.sites], len(self.sites), rng, power=self.balance_power
        )

    def batches(self, *, worker: int = 0, n_workers: int = 1) -> Iterator[dict[str, np.ndarray]]:
        """Yield batches (dicts of numpy arrays) of this epoch for one worker.

        Keys: ``afp`` (n, 12, 256) float32, ``r0``, ``dmin_ratio`` (n,) float32,
        ``z`` (n,) int64, ``site`` (n,) int64 global site index, and
        ``context`` (n, 10 + n_bins) float32 when the index holds it.
        """
        counts = self.epoch_counts()
        cs = self.index.chunk_sites
        chunk_of = self.sites // cs
        chunks = np.unique(chunk_of[counts > 0])
        rng = np.random.default_rng([self.seed, self.epoch, 2])
        if self.shuffle:
            chunks = rng.permutation(chunks)
        mine = chunks[worker::n_workers]
        # per-worker generator for the within-buffer shuffle
        wrng = np.random.default_rng([self.seed, self.epoch, 3, worker])
        g = open_store(self.path)
        afp_arr = g[schema.AFP]
        bounds = np.searchsorted(chunk_of, np.arange(0, int(chunk_of.max(initial=0)) + 2))
        pending_rows: list[np.ndarray] = []
        pending_sites: list[np.ndarray] = []
        n_pending = 0

        def emit(final: bool) -> Iterator[dict[str, np.ndarray]]:
            nonlocal pending_rows, pending_sites, n_pending
            if not pending_rows:
                return
            rows = np.concatenate(pending_rows)
            site = np.concatenate(pending_sites)
            if self.shuffle:
                perm = wrng.permutation(len(site))
                rows, site = rows[perm], site[perm]
            n_full = len(site) // self.batch_size * self.batch_size
            stop = len(site) if final else n_full
            for a in range(0, stop, self.batch_size):
                b = min(a + self.batch_size, stop)
                s = site[a:b]
                yield {
                    schema.AFP: rows[a:b],
                    schema.R0: self.index.r0[s],
                    schema.DMIN_RATIO: self.index.dmin_ratio[s],
                    schema.Z: self.index.z[s].astype(np.int64),
                    "site": s,
                    **({} if self.index.context is None else {"context": self.index.context[s]}),
                }
            pending_rows = [rows[stop:]] if stop < len(site) else []
            pending_sites = [site[stop:]] if stop < len(site) else []
            n_pending = len(site) - stop

        for k, c in enumerate(mine):
            lo, hi = bounds[c], bounds[c + 1]
            sel, cnt = self.sites[lo:hi], counts[lo:hi]
            sel = np.repeat(sel, cnt)
            if len(sel) == 0:
                continue
            start = int(c) * cs
            block = np.asarray(afp_arr[start : min(start + cs, self.index.n_sites)])
            pending_rows.append(block[sel - start])
            pending_sites.append(sel)
            n_pending += len(sel)
            if (k + 1) % self.shuffle_chunks == 0 or not self.shuffle:
                yield from emit(final=False)
        yield from emit(final=True)

    def dataset(self) -> StreamDataset:
        """This stream as a ``torch.utils.data.IterableDataset`` yielding tensor batches."""
        return StreamDataset(self)


class StreamDataset(IterableDataset):
    """:class:`AFPStream` as a torch ``IterableDataset`` of tensor batches.

    In a DataLoader worker it yields that worker's share of the chunks.
    """

    def __init__(self, stream: AFPStream) -> None:
        super().__init__()
        self.stream = stream

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, n = (info.id, info.num_workers) if info is not None else (0, 1)
        for b in self.stream.batches(worker=worker, n_workers=n):
            yield {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in b.items()}


def make_loader(stream: AFPStream, *, num_workers: int = 0, pin_memory: bool = False) -> Any:
    """A ``DataLoader`` over ``stream`` (batches are made by the stream).

    Workers are spawned, not forked, and each opens the zarr store itself.
    """
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs["multiprocessing_context"] = "spawn"
        kwargs["persistent_workers"] = False
    return DataLoader(
        stream.dataset(),
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        **kwargs,
    )


# -- training ----------------------------------------------------------------------

LOSS_TERMS = ("reconstruction", "kl", "sigmoid_bce", "softmax_ce", "l2", "total")
RATE_TERMS = ("softmax_error", "sigmoid_error", "sigmoid_top5_error")


@dataclass
class _Accumulator:
    sums: dict[str, float] = field(default_factory=dict)
    n: int = 0

    def add(self, values: dict[str, float], n: int) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v * n
        self.n += n

    def means(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}{k}": (v / self.n if self.n else math.nan) for k, v in self.sums.items()}


def _batch_terms(
    net: AFPNet | SiteNet,
    batch: dict[str, torch.Tensor],
    cfg: TrainConfig,
    kl_weight: float,
) -> tuple[torch.Tensor, dict[str, float], ModelOutput]:
    """Total loss, the logged values (loss terms and error rates) and the outputs of a batch."""
    out = net(batch[schema.AFP], batch[schema.R0], batch[schema.DMIN_RATIO], batch.get("context"))
    terms = net.loss_terms(out, batch[schema.AFP], batch[schema.Z], pos_weight=cfg.pos_weight)
    l2 = net.l2_penalty() * cfg.l2
    total = (
        cfg.recon_weight * terms["reconstruction"]
        + kl_weight * terms["kl"]
        + cfg.bce_weight * terms["sigmoid_bce"]
        + cfg.ce_weight * terms["softmax_ce"]
        + l2
    )
    with torch.no_grad():
        target = batch[schema.Z] - 1
        soft_err = (out.softmax_logits.argmax(1) != target).float().mean()
        sig_err = (out.sigmoid_logits.argmax(1) != target).float().mean()
        top5 = out.sigmoid_logits.topk(min(5, out.sigmoid_logits.shape[1]), dim=1).indices
        sig_err5 = (top5 != target[:, None]).all(1).float().mean()
    logged = {k: float(v.detach()) for k, v in terms.items()}
    logged.update(
        l2=float(l2.detach()),
        total=float(total.detach()),
        softmax_error=float(soft_err),
        sigmoid_error=float(sig_err),
        sigmoid_top5_error=float(sig_err5),
    )
    return total, logged, out


def _to_device(batch: dict[str, torch.Tensor], dev: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(dev, non_blocking=True) for k, v in batch.items()}


def _standardisation_sample(
    index: CubeIndex, sites: np.ndarray, n: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """~n random training examples, read whole chunks at a time (random chunks)."""
    rng = np.random.default_rng([seed, 11])
    g = open_store(index.path)
    afp_arr = g[schema.AFP]
    cs = index.chunk_sites
    chunk_of = sites // cs
    chunks = rng.permutation(np.unique(chunk_of))
    rows, picked, total = [], [], 0
    for c in chunks:
        sel = sites[chunk_of == c]
        start = int(c) * cs
        block = np.asarray(afp_arr[start : min(start + cs, index.n_sites)])
        rows.append(block[sel - start])
        picked.append(sel)
        total += len(sel)
        if total >= n:
            break
    afp = np.concatenate(rows)
    site = np.concatenate(picked)
    if len(site) > n:
        keep = rng.choice(len(site), n, replace=False)
        afp, site = afp[keep], site[keep]
    context = None if index.context is None else index.context[site]
    return afp, index.r0[site], index.dmin_ratio[site], context


def _progress_default() -> bool:
    return sys.stderr.isatty()


def evaluate_stream(
    net: AFPNet | SiteNet, stream: AFPStream, cfg: TrainConfig, kl_weight: float, dev: torch.device
) -> dict[str, float]:
    """Mean loss terms and error rates of ``net`` (eval mode) over one pass of ``stream``.

    Besides the batch means, ``sigmoid_balanced_error`` and
    ``softmax_balanced_error`` average the top-1 error per element (the
    measure that element-balanced training optimises), and ``sigmoid_rank`` is
    the mean rank (1 = first) of the true element among the 118 likelihoods.
    """
    acc = _Accumulator()
    was_training = net.training
    net.eval()
    targets, sig_hit, soft_hit, ranks = [], [], [], []
    with torch.no_grad():
        for b in stream.batches():
            tb = _to_device(
                {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in b.items()}, dev
            )
            _, logged, out = _batch_terms(net, tb, cfg, kl_weight)
            acc.add(logged, len(b["site"]))
            target = tb[schema.Z] - 1
            true_logit = out.sigmoid_logits.gather(1, target[:, None])
            ranks.append((1 + (out.sigmoid_logits > true_logit).sum(1)).cpu().numpy())
            sig_hit.append((out.sigmoid_logits.argmax(1) == target).cpu().numpy())
            soft_hit.append((out.softmax_logits.argmax(1) == target).cpu().numpy())
            targets.append(target.cpu().numpy())
    net.train(was_training)
    result = acc.means("")
    if targets:
        t = np.concatenate(targets)
        _, inverse = np.unique(t, return_inverse=True)
        for name, hits in (("sigmoid", sig_hit), ("softmax", soft_hit)):
            h = np.concatenate(hits).astype(np.float64)
            per_element = np.bincount(inverse, weights=h) / np.bincount(inverse)
            result[f"{name}_balanced_error"] = float(1.0 - per_element.mean())
        result["sigmoid_rank"] = float(np.concatenate(ranks).mean())
    return result


def train(
    cube: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    model_config: ModelConfig | None = None,
    train_config: TrainConfig | None = None,
    device: str = "cpu",
    resume: bool = False,
    progress: bool | None = None,
    max_batches: int | None = None,
) -> Path:
    """Train the network on the ``train`` split of a cube; write a model folder.

    Parameters
    ----------
    cube : str or PathLike
        The AFP cube (zarr store).
    out : str or PathLike
        Model folder to write (created). An existing model there is an error
        unless ``resume``.
    model_config : ModelConfig, optional
        Architecture (default: the ``paper`` preset). Ignored on resume (the
        saved one is used).
    train_config : TrainConfig, optional
        Training parameters (default: the paper's). On resume, the saved one
        is used except for ``epochs``, which may be raised to train longer.
    device : {"cpu", "cuda"}
    resume : bool
        Continue the run saved in ``out`` from its last completed epoch.
    progress : bool, optional
        Show a progress bar per epoch (default: only on a terminal).
    max_batches : int, optional
        Stop each epoch after this many batches (smoke tests and benchmarks).

    Returns
    -------
    Path
        The model folder.
    """
    from tqdm.auto import tqdm

    from afpx.model import ModelConfig, build_net

    out_dir = Path(out)
    if progress is None:
        progress = _progress_default()
    dev = torch_device(device)

    state: dict[str, Any] | None = None
    if resume:
        if not (out_dir / STATE_FILE).is_file() or not (out_dir / CONFIG_FILE).is_file():
            raise AfpxError(
                f"nothing to resume in {str(out)!r}: it has no {STATE_FILE}/{CONFIG_FILE}; "
                "start a new run without --resume"
            )
        meta = read_config(out_dir)
        mcfg = ModelConfig.from_dict(meta["model"])
        saved = TrainConfig.from_dict(meta["train"])
        tcfg = saved if train_config is None else replace(saved, epochs=train_config.epochs)
        state = load_weights(out_dir / STATE_FILE)
        if "net" not in state:
            raise AfpxError(
                f"{out_dir / STATE_FILE} was written by an older afpx and holds no weights; "
                "start a new run without --resume"
            )
    else:
        if (out_dir / MODEL_FILE).exists() or (out_dir / STATE_FILE).exists():
            raise AfpxError(
                f"{str(out)!r} already holds a model; use --resume to continue it "
                "or choose another output folder"
            )
        mcfg = model_config or ModelConfig()
        tcfg = train_config or TrainConfig()
    # a folder that cannot be written fails now, not after the set-up
    check_writable_folder(out_dir, what="the model folder")

    torch.manual_seed(tcfg.seed)
    net = build_net(mcfg)
    from afpx.model import needs_context, needs_shell

    index = CubeIndex.load(
        cube,
        context=needs_context(net),
        shell=needs_shell(net),
        split_protocol=tcfg.split_protocol,
        seed=tcfg.seed,
    )
    if resume:
        check_fingerprint(meta.get("fingerprint", {}), index.fingerprint, cube=str(cube))
    train_sites = index.sites("train")
    if len(train_sites) == 0:
        raise AfpxError(f"the cube {str(cube)!r} has no sites in the train split")
    stream = AFPStream(
        cube,
        split="train",
        batch_size=tcfg.batch_size,
        shuffle=True,
        oversample=tcfg.oversample,
        balance_power=tcfg.balance_power,
        shuffle_chunks=tcfg.shuffle_chunks,
        seed=tcfg.seed,
        index=index,
    )
    val_stream = AFPStream(
        cube,
        split="holdout",
        batch_size=max(tcfg.batch_size, 256),
        shuffle=False,
        max_sites=tcfg.val_max_sites,
        seed=tcfg.seed,
        index=index,
    )
    total_examples = tcfg.epochs * len(stream)
    if max_batches is not None:
        total_examples = tcfg.epochs * min(len(stream), max_batches * tcfg.batch_size)

    if state is None:
        afp, r0, dmin, ctx = _standardisation_sample(
            index, train_sites, tcfg.standardisation_examples, tcfg.seed
        )
        net.initialise_standardisation(
            torch.from_numpy(afp),
            torch.from_numpy(r0),
            torch.from_numpy(dmin),
            None if ctx is None else torch.from_numpy(ctx),
        )
    else:
        net.load_state_dict(state["net"])
    net.to(dev)
    opt = torch.optim.AdamW(
        net.parameters(),
        lr=tcfg.lr_start,
        betas=tcfg.adam_betas,
        eps=tcfg.adam_eps,
        weight_decay=tcfg.weight_decay,
    )
    step, examples_seen, first_epoch = 0, 0, 0
    rows: list[dict[str, Any]] = []
    best: dict[str, Any] = {"epoch": None, "val_softmax_error": math.inf}
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
        examples_seen = int(state["examples_seen"])
        first_epoch = int(state["epoch"]) + 1
        torch.set_rng_state(state["torch_rng"])
        if dev.type == "cuda" and state.get("cuda_rng"):
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        # the rows of the epochs that state.pt holds (a later row may have been
        # written by a run killed before its state.pt)
        rows = [r for r in state.get("rows", []) if int(r["epoch"]) <= first_epoch]
        best = dict(state.get("best", best))

    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "afpx_version": __version__,
        "torch_version": torch.__version__,
        "model": mcfg.to_dict(),
        "train": tcfg.to_dict(),
        "fingerprint": index.fingerprint,
        "cube": {
            "path": os.fspath(cube) if is_url(cube) else str(Path(cube).resolve()),
            "n_sites": index.n_sites,
            "n_train": len(train_sites),
            "n_holdout": len(index.sites("holdout")),
            "draws": index.attrs.get("draws", 1),
            "elements_seen": sorted({int(v) for v in index.z[train_sites]}),
        },
    }
    loader = make_loader(stream, num_workers=tcfg.num_workers, pin_memory=dev.type == "cuda")

    t_run = time.perf_counter()
    for epoch in range(first_epoch, tcfg.epochs):
        stream.set_epoch(epoch)
        net.train()
        acc = _Accumulator()
        t0 = time.perf_counter()
        n_batches = (
            stream.n_batches() if max_batches is None else min(max_batches, stream.n_batches())
        )
        bar = tqdm(
            total=n_batches,
            disable=not progress,
            desc=f"epoch {epoch + 1}/{tcfg.epochs}",
            leave=False,
        )
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            tb = _to_device(batch, dev)
            lr = tcfg.learning_rate(examples_seen, total_examples)
            kl_w = tcfg.kl_weight(examples_seen)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=tcfg.mixed_precision):
                loss, logged, _ = _batch_terms(net, tb, tcfg, kl_w)
            if not math.isfinite(logged["total"]):
                raise AfpxError(
                    f"training diverged at step {step} (loss {logged['total']}); "
                    "lower the learning rate (--lr-peak) or the batch size"
                )
            loss.backward()
            opt.step()
            n = int(tb[schema.Z].shape[0])
            step += 1
            examples_seen += n
            acc.add(logged, n)
            bar.update(1)
            if progress:
                bar.set_postfix(loss=f"{logged['total']:.3g}", err=f"{logged['softmax_error']:.2f}")
        bar.close()
        seconds = time.perf_counter() - t0
        kl_w = tcfg.kl_weight(examples_seen)
        val = evaluate_stream(net, val_stream, tcfg, kl_w, dev) if len(val_stream) else {}
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": step,
            "examples": examples_seen,
            "lr": tcfg.learning_rate(examples_seen, total_examples),
            "kl_weight": kl_w,
            "seconds": round(seconds, 3),
            "examples_per_s": round(acc.n / seconds, 1) if seconds > 0 else math.nan,
            **acc.means("train_"),
            **{f"val_{k}": v for k, v in val.items()},
        }
        rows.append(row)
        log.info("epoch %d: %s", epoch + 1, row)
        val_err = float(val.get("softmax_error", math.nan))
        improved = (
            not tcfg.keep_best or best["epoch"] is None or val_err < best["val_softmax_error"]
        )
        if improved:
            best = {"epoch": epoch + 1, "val_softmax_error": val_err}
        _save(
            out_dir,
            net,
            opt,
            meta,
            rows,
            step=step,
            examples_seen=examples_seen,
            epoch=epoch,
            best=best,
            write_model=improved,
        )
        if tcfg.time_limit_s is not None and time.perf_counter() - t_run > tcfg.time_limit_s:
            log.info("time limit of %s s reached after epoch %d", tcfg.time_limit_s, epoch + 1)
            break
    if not (out_dir / MODEL_FILE).exists():  # zero epochs to run
        _save(
            out_dir,
            net,
            opt,
            meta,
            rows,
            step=step,
            examples_seen=examples_seen,
            epoch=first_epoch - 1,
            best=best,
            write_model=True,
        )
    return out_dir


def _save(
    out_dir: Path,
    net: AFPNet | SiteNet,
    opt: Any,
    meta: dict[str, Any],
    rows: list[dict[str, Any]],
    *,
    step: int,
    examples_seen: int,
    epoch: int,
    best: dict[str, Any],
    write_model: bool,
) -> None:
    """Write the checkpoint folder (see :mod:`afpx.checkpoint` for the order and why)."""
    state_dict = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    if write_model:
        atomic_torch_save(state_dict, out_dir / MODEL_FILE)
    meta = {
        **meta,
        "step": step,
        "examples_seen": examples_seen,
        "epochs_done": epoch + 1,
        "model_epoch": best.get("epoch"),
    }
    atomic_text(json.dumps(meta, indent=2, default=str), out_dir / CONFIG_FILE)
    atomic_text(json.dumps(rows, indent=1, default=float), out_dir / METRICS_JSON)
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns)
    w.writeheader()
    w.writerows(rows)
    atomic_text(buf.getvalue(), out_dir / METRICS_CSV)
    # state.pt is the one file --resume reads: written whole, after the others
    atomic_torch_save(
        {
            "net": state_dict,
            "optimizer": opt.state_dict(),
            "step": step,
            "examples_seen": examples_seen,
            "epoch": epoch,
            "best": best,
            "rows": json.loads(json.dumps(rows, default=float)),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
        out_dir / STATE_FILE,
    )
    write_manifest(out_dir, (MODEL_FILE, CONFIG_FILE, METRICS_CSV, METRICS_JSON, STATE_FILE))
