"""The AFP cube: fingerprints of every unique site as one lazy, chunked zarr store.

:func:`fingerprint_dataset` turns accepted structures into a lazy
:class:`xarray.Dataset` whose fingerprint variables are Dask arrays: every
block of ``chunk_sites`` rows (site draws) is one task that runs the neighbour
query and the kernels for its rows. :func:`build_cube` reads the inputs, builds
that graph, and computes it once while writing it to zarr (v3), into a hidden
sibling of the target that is renamed into place only when complete. It keeps
the structures read on disk (:func:`afpx.structures.read_spilled`, in a hidden
``.NAME.spill-XXXXXXXX`` next to the target), and every task reads back the
structures it needs, labels included: memory does not grow with the corpus
beyond two counts per structure.
:func:`open_cube` opens a cube lazily with its small per-site and
per-structure variables in memory, so that selections (:func:`select_sites`)
never read the fingerprints.

Layout (names from :mod:`afpx.schema`): dim ``site`` runs over (structure,
unique site, draw) in that order; dim ``structure`` over accepted structures;
dim ``reject`` over rejected inputs. See docs/cube-schema.md.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import itertools
import json
import logging
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from afpx import AfpxError, __version__, schema, store
from afpx._array import namespace_for_device, to_numpy
from afpx.kernels import (
    FingerprintParams,
    afp_kernel,
    conventions,
    draw_augmentation,
    row_generator,
)
from afpx.neighbours import count_within, nearest_neighbour_distances, neighbour_shells
from afpx.scheduler import compute as scheduler_compute
from afpx.scheduler import (
    set_mmap_threshold,
    task_slots,
    trim_memory,
    use_scheduler,
    workers_on_this_host,
)
from afpx.splits import SplitParams, assign_splits

if TYPE_CHECKING:
    import xarray as xr

    from afpx.structures import (
        AnalysedStructure,
        FilterParams,
        ReadResult,
        SpilledTable,
        StructureTable,
        TableRead,
    )

logger = logging.getLogger(__name__)

__all__ = [
    "FingerprintParams",
    "SplitParams",
    "append_to_cube",
    "build_cube",
    "compute_fingerprints",
    "cube_summary",
    "fingerprint_dataset",
    "fingerprint_structures",
    "open_cube",
    "select_sites",
    "site_mask",
    "verify_cube",
    "write_cube",
]

#: The paper's fingerprint parameters and split (defaults of every function here).
DEFAULT_FINGERPRINT = FingerprintParams()
DEFAULT_SPLIT = SplitParams()

#: How long to wait for a Dask scheduler given by address.

#: Attribute set (last) on a store once every chunk is written.
COMPLETE_ATTR = "afpx_complete"

#: Chunks (blocks of ``chunk_sites`` rows) a build computes and writes in one Dask
#: compute, or four per task slot of the scheduler where that is more: what Dask and the
#: memory allocator hold, which grows with the tasks of one compute, stays bounded, and
#: the memory freed is handed back between waves.
CHUNKS_PER_WAVE = 32

#: Structures per zarr chunk of the per-structure variables (ids, formulas,
#: sources, space groups, ...): a spilled build writes them a chunk at a time,
#: reading their labels back from disk, so that none is held for the whole corpus.
STRUCTURE_CHUNK = 8192

#: glibc's mmap threshold while the waves compute (:func:`afpx.scheduler.set_mmap_threshold`):
#: the fingerprints' arrays of 1 MiB or more are mapped on their own and handed back when
#: freed, rather than left in a heap that grows with the waves; None leaves glibc's own.
WAVE_MMAP_THRESHOLD: int | None = 2**20

#: Variables computed by the fingerprint tasks (the rest is known up front).
_COMPUTED = {
    schema.AFP: ("perspective_bin", schema.DTYPES[schema.AFP]),
    schema.R0: ((), schema.DTYPES[schema.R0]),
    schema.DMIN_RATIO: ((), schema.DTYPES[schema.DMIN_RATIO]),
    schema.COORDINATION: ((), schema.DTYPES[schema.COORDINATION]),
}

_STRING = np.dtypes.StringDType()


# -- the work of one block ---------------------------------------------------------------
@dataclass(frozen=True)
class _Block:
    """Rows ``start:stop`` of the cube and views of the structures they come from.

    An opaque payload, never traversed by Dask. It holds structures
    ``first, first + 1, ...`` of a :class:`~afpx.structures.StructureTable`
    as views, not copies: the graph of a large corpus keeps no second copy of
    its coordinates (a distributed scheduler gets each block's slices only).
    Structure ``first + i`` has atoms ``atom_start[i]:atom_start[i + 1]`` and
    unique sites ``site_start[i]:site_start[i + 1]``, offsets into the whole
    table (``frac_coords`` begins at atom ``atom_start[0]``, ``atoms`` at
    site ``site_start[0]``). Row ``r`` is draw ``r % draws`` of site ``r // draws``.
    """

    first: int
    start: int
    stop: int
    lattice: np.ndarray  # (k, 3, 3)
    atom_start: np.ndarray  # (k + 1,)
    frac_coords: np.ndarray  # (n_atoms, 3)
    site_start: np.ndarray  # (k + 1,)
    atoms: np.ndarray  # representative atom of every unique site
    dmin: np.ndarray  # (k,)

    @property
    def n_rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class _Options:
    params: FingerprintParams
    seed: int
    deterministic: bool
    device: str
    draws: int


#: Neighbour vectors gathered before :func:`_compute_block` hands its rows to the
#: kernel: ~0.8 MB of vectors (and as much jitter) at a time, not a whole block's
#: (~4 MB each for 256 rows of ~600 neighbours, doubled by joining them).
MAX_PENDING_PAIRS = 1 << 15


def _compute_block(block: _Block, options: _Options) -> dict[str, np.ndarray]:
    """Fingerprints and descriptors of the rows of one block (numpy out).

    Rows go to :func:`afp_kernel` a few at a time (:data:`MAX_PENDING_PAIRS`
    neighbours): a row's fingerprint does not depend on the rows beside it, so
    the result is the same, and the block's working memory stays small.
    """
    params = options.params
    xp = namespace_for_device(options.device)
    afp = np.empty((block.n_rows, params.n_perspectives, params.n_bins), dtype=np.float32)
    filled = 0
    vec_parts: list[np.ndarray] = []
    counts: list[int] = []
    r0_pending: list[float] = []
    rotations: list[np.ndarray] = []
    jitter: list[np.ndarray] = []
    r0_rows: list[np.ndarray] = []
    ratio_rows: list[np.ndarray] = []
    coord_rows: list[np.ndarray] = []

    def flush() -> None:
        nonlocal filled
        if not counts:
            return
        out = afp_kernel(
            xp.asarray(np.concatenate(vec_parts)),
            np.asarray(counts, dtype=np.int64),
            xp.asarray(np.asarray(r0_pending)),
            params=params,
            rotations=None if options.deterministic else xp.asarray(np.stack(rotations)),
            jitter=None if options.deterministic else xp.asarray(np.concatenate(jitter)),
        )
        afp[filled : filled + len(counts)] = to_numpy(out)
        filled += len(counts)
        for pending in (vec_parts, counts, r0_pending, rotations, jitter):
            pending.clear()

    n_pending = 0
    rows = np.arange(block.start, block.stop, dtype=np.int64)
    site, draw_of_row = rows // options.draws, rows % options.draws
    owner = np.searchsorted(block.site_start, site, side="right") - 1
    bounds = np.searchsorted(owner, np.arange(len(block.dmin) + 1))
    atom0, site0 = int(block.atom_start[0]), int(block.site_start[0])
    for i in range(len(block.dmin)):
        if bounds[i] == bounds[i + 1]:
            continue  # a structure without unique sites has no rows
        lattice = block.lattice[i]
        atoms_of = slice(block.atom_start[i] - atom0, block.atom_start[i + 1] - atom0)
        frac_coords = block.frac_coords[atoms_of]
        row_unique = site[bounds[i] : bounds[i + 1]] - block.site_start[i]
        row_draw = draw_of_row[bounds[i] : bounds[i + 1]]
        unique, position = np.unique(row_unique, return_inverse=True)
        sites = block.atoms[block.site_start[i] - site0 : block.site_start[i + 1] - site0]
        atoms = sites[unique].astype(np.int64)
        r0 = nearest_neighbour_distances(lattice, frac_coords, atoms)
        radii = [params.query_radius(float(r), deterministic=options.deterministic) for r in r0]
        vectors, n_neighbours = neighbour_shells(lattice, frac_coords, atoms, radii)
        coordination = count_within(vectors, n_neighbours, params.coordination_factor * r0)
        offsets = np.concatenate([[0], np.cumsum(n_neighbours)])
        for pos, draw in zip(position, row_draw, strict=True):
            v = vectors[offsets[pos] : offsets[pos + 1]]
            vec_parts.append(v)
            counts.append(len(v))
            r0_pending.append(float(r0[pos]))
            if not options.deterministic:
                rng = row_generator(options.seed, block.first + i, int(unique[pos]), int(draw))
                rotation, e = draw_augmentation(rng, len(v), sigma=params.jitter)
                rotations.append(rotation)
                jitter.append(e)
            n_pending += len(v)
            if n_pending >= MAX_PENDING_PAIRS:
                flush()
                n_pending = 0
        r0_rows.append(r0[position])
        ratio_rows.append(float(block.dmin[i]) / r0[position])
        coord_rows.append(coordination[position])
    flush()
    r0_all = np.concatenate(r0_rows) if r0_rows else np.zeros(0)
    return {
        schema.AFP: afp,
        schema.R0: r0_all.astype(schema.DTYPES[schema.R0]),
        schema.DMIN_RATIO: (np.concatenate(ratio_rows) if ratio_rows else np.zeros(0)).astype(
            schema.DTYPES[schema.DMIN_RATIO]
        ),
        schema.COORDINATION: (np.concatenate(coord_rows) if coord_rows else np.zeros(0)).astype(
            schema.DTYPES[schema.COORDINATION]
        ),
    }


@dataclass(frozen=True)
class _SpilledBlock:
    """Rows of a cube whose structures are read back from a spilled table (a task's payload).

    Structures ``first, first + 1, ...`` are rows ``pieces`` of the table's
    parts (:meth:`afpx.structures.SpilledTable.pieces`); ``start:stop`` are
    the block's rows counted from the first row of structure ``first``.
    """

    first: int
    start: int
    stop: int
    pieces: tuple[tuple[str, int, int], ...]


#: Per-site variables that a spilled block's task returns beside the fingerprints.
_LABELS: dict[str, tuple[tuple[()], Any]] = {
    schema.STRUCTURE_INDEX: ((), np.dtype(np.int64)),
    schema.DRAW: ((), schema.DTYPES[schema.DRAW]),
    schema.SITE_INDEX: ((), schema.DTYPES[schema.SITE_INDEX]),
    schema.Z: ((), schema.DTYPES[schema.Z]),
    schema.MULTIPLICITY: ((), schema.DTYPES[schema.MULTIPLICITY]),
    schema.WYCKOFF: ((), _STRING),
}


def _compute_spilled(spilled: _SpilledBlock, options: _Options) -> dict[str, np.ndarray]:
    """:func:`_compute_block` of rows read back from disk, and the rows' labels."""
    from afpx.structures import load_spilled

    table = load_spilled(spilled.pieces)
    block = _Block(
        first=spilled.first,
        start=spilled.start,
        stop=spilled.stop,
        lattice=table.lattice,
        atom_start=table.atom_start,
        frac_coords=table.frac_coords,
        site_start=table.site_start,
        atoms=table.site_index,
        dmin=table.dmin,
    )
    out = _compute_block(block, options)
    rows = np.arange(spilled.start, spilled.stop, dtype=np.int64)
    site = rows // options.draws
    owner = np.searchsorted(table.site_start, site, side="right") - 1
    labels = {
        schema.STRUCTURE_INDEX: spilled.first + owner,
        schema.DRAW: rows % options.draws,
        schema.SITE_INDEX: table.site_index[site],
        schema.Z: table.site_z[site],
        schema.MULTIPLICITY: table.multiplicity[site],
        schema.WYCKOFF: table.wyckoff[site],
    }
    for name, (_, dtype) in _LABELS.items():
        out[name] = labels[name].astype(dtype, copy=False)
    return out


@dataclass(frozen=True)
class _SpilledRows:
    """Rows of one spilled column (a task's payload)."""

    pieces: tuple[tuple[str, int, int], ...]
    column: str
    dtype: Any


def _load_rows(rows: _SpilledRows) -> np.ndarray:
    from afpx.structures import load_spilled_column

    return load_spilled_column(rows.pieces, rows.column).astype(rows.dtype, copy=False)


# -- row layout -------------------------------------------------------------------------------
def _row_table(table: StructureTable, draws: int) -> dict[str, np.ndarray]:
    """Per-row identity: structure, draw, and the site's labels (the table's arrays at one draw)."""
    n_unique = np.diff(table.site_start)
    n_sites = int(table.site_start[-1])

    def per_site(values: np.ndarray, dtype: Any) -> np.ndarray:
        # one draw: the table's own (read-only) array, not a copy (astype copies StringDType)
        values = values if draws == 1 else np.repeat(values, draws)
        return values if values.dtype == dtype else values.astype(dtype)

    return {
        schema.STRUCTURE_INDEX: np.repeat(np.arange(len(table), dtype=np.int64), n_unique * draws),
        schema.DRAW: np.tile(np.arange(draws, dtype=schema.DTYPES[schema.DRAW]), n_sites),
        schema.SITE_INDEX: per_site(table.site_index, schema.DTYPES[schema.SITE_INDEX]),
        schema.Z: per_site(table.site_z, schema.DTYPES[schema.Z]),
        schema.MULTIPLICITY: per_site(table.multiplicity, schema.DTYPES[schema.MULTIPLICITY]),
        schema.WYCKOFF: per_site(table.wyckoff, _STRING),
    }


def _block_bounds(
    site_start: np.ndarray, draws: int, chunk_sites: int
) -> Iterator[tuple[int, int, int, int]]:
    """Rows ``start:stop`` of each block of ``chunk_sites`` rows, its first and last structure."""
    n_rows = int(site_start[-1]) * draws
    for start in range(0, n_rows, chunk_sites):
        stop = min(start + chunk_sites, n_rows)
        ends = [start // draws, (stop - 1) // draws]  # sites of the first and last row
        first, last = np.searchsorted(site_start, ends, side="right") - 1
        yield start, stop, int(first), int(last)


def _blocks(table: StructureTable, draws: int, chunk_sites: int) -> list[_Block]:
    """Blocks of ``chunk_sites`` rows (the last one shorter), as views of ``table``."""
    blocks = []
    for start, stop, first, last in _block_bounds(table.site_start, draws, chunk_sites):
        atoms = slice(table.atom_start[first], table.atom_start[last + 1])
        sites = slice(table.site_start[first], table.site_start[last + 1])
        blocks.append(
            _Block(
                first=int(first),
                start=start,
                stop=stop,
                lattice=table.lattice[first : last + 1],
                atom_start=table.atom_start[first : last + 2],
                frac_coords=table.frac_coords[atoms],
                site_start=table.site_start[first : last + 2],
                atoms=table.site_index[sites],
                dmin=table.dmin[first : last + 1],
            )
        )
    return blocks


def _check_options(
    *, draws: int, seed: int, deterministic: bool, chunk_sites: int, device: str
) -> None:
    if not isinstance(draws, int | np.integer) or draws < 1:
        raise AfpxError(f"draws must be a positive integer, got {draws!r}")
    if deterministic and draws != 1:
        raise AfpxError(
            f"deterministic fingerprints are identical in every draw; use draws=1, not {draws}"
        )
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise AfpxError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(chunk_sites, int | np.integer) or chunk_sites < 1:
        raise AfpxError(f"chunk_sites must be a positive integer, got {chunk_sites!r}")
    namespace_for_device(device)  # a clear error now rather than inside a task


# -- eager and lazy computation ----------------------------------------------------------
def compute_fingerprints(
    structures: Sequence[AnalysedStructure],
    *,
    params: FingerprintParams = DEFAULT_FINGERPRINT,
    draws: int = 1,
    seed: int = 0,
    deterministic: bool = False,
    device: str = "cpu",
) -> dict[str, np.ndarray]:
    """Fingerprints of every row, computed eagerly in one batch (the reference).

    Parameters
    ----------
    structures : sequence of AnalysedStructure
    params : FingerprintParams
    draws : int
        Augmented draws per unique site.
    seed : int
        Seed of the augmentation (keyed by structure, unique site and draw).
    deterministic : bool
        No rotation and no jitter.
    device : {"cpu", "cuda"}

    Returns
    -------
    dict of str to ndarray
        ``afp`` (n_rows, n_perspectives, n_bins) float32, ``r0``,
        ``dmin_ratio``, ``coordination`` and the row identity (``structure``,
        ``draw``, ``site_index``, ``z``, ``multiplicity``, ``wyckoff``), with
        rows ordered (structure, unique site, draw).
    """
    from afpx.structures import StructureTable

    _check_options(
        draws=draws, seed=seed, deterministic=deterministic, chunk_sites=1, device=device
    )
    table = StructureTable.from_structures(structures)
    rows = _row_table(table, draws)
    n_rows = len(rows[schema.STRUCTURE_INDEX])
    if n_rows == 0:
        out: dict[str, np.ndarray] = {
            schema.AFP: np.zeros(
                (0, params.n_perspectives, params.n_bins), schema.DTYPES[schema.AFP]
            ),
            schema.R0: np.zeros(0, schema.DTYPES[schema.R0]),
            schema.DMIN_RATIO: np.zeros(0, schema.DTYPES[schema.DMIN_RATIO]),
            schema.COORDINATION: np.zeros(0, schema.DTYPES[schema.COORDINATION]),
        }
        out.update({name: np.array(values) for name, values in rows.items()})
        return out
    (block,) = _blocks(table, draws, n_rows)
    out = _compute_block(block, _Options(params, int(seed), deterministic, device, draws))
    out.update({name: np.array(values) for name, values in rows.items()})  # writable copies
    return out


def analyse_structures(
    structures: Sequence[Any], *, symprec: float = 0.01, angle_tolerance: float = 5.0
) -> list[AnalysedStructure]:
    """Pymatgen structures as :class:`~afpx.structures.AnalysedStructure` (unique sites found).

    Parameters
    ----------
    structures : sequence of pymatgen.core.Structure or AnalysedStructure
        Ordered structures; analysed ones are passed through.
    symprec, angle_tolerance : float
        Symmetry tolerances (spglib).

    Returns
    -------
    list of AnalysedStructure
        ``structure_id`` is the position in the input for pymatgen structures.
    """
    from afpx.structures import AnalysedStructure, unique_sites

    analysed = []
    for i, s in enumerate(structures):
        if isinstance(s, AnalysedStructure):
            analysed.append(s)
            continue
        table = unique_sites(s, symprec=symprec, angle_tolerance=angle_tolerance)
        analysed.append(
            AnalysedStructure(
                structure_id=str(i),
                source="<memory>",
                formula=s.composition.reduced_formula,
                lattice=np.asarray(s.lattice.matrix, dtype=np.float64),
                frac_coords=np.asarray(s.frac_coords, dtype=np.float64),
                numbers=np.asarray([site.specie.Z for site in s], dtype=np.int16),
                sites=table,
            )
        )
    return analysed


def fingerprint_structures(
    structures: Sequence[Any],
    *,
    params: FingerprintParams = DEFAULT_FINGERPRINT,
    draws: int = 1,
    seed: int = 0,
    deterministic: bool = False,
    device: str = "cpu",
    symprec: float = 0.01,
    angle_tolerance: float = 5.0,
) -> dict[str, np.ndarray]:
    """Fingerprints of the unique sites of pymatgen structures (no filters, no cube).

    Parameters
    ----------
    structures : sequence of pymatgen.core.Structure or AnalysedStructure
        Ordered structures; pymatgen ones are analysed for unique sites here.
    params, draws, seed, deterministic, device
        As for :func:`compute_fingerprints`.
    symprec, angle_tolerance : float
        Symmetry tolerances (spglib) for pymatgen structures.

    Returns
    -------
    dict of str to ndarray
        As :func:`compute_fingerprints`; ``structure`` indexes the input list.
    """
    return compute_fingerprints(
        analyse_structures(structures, symprec=symprec, angle_tolerance=angle_tolerance),
        params=params,
        draws=draws,
        seed=seed,
        deterministic=deterministic,
        device=device,
    )


class _SpilledBlocks(Sequence[_SpilledBlock]):
    """The blocks of a spilled table, each made when asked for from a few integers.

    What the graph of a large cube keeps per block is four int64 (its rows and
    its first and last structure), not a :class:`_SpilledBlock` with its own
    tuple of file names: the blocks' tasks (:class:`_Tasks`) are made as Dask
    asks for them, a wave at a time.
    """

    def __init__(self, folder: str, part_start: np.ndarray, bounds: np.ndarray) -> None:
        self.folder = folder
        self.part_start = part_start  # (n_parts + 1,): the first structure of every part
        self.bounds = bounds  # (n_blocks, 4): rows start, stop; first, last structure

    def __len__(self) -> int:
        return int(self.bounds.shape[0])

    def __getitem__(self, b: Any) -> Any:  # an int: the blocks are never sliced
        from afpx.structures import part_pieces

        start, stop, first, last = (int(v) for v in self.bounds[b])
        return _SpilledBlock(
            first=first,
            start=start,
            stop=stop,
            pieces=part_pieces(self.folder, self.part_start, first, last + 1),
        )


class _Tasks(Mapping[tuple[Any, ...], tuple[Any, ...]]):
    """The blocks' tasks, made when asked for: key ``(name, b)`` is ``(compute, blocks[b])``."""

    def __init__(self, name: str, compute: Any, blocks: Sequence[Any]) -> None:
        self.name, self.compute, self.blocks = name, compute, blocks

    def __getitem__(self, key: tuple[Any, ...]) -> tuple[Any, ...]:
        if (
            not isinstance(key, tuple)
            or len(key) != 2
            or key[0] != self.name
            or not isinstance(key[1], int)
            or not 0 <= key[1] < len(self.blocks)
        ):
            raise KeyError(key)
        return (self.compute, self.blocks[key[1]])

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return ((self.name, b) for b in range(len(self.blocks)))

    def __len__(self) -> int:
        return len(self.blocks)


class _Picks(Mapping[tuple[Any, ...], tuple[Any, ...]]):
    """The tasks of one variable's chunks, made when asked for: ``(pick, (source, b), var)``.

    Chunk ``b`` (key ``(name, b, 0, ...)``, ``ndim`` entries after the name)
    of variable ``var`` is item ``var`` of block ``b``'s result (task
    ``(source, b)``). The graph of a cube holds no task object per variable
    and block: the writes take their chunks from the blocks' results
    (:func:`afpx.store.chunk_waves`), and these tasks are made only where a
    variable is computed on its own.
    """

    def __init__(self, name: str, source: str, var: str, n_blocks: int, ndim: int) -> None:
        self.name, self.source, self.var = name, source, var
        self.n_blocks, self.ndim = n_blocks, ndim

    def __getitem__(self, key: tuple[Any, ...]) -> tuple[Any, ...]:
        if (
            not isinstance(key, tuple)
            or len(key) != self.ndim + 1
            or key[0] != self.name
            or any(k != 0 for k in key[2:])
            or not isinstance(key[1], int)
            or not 0 <= key[1] < self.n_blocks
        ):
            raise KeyError(key)
        return (store.pick, (self.source, key[1]), self.var)

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        zeros = (0,) * (self.ndim - 1)
        return ((self.name, b, *zeros) for b in range(self.n_blocks))

    def __len__(self) -> int:
        return self.n_blocks


def _lazy_computed(
    blocks: Sequence[_Block | _SpilledBlock], options: _Options, *, spilled: bool = False
) -> dict[str, Any]:
    """One Dask array per computed variable, all sharing one task per block.

    ``spilled``: the blocks are :class:`_SpilledBlock` and their tasks also
    give the per-site labels (:data:`_LABELS`).
    """
    params = options.params
    compute = functools.partial(_compute_spilled if spilled else _compute_block, options=options)
    site_chunks = (tuple(b.stop - b.start for b in blocks),)
    variables = {**_COMPUTED, **_LABELS} if spilled else _COMPUTED
    layout = {
        var: (
            (*site_chunks, (params.n_perspectives,), (params.n_bins,))
            if tail == "perspective_bin"
            else site_chunks,
            dtype,
        )
        for var, (tail, dtype) in variables.items()
    }
    return _picked_arrays("fingerprint", compute, blocks, layout)


def _picked_arrays(
    kind: str,
    compute: Any,
    payloads: Sequence[Any],
    layout: Mapping[str, tuple[tuple[tuple[int, ...], ...], Any]],
) -> dict[str, Any]:
    """Dask arrays sharing one task per chunk: chunk ``b`` of each is picked from task ``b``.

    Task ``b`` is ``compute(payloads[b])``, made when Dask asks for it (the
    graph holds the payloads only), and returns a dict with an item per
    variable of ``layout`` (variable -> (chunks, dtype)).
    """
    import dask.array as da
    from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

    # a fresh name per graph: a distributed client must never reuse another build's results
    token = uuid.uuid4().hex
    name = f"afpx-{kind}-{token}"
    base = HighLevelGraph({name: MaterializedLayer(_Tasks(name, compute, payloads))}, {name: set()})
    arrays: dict[str, Any] = {}
    for var, (chunks, dtype) in layout.items():
        var_name = f"afpx-{var}-{token}"
        keys = MaterializedLayer(_Picks(var_name, name, var, len(payloads), len(chunks)))
        graph = HighLevelGraph(
            {**base.layers, var_name: keys}, {**base.dependencies, var_name: {name}}
        )
        arrays[var] = da.Array(graph, var_name, chunks, dtype=dtype)
    return arrays


def fingerprint_dataset(
    read: ReadResult | TableRead,
    *,
    params: FingerprintParams = DEFAULT_FINGERPRINT,
    draws: int = 1,
    seed: int = 0,
    deterministic: bool = False,
    chunk_sites: int = schema.DEFAULT_CHUNK_SITES,
    device: str = "cpu",
    split: SplitParams = DEFAULT_SPLIT,
    sources: Sequence[str] | None = None,
) -> xr.Dataset:
    """The cube of accepted structures as a lazy Dataset (nothing computed yet).

    Parameters
    ----------
    read : ReadResult or TableRead
        Accepted structures and rejections from :func:`afpx.structures.read_structures`,
        :func:`afpx.structures.read_table` or :func:`afpx.structures.read_spilled`
        (the same cube from each).
    params : FingerprintParams
    draws : int
        Augmented draws per unique site (consecutive along ``site``).
    seed : int
        Augmentation seed; row (s, u, d) uses ``default_rng([seed, s, u, d])``.
    deterministic : bool
        No rotation and no jitter (needs ``draws=1``).
    chunk_sites : int
        Rows per Dask block and per zarr chunk.
    device : {"cpu", "cuda"}
        Where the kernels run.
    split : SplitParams
        Train/holdout/test assignment by reduced formula.
    sources : sequence of str, optional
        Inputs as given (recorded in ``attrs["sources"]``); defaults to the
        distinct sources of the structures.

    Returns
    -------
    xarray.Dataset
        ``afp``, ``r0``, ``dmin_ratio`` and ``coordination`` are Dask arrays
        chunked by ``chunk_sites``; everything else is in memory, but for a
        spilled table: then every per-site variable comes from the same
        tasks as the fingerprints, the lattices and atoms are Dask arrays
        reading the table's files (chunked as zarr chunks them), and so are
        the per-structure labels (ids, formulas, sources, space groups,
        ``dmin``, splits; chunks of :data:`STRUCTURE_CHUNK`), so that only
        the structures' counts and the rejections are in memory.

    Raises
    ------
    AfpxError
        For invalid options, or when no structure was accepted.
    """
    import xarray as xr

    from afpx.structures import SpilledTable, StructureTable, TableRead

    _check_options(
        draws=draws, seed=seed, deterministic=deterministic, chunk_sites=chunk_sites, device=device
    )
    table: StructureTable | SpilledTable
    if isinstance(read, TableRead):
        table = read.table
    else:
        table = StructureTable.from_structures(read.structures)
    if not len(table):
        raise AfpxError(
            f"no structure was accepted ({read.n_read} read, {len(read.rejections)} rejected"
            + "".join(f"; {reason}: {n}" for reason, n in read.counts().items())
            + "): nothing to fingerprint"
            + "".join(
                f"; first: {r.source}: {r.reason}: {r.message}; `afpx inspect` lists them all"
                for r in read.rejections[:1]
            )
        )
    options = _Options(params, int(seed), deterministic, device, draws)
    S, T, R = schema.SITE, schema.STRUCTURE, schema.REJECT
    if isinstance(table, SpilledTable):
        # every per-site, per-atom and per-structure variable is read back from disk by
        # the tasks; only the counts are in memory
        rows = computed = _lazy_computed(
            _spilled_blocks(table, draws, chunk_sites), options, spilled=True
        )
        geometry = _lazy_geometry(table)
        labels = {name: (T, array) for name, array in _lazy_labels(table, split).items()}
    else:
        rows = _row_table(table, draws)
        computed = _lazy_computed(_blocks(table, draws, chunk_sites), options)
        geometry = _geometry_variables(table)
        labels = {
            schema.STRUCTURE_ID: (T, table.structure_id),
            schema.FORMULA: (T, table.formula),
            schema.SOURCE: (T, table.source),
            schema.SPACEGROUP: (T, table.spacegroup.astype(schema.DTYPES[schema.SPACEGROUP])),
            schema.DMIN: (T, table.dmin.astype(schema.DTYPES[schema.DMIN])),
            schema.SPLIT: (T, assign_splits(table.formula, params=split).astype(_STRING)),
        }

    data: dict[str, Any] = {
        schema.AFP: ((S, schema.PERSPECTIVE, schema.BIN), computed[schema.AFP]),
        schema.R0: (S, computed[schema.R0]),
        schema.DMIN_RATIO: (S, computed[schema.DMIN_RATIO]),
        schema.COORDINATION: (S, computed[schema.COORDINATION]),
    }
    for name in (
        schema.Z,
        schema.MULTIPLICITY,
        schema.WYCKOFF,
        schema.SITE_INDEX,
        schema.STRUCTURE_INDEX,
        schema.DRAW,
    ):
        data[name] = (S, rows[name])
    data.update(labels)
    data.update(
        {
            schema.N_UNIQUE_SITES: (
                T,
                np.diff(table.site_start).astype(schema.DTYPES[schema.N_UNIQUE_SITES]),
            ),
            schema.REJECT_ID: (R, np.array([r.id for r in read.rejections], dtype=_STRING)),
            schema.REJECT_REASON: (R, np.array([r.reason for r in read.rejections], dtype=_STRING)),
            schema.REJECT_MESSAGE: (
                R,
                np.array(
                    [_reject_message(r.message, r.source, r.block) for r in read.rejections],
                    dtype=_STRING,
                ),
            ),
        }
    )
    data.update(geometry)
    if sources is None:
        distinct = table.sources if isinstance(table, SpilledTable) else table.source.tolist()
        sources = sorted(set(distinct))
    attrs = {
        "fingerprint": params.to_attrs(),
        "fingerprint_conventions": conventions(params),
        "filters": read.params.to_attrs(),
        "draws": int(draws),
        "seed": int(seed),
        "deterministic": bool(deterministic),
        "afpx_version": __version__,
        "sources": [str(s) for s in sources],
        "split": split.to_attrs(),
        "n_read": int(read.n_read),
        "chunk_sites": int(chunk_sites),
    }
    return xr.Dataset(data, attrs=json.loads(json.dumps(attrs)))


def _spilled_blocks(table: SpilledTable, draws: int, chunk_sites: int) -> _SpilledBlocks:
    """Blocks of ``chunk_sites`` rows (the last one shorter) of a spilled table."""
    bounds = []
    for start, stop, first, last in _block_bounds(table.site_start, draws, chunk_sites):
        row0 = int(table.site_start[first]) * draws
        bounds.append((start - row0, stop - row0, first, last))
    return _SpilledBlocks(
        table.folder, table.part_start.copy(), np.array(bounds, dtype=np.int64).reshape(-1, 4)
    )


def _zarr_chunks(shape: tuple[int, ...], dtype: Any) -> tuple[int, ...]:
    """The chunks zarr chooses for an array written without any (as in-memory variables are)."""
    import zarr
    from zarr.storage import MemoryStore

    return tuple(zarr.create_array(MemoryStore(), shape=shape, dtype=dtype, zarr_format=3).chunks)


def _lazy_geometry(table: SpilledTable) -> dict[str, Any]:
    """:func:`_geometry_variables` of a spilled table: Dask arrays that read it back."""
    import dask.array as da
    from dask.highlevelgraph import HighLevelGraph

    T, A = schema.STRUCTURE, schema.ATOM
    n_structures, n_atoms = len(table), int(table.atom_start[-1])
    token = uuid.uuid4().hex
    wanted = {
        schema.LATTICE: ((T, schema.VECTOR, schema.AXIS), "lattice", "structure", (3, 3)),
        schema.ATOM_FRAC_COORDS: ((A, schema.AXIS), "frac_coords", "atom", (3,)),
        schema.ATOM_Z: ((A,), "numbers", "atom", ()),
    }
    out: dict[str, Any] = {
        schema.N_ATOMS: (T, np.diff(table.atom_start).astype(schema.DTYPES[schema.N_ATOMS])),
    }
    for var, (dims, column, along, tail) in wanted.items():
        dtype = schema.DTYPES[var]
        n = n_structures if along == "structure" else n_atoms
        # Dask chunks along the first dim as zarr's own choice: each task writes whole chunks
        step = _zarr_chunks((n, *tail), dtype)[0]
        bounds = [*range(0, n, step), n]
        name = f"afpx-{var}-{token}"
        layer: dict[Any, Any] = {
            (name, i) + (0,) * len(tail): (
                _load_rows,
                _SpilledRows(table.pieces(lo, hi, along=along), column, dtype),
            )
            for i, (lo, hi) in enumerate(itertools.pairwise(bounds))
        }
        graph = HighLevelGraph.from_collections(name, layer, dependencies=())
        chunks = (tuple(np.diff(bounds).tolist()), *((t,) for t in tail))
        out[var] = (dims, da.Array(graph, name, chunks, dtype=dtype))
    return out


@dataclass(frozen=True)
class _SpilledLabels:
    """Structures ``pieces`` of a spilled table whose labels a task reads (its payload)."""

    pieces: tuple[tuple[str, int, int], ...]
    split: SplitParams


def _load_labels(rows: _SpilledLabels) -> dict[str, np.ndarray]:
    """The per-structure variables of some structures, read back from their parts."""
    from afpx.structures import load_spilled_column

    formula = load_spilled_column(rows.pieces, "formula")
    spacegroup = load_spilled_column(rows.pieces, "spacegroup")
    dmin = load_spilled_column(rows.pieces, "dmin")
    return {
        schema.STRUCTURE_ID: load_spilled_column(rows.pieces, "structure_id"),
        schema.FORMULA: formula,
        schema.SOURCE: load_spilled_column(rows.pieces, "source"),
        schema.SPACEGROUP: spacegroup.astype(schema.DTYPES[schema.SPACEGROUP]),
        schema.DMIN: dmin.astype(schema.DTYPES[schema.DMIN]),
        schema.SPLIT: assign_splits(formula, params=rows.split).astype(_STRING),
    }


def _lazy_labels(table: SpilledTable, split: SplitParams) -> dict[str, Any]:
    """The per-structure labels of a spilled table: Dask arrays sharing one task per chunk.

    Chunks of :data:`STRUCTURE_CHUNK` structures, as they are stored: each
    task reads its structures' labels from their parts, and the split is
    drawn from their formulas alone (it depends on nothing else).
    """
    n = len(table)
    bounds = [*range(0, n, STRUCTURE_CHUNK), n]
    payloads = [
        _SpilledLabels(table.pieces(lo, hi), split) for lo, hi in itertools.pairwise(bounds)
    ]
    chunks = (tuple(np.diff(bounds).tolist()),)
    dtypes = {
        schema.STRUCTURE_ID: _STRING,
        schema.FORMULA: _STRING,
        schema.SOURCE: _STRING,
        schema.SPACEGROUP: np.dtype(schema.DTYPES[schema.SPACEGROUP]),
        schema.DMIN: np.dtype(schema.DTYPES[schema.DMIN]),
        schema.SPLIT: _STRING,
    }
    layout = {var: (chunks, dtype) for var, dtype in dtypes.items()}
    return _picked_arrays("labels", _load_labels, payloads, layout)


def _geometry_variables(table: StructureTable) -> dict[str, Any]:
    """Lattices and atoms of every structure: what exporting templates as CIFs needs."""
    T, A = schema.STRUCTURE, schema.ATOM
    return {
        schema.LATTICE: (
            (T, schema.VECTOR, schema.AXIS),
            table.lattice.astype(schema.DTYPES[schema.LATTICE], copy=False),
        ),
        schema.N_ATOMS: (T, np.diff(table.atom_start).astype(schema.DTYPES[schema.N_ATOMS])),
        schema.ATOM_FRAC_COORDS: (
            (A, schema.AXIS),
            table.frac_coords.astype(schema.DTYPES[schema.ATOM_FRAC_COORDS], copy=False),
        ),
        schema.ATOM_Z: (A, table.numbers.astype(schema.DTYPES[schema.ATOM_Z], copy=False)),
    }


def structure_geometry(ds: xr.Dataset) -> dict[str, np.ndarray] | None:
    """The structures' geometry stored in a cube, or None for a cube without it.

    Parameters
    ----------
    ds : xarray.Dataset
        A cube (lazy or loaded).

    Returns
    -------
    dict of str to ndarray or None
        ``lattice`` (n_structures, 3, 3) in Å, ``atom_start`` (n_structures + 1,),
        ``frac_coords`` (n_atoms, 3) and ``numbers`` (n_atoms,): the arguments
        of :class:`afpx.templates.TemplateGeometry`, one template per structure.
        None when the cube lacks any of :data:`afpx.schema.GEOMETRY_VARIABLES`
        (cubes built before afpx stored it).

    Raises
    ------
    AfpxError
        When the counts and the atoms disagree.
    """
    if any(name not in ds.variables for name in schema.GEOMETRY_VARIABLES):
        return None
    n_atoms = np.asarray(ds[schema.N_ATOMS].values, dtype=np.int64)
    frac = np.asarray(ds[schema.ATOM_FRAC_COORDS].values, dtype=np.float64)
    numbers = np.asarray(ds[schema.ATOM_Z].values, dtype=np.int16)
    if int(n_atoms.sum()) != frac.shape[0] or frac.shape[0] != numbers.shape[0]:
        raise AfpxError(
            f"cube geometry is inconsistent: n_atoms sums to {int(n_atoms.sum())}, "
            f"{frac.shape[0]} coordinates and {numbers.shape[0]} atomic numbers; rebuild the cube"
        )
    return {
        "lattice": np.asarray(ds[schema.LATTICE].values, dtype=np.float64),
        "atom_start": np.concatenate([[0], np.cumsum(n_atoms)]).astype(np.int64),
        "frac_coords": frac,
        "numbers": numbers,
    }


def _reject_message(message: str, source: str, block: str | None) -> str:
    where = source if block is None else f"{source} [{block}]"
    return f"{message} ({where})"


# -- writing -------------------------------------------------------------------------------------
def _encoding(ds: xr.Dataset, chunk_sites: int) -> dict[str, dict[str, Any]]:
    from zarr.codecs import BloscCodec

    encoding: dict[str, dict[str, Any]] = {}
    for name, var in ds.variables.items():
        enc: dict[str, Any] = {}
        if schema.SITE in var.dims:
            enc["chunks"] = tuple(
                chunk_sites if d == schema.SITE else var.sizes[d] for d in var.dims
            )
        elif var.dims == (schema.STRUCTURE,):
            # written a chunk at a time from a spilled read: bounded work per chunk
            enc["chunks"] = (max(1, min(var.shape[0], STRUCTURE_CHUNK)),)
        elif store.is_lazy(var.data):
            # as zarr chunks the same variable written from memory: the same cube either way
            enc["chunks"] = _zarr_chunks(var.shape, var.dtype)
        if var.dtype.kind in "fiu":
            # lz4 + byte shuffle: ~1.5x on smooth float32 fingerprints, and fast
            enc["compressors"] = (
                BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=var.dtype.itemsize),
            )
        encoding[str(name)] = enc
    return encoding


def _is_cube(path: Path) -> bool:
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "afpx_version" in meta.get("attributes", {})


def write_cube(
    ds: xr.Dataset,
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    progress: bool | None = None,
    client: Any = None,
    resume: bool = False,
) -> Path | str:
    """Compute a lazy cube once and write it to ``path`` (zarr v3), atomically.

    The store is written into a hidden sibling (``.NAME.partial-XXXX``) and
    renamed to ``path`` only when every chunk is written, its checksums are
    recorded (:data:`afpx.store.CHECKSUMS_GROUP`) and the completion
    attribute is set; the rename never replaces a folder that appeared at
    ``path`` meanwhile. Partial builds of ``path`` left by killed runs are
    reported and removed, or continued with ``resume``. See :mod:`afpx.store`.

    A URL (``s3://bucket/cube.zarr``, any fsspec protocol) is written in
    place, since object stores have no rename: :data:`COMPLETE_ATTR` is set
    only once every chunk is written, and :func:`open_cube` refuses the store
    until then. Chunk checksums are recorded for local cubes only.

    Parameters
    ----------
    ds : xarray.Dataset
        From :func:`fingerprint_dataset`.
    path : str or path
        Target directory or URL; must not exist unless ``overwrite`` and it
        is an afpx cube.
    overwrite : bool
        Replace an existing cube (only after the new one is complete).
    progress : bool, optional
        Show a progress bar; None shows one when stderr is a terminal.
    client : distributed.Client, optional
        Compute on this client (as yielded by :func:`afpx.scheduler.use_scheduler`); None
        uses the current Dask scheduler.
    resume : bool
        Continue an interrupted build of ``path`` with the same inputs and
        options from its completed chunks; without one, build from the start.

    Returns
    -------
    pathlib.Path or str
        The local path, or the URL as given.

    Raises
    ------
    AfpxError
        If the target exists (and not ``overwrite``) or appeared during the
        build, is not a cube, its folder is missing or not writable, the disk
        filled up (the partial build is then kept for ``resume``), or another
        build of the same path is running; ``resume`` with a URL.
    """
    if store.is_url(path):
        return _write_url(
            ds, str(path), overwrite=overwrite, progress=progress, client=client, resume=resume
        )
    target = Path(path).expanduser().absolute()
    _check_target(target, overwrite=overwrite)
    return _write(ds, target, replace=overwrite, progress=progress, client=client, resume=resume)


def _check_url_target(url: str, *, overwrite: bool, resume: bool) -> None:
    if resume:
        raise AfpxError(
            f"--resume continues local builds only; build {url} again (with --overwrite)"
        )
    attrs = store.group_attrs(url) if store.exists(url) else None
    if store.exists(url):
        if attrs is None or "afpx_version" not in attrs:
            raise AfpxError(f"{url} exists and is not an afpx cube; refusing to replace it")
        if not overwrite:
            state = "" if attrs.get(COMPLETE_ATTR) else " (an unfinished build)"
            raise AfpxError(f"{url} exists{state}; choose another URL or pass --overwrite")


def _write_url(
    ds: xr.Dataset,
    url: str,
    *,
    overwrite: bool,
    progress: bool | None,
    client: Any,
    resume: bool,
) -> str:
    """Write a cube to a URL in place; :data:`COMPLETE_ATTR` is set last."""
    _check_url_target(url, overwrite=overwrite, resume=resume)
    if progress is None:
        progress = sys.stderr.isatty()
    encoding = _encoding(ds, int(ds.attrs.get("chunk_sites", schema.DEFAULT_CHUNK_SITES)))
    with client.as_current() if client is not None else contextlib.nullcontext():
        return store.publish(
            ds,
            url,
            complete_attr=COMPLETE_ATTR,
            overwrite=overwrite,
            encoding=encoding,
            progress=bool(progress),
        )


def _check_target(target: Path, *, overwrite: bool) -> None:
    if target.exists() or target.is_symlink():
        if not _is_cube(target):
            raise AfpxError(f"{target} exists and is not an afpx cube; refusing to replace it")
        if not overwrite:
            raise AfpxError(f"{target} exists; choose another path or pass --overwrite")
    if not target.parent.is_dir():
        raise AfpxError(f"the folder {target.parent} of the output does not exist")


def _take_partial(target: Path, key: str, resume: bool) -> Path | None:
    """The stale partial build to resume (if asked and one fits); remove the other stale ones."""
    resumed = None
    for partial in store.partials(target):
        if not store.stale_partial(partial):
            raise AfpxError(
                f"another build of {target} is running (in {partial}); wait for it to finish,"
                " or remove that folder if no build is running"
            )
        if resume and resumed is None and store.claim(partial, key):
            resumed = partial
            continue
        logger.warning("removing %s, left by an interrupted build of %s", partial, target)
        store.remove_partial(partial)
    if resume and resumed is None:
        logger.warning(
            "no interrupted build of %s with these inputs and options: building from the start",
            target,
        )
    return resumed


def _write(
    ds: xr.Dataset,
    target: Path,
    *,
    replace: bool,
    progress: bool | None,
    client: Any,
    resume: bool = False,
    base: Path | None = None,
    release: bool = False,
    key_extra: str = "",
) -> Path:
    """Write ``ds`` through a partial store and publish it at ``target`` (see write_cube).

    ``base``: a cube whose finished chunks equal the first chunks of ``ds``
    (an append); they are linked, not computed. ``release``: ``ds`` is the
    caller's own, made for this write: its variables in memory (per
    structure and per rejection) are removed from it once they are in the
    store, so that they are not held while the chunks are computed.
    ``key_extra``: what the key of a resumable build must also depend on (the
    digest of a spilled read: its labels are not in memory to hash).
    """
    import zarr

    chunk_sites = int(ds.attrs.get("chunk_sites", schema.DEFAULT_CHUNK_SITES))
    if progress is None:
        progress = sys.stderr.isatty()
    key = store.build_key(ds, extra=key_extra)
    partial = _take_partial(target, key, resume)
    resumed = partial is not None
    if partial is None:
        try:
            partial = store.new_partial(target, key)
        except OSError as exc:
            raise AfpxError(_os_message(exc, target, None)) from exc
    try:
        if resumed:
            logger.warning("resuming the interrupted build in %s", partial)
        else:
            store.start_store(ds, partial, _encoding(ds, chunk_sites))
            if base is not None:
                _link_base(ds, base, partial)
        if release:
            lazy = set(store.lazy_names(ds))
            for name in [str(n) for n in ds.variables if str(n) not in lazy]:
                del ds[name]
        if WAVE_MMAP_THRESHOLD is not None:
            set_mmap_threshold(WAVE_MMAP_THRESHOLD)
        per_wave = max(CHUNKS_PER_WAVE, 4 * task_slots(client))
        done = store.done_chunks(partial)
        waves = store.chunk_waves(ds, partial, done, per_wave)
        # one bar for the whole build, not one per wave
        with (
            client.as_current() if client is not None else contextlib.nullcontext(),
            _progress_bar(store.pending_chunks(ds, done), bool(progress)) as bar,
        ):
            for wave, n_chunks in waves:
                # what reading, the in-memory variables and the wave before freed would
                # otherwise stay resident under the fingerprints' own working memory
                trim_memory()
                scheduler_compute(wave)
                bar.update(n_chunks)
        trim_memory()  # the last wave's too: what comes next (a summary) starts from less
        store.finish(partial)
        zarr.open_group(partial, mode="r+").attrs[COMPLETE_ATTR] = True
        _publish(partial, target, replace=replace)
    except AfpxError:
        raise
    except OSError as exc:
        # disk full, permissions: keep what is done for --resume
        if not partial.exists():
            store.remove_partial(partial)  # its owner file
            raise AfpxError(_os_message(exc, target, None)) from exc
        raise AfpxError(_os_message(exc, target, partial)) from exc
    except KeyboardInterrupt:
        logger.warning("interrupted: the chunks written so far are kept in %s", partial)
        raise
    except BaseException:
        store.remove_partial(partial)
        raise
    finally:
        store.let_go(partial)
    return target


def _progress_bar(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="chunk", desc="writing", file=sys.stderr)


def _os_message(exc: OSError, target: Path, partial: Path | None) -> str:
    what = exc.strerror or str(exc)
    text = f"cannot write the cube {target}: {what}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        text += " (free some space"
    else:
        text += " (choose a writable folder"
    if partial is not None:
        return text + f"; the chunks written so far are kept in {partial} for --resume)"
    return text + ")"


def _publish(partial: Path, target: Path, *, replace: bool) -> None:
    """Rename the finished partial to ``target``; never over something that appeared there."""
    if replace and (target.exists() or target.is_symlink()):
        if not _is_cube(target):
            raise AfpxError(
                f"{target} is no longer an afpx cube; the new cube is kept in {partial}"
            )
        store.exchange(partial, target)  # the partial now holds the old cube
        store.remove_partial(partial)
        return
    try:
        store.rename_noreplace(partial, target)
    except FileExistsError:
        raise AfpxError(
            f"{target} appeared while the cube was built; the new cube is kept in {partial}:"
            " move it there yourself, or build again with --overwrite"
        ) from None
    store.release(partial)


def _link_base(ds: xr.Dataset, base: Path, partial: Path) -> None:
    """Link the chunks of the cube ``base`` that ``ds`` holds unchanged."""
    import zarr

    group = zarr.open_group(base, mode="r")
    for name in store.lazy_names(ds):
        if name not in group:
            continue
        old = group[name]
        array = ds[name].data
        if not isinstance(old, zarr.Array) or old.chunks[0] != array.chunks[0][0]:
            continue
        bounds = np.cumsum(array.chunks[0])
        full = [i for i, stop in enumerate(bounds) if stop <= old.shape[0]]
        store.link_chunks(base, partial, name, array.ndim, full)


def build_cube(
    inputs: ReadResult | TableRead | Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    params: FingerprintParams = DEFAULT_FINGERPRINT,
    draws: int = 1,
    seed: int = 0,
    deterministic: bool = False,
    chunk_sites: int = schema.DEFAULT_CHUNK_SITES,
    device: str = "cpu",
    scheduler: str | None = None,
    workers: int | None = None,
    filters: FilterParams | None = None,
    split: SplitParams = DEFAULT_SPLIT,
    overwrite: bool = False,
    progress: bool | None = None,
    max_file_mb: float | None = None,
    resume: bool = False,
) -> Path | str:
    """Read structures, fingerprint every unique site, and write the cube.

    Parameters
    ----------
    inputs : ReadResult or TableRead, or str / path / sequence of them
        Anything :func:`afpx.structures.read_structures` takes (CIF files,
        folders, JSON lines, ASE databases, dataset names such as
        ``"oqmd-icsd"``), read with :func:`afpx.structures.read_table`; or
        structures already read.
    path : str or path
        Output zarr store: a local path, or a URL such as
        ``s3://bucket/cube.zarr`` (written in place, complete once
        ``attrs["afpx_complete"]`` is set; see :func:`write_cube`).
    params : FingerprintParams
    draws, seed, deterministic, chunk_sites, device
        See :func:`fingerprint_dataset`.
    scheduler : str, optional
        Address of a Dask distributed scheduler.
    workers : int, optional
        Start a local Dask cluster of this many processes (and read the
        inputs with as many processes).
    filters : FilterParams, optional
        Quality filters for reading (defaults: the paper's).
    split : SplitParams
    overwrite : bool
        Replace an existing cube at ``path``.
    progress : bool, optional
        Progress bars; None shows them on a terminal only.
    max_file_mb : float, optional
        Cap on one CIF or JSON file (see :func:`afpx.structures.read_structures`).
    resume : bool
        Continue an interrupted build of ``path`` with the same inputs and
        options from its finished chunks (see :func:`write_cube`).

    Returns
    -------
    pathlib.Path or str
        The written store (a URL as given).

    Raises
    ------
    AfpxError
        For invalid options, an existing output, unreadable inputs, or when no
        structure is accepted. The output path is then untouched.
    """
    from afpx.structures import MAX_FILE_MB, FilterParams, ReadResult, TableRead

    _check_options(
        draws=draws, seed=seed, deterministic=deterministic, chunk_sites=chunk_sites, device=device
    )
    url = str(path) if store.is_url(path) else None
    target = Path(path).expanduser().absolute() if url is None else Path(str(path))
    # fail before the (long) read rather than after it
    if url is not None:
        _check_url_target(url, overwrite=overwrite, resume=resume)
    else:
        _check_target(target, overwrite=overwrite)
    if not isinstance(inputs, ReadResult | TableRead):
        items = [inputs] if isinstance(inputs, str | os.PathLike) else list(inputs)
        for item in items:
            if Path(item).expanduser().absolute() == target:
                raise AfpxError(f"the output {target} is also an input")
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(use_scheduler(scheduler, workers=workers))
        read: ReadResult | TableRead
        if isinstance(inputs, ReadResult | TableRead):
            read, sources = inputs, None
        else:
            read = _read_inputs(
                items,
                target,
                stack,
                client,
                local=url is None,
                filters=filters if filters is not None else FilterParams(),
                progress=progress,
                max_file_mb=MAX_FILE_MB if max_file_mb is None else max_file_mb,
            )
            sources = [str(i) for i in items]
        logger.info("read: %s", read.summary().replace("\n", ", "))
        ds = fingerprint_dataset(
            read,
            params=params,
            draws=draws,
            seed=seed,
            deterministic=deterministic,
            chunk_sites=chunk_sites,
            device=device,
            split=split,
            sources=sources,
        )
        digest = _spill_digest(read)
        del read  # the dataset holds what the cube needs (a table's arrays, not copies)
        if url is not None:
            return write_cube(
                ds, url, overwrite=overwrite, progress=progress, client=client, resume=resume
            )
        _check_target(target, overwrite=overwrite)  # again: the read took a while
        # the dataset is this build's own: what is written up front is not kept meanwhile
        return _write(
            ds,
            target,
            replace=overwrite,
            progress=progress,
            client=client,
            resume=resume,
            release=True,
            key_extra=digest,
        )
    raise AssertionError("unreachable")  # pragma: no cover - ExitStack swallows nothing


def _read_inputs(
    items: Sequence[str | os.PathLike[str]],
    target: Path,
    stack: contextlib.ExitStack,
    client: Any,
    *,
    local: bool,
    filters: FilterParams,
    progress: bool | None,
    max_file_mb: float,
) -> TableRead:
    """Read ``items`` on the scheduler that will fingerprint them (build and append alike).

    Where the workers share this machine's disk, the bulk goes to a spill
    folder as it is read (next to a local ``target``, removed when ``stack``
    closes) and every task reads back its own rows; otherwise the tasks
    carry their rows, read into memory here.
    """
    from afpx.structures import read_spilled, read_table

    if workers_on_this_host(client):
        folder = stack.enter_context(_spill_folder(target, local=local))
        read = read_spilled(
            items, folder, params=filters, progress=progress, max_file_mb=max_file_mb
        )
        # what the reading waves freed, handed back before the imports and graphs that
        # come next are laid over it (resident after reading, untrimmed: 175 MiB at 4x
        # oqmd-icsd, 185 MiB at 8x; trimmed at the first wave: 173 / 174 MiB)
        trim_memory()
        return read
    return read_table(items, params=filters, progress=progress, max_file_mb=max_file_mb)


def _spill_digest(read: ReadResult | TableRead) -> str:
    """What a resumed build checks beyond the dataset: the digest of a spilled read's parts."""
    from afpx.structures import SpilledTable, TableRead

    if isinstance(read, TableRead) and isinstance(read.table, SpilledTable):
        return read.table.digest
    return ""


@contextlib.contextmanager
def _spill_folder(target: Path, *, local: bool) -> Iterator[Path]:
    """A folder for the structures read, next to a local target (else a temporary one).

    Removed when the build ends, whatever the outcome; one left by a killed
    build of the same target is removed by the next build (see
    :func:`afpx.store.new_spill`).
    """
    if local:
        store.remove_stale_spills(target)
        folder = store.new_spill(target)
    else:
        folder = Path(tempfile.mkdtemp(prefix="afpx-spill-"))
    try:
        yield folder
    finally:
        if local:
            store.remove_partial(folder)
            store.let_go(folder)
        else:
            shutil.rmtree(folder, ignore_errors=True)


def append_to_cube(
    inputs: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    device: str = "cpu",
    scheduler: str | None = None,
    workers: int | None = None,
    progress: bool | None = None,
    max_file_mb: float | None = None,
    resume: bool = False,
) -> Path:
    """Add the structures of ``inputs`` to the cube at ``path``.

    The result equals, bit for bit, a one-shot build of the cube's recorded
    ``sources`` followed by ``inputs`` with the cube's options (fingerprint,
    filters, draws, seed, chunking, split): the recorded sources are read
    again (not fingerprinted), the cube's finished chunks are linked into the
    new store, and only the chunks from the first one holding new rows on are
    computed. The new store replaces the cube in one rename once complete; a
    failure leaves the cube as it was. Variables added to the cube later
    (``likelihood``) are not carried over.

    Parameters
    ----------
    inputs : str or path, or a sequence of them
        New CIF files, folders, JSON files, ASE databases or dataset names.
    path : str or path
        An existing cube.
    device, scheduler, workers, progress, max_file_mb, resume
        As for :func:`build_cube`.

    Returns
    -------
    pathlib.Path

    Raises
    ------
    AfpxError
        If ``path`` is not a complete cube, an input is already one of its
        sources, its sources cannot be read any more or now give other
        structures (then rebuild it), or nothing new is accepted.
    """
    from afpx.structures import MAX_FILE_MB, FilterParams

    if store.is_url(path):
        raise AfpxError(
            f"appending works on local cubes only ({path}): build the cube at the URL again"
            " from all its sources"
        )
    target = Path(path).expanduser().absolute()
    # lazy: the old cube's values are compared a chunk at a time (_check_prefix)
    old = open_cube(target, load=False)
    attrs = old.attrs
    old_sources = [str(s) for s in attrs.get("sources", [])]
    items = [inputs] if isinstance(inputs, str | os.PathLike) else list(inputs)
    known = {Path(s).expanduser().absolute() for s in old_sources} | set(old_sources)
    for item in items:
        if str(item) in known or Path(item).expanduser().absolute() in known:
            raise AfpxError(f"{item} is already a source of the cube {target}")
        if Path(item).expanduser().absolute() == target:
            raise AfpxError(f"the output {target} is also an input")
    for source in old_sources:
        if not Path(source).exists() and not _is_dataset(source):
            raise AfpxError(
                f"the cube's source {source} cannot be found (from {os.getcwd()}); appending"
                " reads the cube's sources again: run from the folder it was built in"
            )
    filters = FilterParams(**attrs["filters"])
    split_attrs = attrs["split"]
    split = SplitParams(
        seed=int(split_attrs["seed"]),
        fractions=tuple(float(split_attrs["fractions"][k]) for k in schema.SPLITS),  # type: ignore[arg-type]
    )
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(use_scheduler(scheduler, workers=workers))
        read = _read_inputs(
            [*old_sources, *items],
            target,
            stack,
            client,
            local=True,
            filters=filters,
            progress=progress,
            max_file_mb=MAX_FILE_MB if max_file_mb is None else max_file_mb,
        )
        ds = fingerprint_dataset(
            read,
            params=FingerprintParams.from_attrs(attrs["fingerprint"]),
            draws=int(attrs["draws"]),
            seed=int(attrs["seed"]),
            deterministic=bool(attrs["deterministic"]),
            chunk_sites=int(attrs["chunk_sites"]),
            device=device,
            split=split,
            sources=[*old_sources, *(str(i) for i in items)],
        )
        _check_prefix(ds, old, target)
        if ds.sizes[schema.STRUCTURE] == old.sizes[schema.STRUCTURE]:
            raise AfpxError(
                f"no new structure accepted from {', '.join(map(str, items))}"
                f" ({read.summary().splitlines()[-1] if read.rejections else 'nothing read'});"
                f" the cube {target} is unchanged"
            )
        digest = _spill_digest(read)
        del read  # the dataset holds what the cube needs
        dropped = sorted(str(n) for n in old.data_vars if n not in ds.variables)
        if dropped:
            logger.warning("the appended cube drops %s: compute it again", ", ".join(dropped))
        # the dataset is this append's own: what is written up front is not kept meanwhile
        return _write(
            ds,
            target,
            replace=True,
            progress=progress,
            client=client,
            resume=resume,
            base=target,
            release=True,
            key_extra=digest,
        )
    raise AssertionError("unreachable")  # pragma: no cover - ExitStack swallows nothing


def _is_dataset(name: str) -> bool:
    from afpx import datasets

    return name in datasets.DATASETS


#: Rows of an in-memory variable that an append compares with the old cube at a time.
_PREFIX_ROWS = 1 << 16


def _check_prefix(ds: xr.Dataset, old: xr.Dataset, target: Path) -> None:
    """Refuse unless ``ds`` begins with the values of the old cube ``old`` (opened lazily).

    Compared a block at a time, so that neither side is held whole: a lazy
    variable of ``ds`` (a spilled read's labels and geometry) a chunk at a
    time, the blocks of the variables sharing chunks computed together (they
    share their tasks); an in-memory one :data:`_PREFIX_ROWS` rows at a time.
    The fingerprint tasks' own outputs are not compared (computing them
    would fingerprint the old structures again): the fingerprints, and in a
    spilled read also the per-site labels, which follow from the geometry
    and the unique-site counts that are compared.
    """
    import dask

    task_outputs = {*_COMPUTED, *_LABELS}
    lazy = set(store.lazy_names(ds))
    groups: dict[tuple[bool, tuple[int, ...]], list[str]] = {}
    for name in sorted(str(n) for n in old.variables):
        if name not in ds.variables or (name in lazy and name in task_outputs):
            continue
        var = ds.variables[name]
        if var.dims != old[name].dims:
            continue
        if var.ndim == 0 or any(ds.sizes[d] < old.sizes[d] for d in var.dims):
            _compare_prefix(name, np.asarray(var.values), old[name].values, target)
            continue
        n = old.sizes[var.dims[0]]
        if name in lazy:
            bounds = np.cumsum((0, *ds[name].data.chunks[0]))
        else:
            bounds = np.arange(0, n, _PREFIX_ROWS)
        edges = (*(int(b) for b in bounds if b < n), n)
        groups.setdefault((name in lazy, edges), []).append(name)
    for (is_lazy, edges), names in groups.items():
        for lo, hi in itertools.pairwise(edges):
            heads = [_prefix_window(ds, old, name, lo, hi) for name in names]
            if is_lazy:
                heads = list(scheduler_compute(*heads))
            for name, head in zip(names, heads, strict=True):
                before = _prefix_window(old, old, name, lo, hi)
                if store.is_lazy(before):
                    # the old cube is local: read here, not on the workers
                    (before,) = dask.compute(before, scheduler="synchronous")
                _compare_prefix(name, np.asarray(head), np.asarray(before), target)


def _prefix_window(ds: xr.Dataset, old: xr.Dataset, name: str, lo: int, hi: int) -> Any:
    """Rows ``lo:hi`` of ``ds[name]``, cut to the old cube's sizes along its other dimensions."""
    var = ds.variables[name]
    window = {d: slice(0, old.sizes[d]) for d in var.dims[1:]}
    return var.isel({var.dims[0]: slice(lo, hi), **window}).data


def _compare_prefix(name: str, head: np.ndarray, before: np.ndarray, target: Path) -> None:
    """Raise unless ``head`` begins with ``before`` (rows; text compared as Python strings)."""
    head, before = np.atleast_1d(head), np.atleast_1d(before)
    if head.dtype.kind not in "biuf" or before.dtype.kind not in "biuf":
        head = np.asarray(head.tolist(), dtype=object)
        before = np.asarray(before.tolist(), dtype=object)
    if head.shape[1:] != before.shape[1:] or not np.array_equal(head[: len(before)], before):
        raise AfpxError(
            f"the cube {target} no longer matches its sources (`{name}` differs: changed"
            " files, other afpx version or split rule); rebuild it with afpx build-cube"
        )


# -- reading --------------------------------------------------------------------------------------
def open_cube(path: str | os.PathLike[str], *, load: bool = True) -> xr.Dataset:
    """Open a cube lazily; its small variables are loaded, the fingerprints are not.

    Every one-dimensional variable (per site, per structure, per rejection)
    is read into memory, so boolean selections on them work at once; ``afp``
    and any (site, element) arrays stay lazy Dask arrays.

    Parameters
    ----------
    path : str or path
        A store written by :func:`build_cube` (a local path; URLs go to xarray as they are).
    load : bool
        Load the one-dimensional variables; False leaves every variable lazy
        (what :func:`cube_summary` reads is then read by it alone: a few
        per-site variables, not all of them).

    Returns
    -------
    xarray.Dataset

    Raises
    ------
    AfpxError
        If nothing is there, it is not a zarr store, the build that wrote it
        did not finish, or a chunk file recorded at write time is missing or
        has another size (:func:`verify_cube` checks the contents).
    """
    import xarray as xr

    where = os.fspath(path)
    if not store.exists(where):  # a local path or a URL
        raise AfpxError(f"no cube at {where}: build one with `afpx build-cube`")
    try:
        ds = xr.open_zarr(where, consolidated=False, zarr_format=3)
    except Exception as exc:  # zarr raises several kinds for a non-store
        raise AfpxError(f"{where} is not a readable zarr (v3) store: {exc}") from exc
    if not ds.attrs.get(COMPLETE_ATTR, False):
        raise AfpxError(
            f"{where} is not a complete afpx cube (its build did not finish); build it again"
        )
    if "://" not in where:
        store.check_chunks(Path(where))  # a deleted or truncated chunk: stat calls only
    schema.check_cube(ds)
    if not load:
        return ds
    small = [name for name, var in ds.variables.items() if var.ndim == 1]
    return ds.assign({name: ds[name].load() for name in small})


def verify_cube(path: str | os.PathLike[str]) -> tuple[int, list[str]]:
    """Check every chunk file of a cube against the sha256 recorded when it was written.

    Parameters
    ----------
    path : str or path
        A local cube.

    Returns
    -------
    (int, list of str)
        The number of chunk files checked and one line per damaged one.

    Raises
    ------
    AfpxError
        If ``path`` is not a complete cube, or records no checksums.
    """
    if store.is_url(path):
        raise AfpxError(
            f"chunk checksums are recorded for local cubes only; {path} cannot be verified"
        )
    where = Path(path)
    if not _is_cube(where):
        raise AfpxError(f"no afpx cube at {where}: build one with `afpx build-cube`")
    return store.verify_chunks(where)


def site_mask(
    ds: xr.Dataset,
    *,
    element: int | str | Sequence[int | str] | None = None,
    structure: int | str | Sequence[int | str] | None = None,
    split: str | Sequence[str] | None = None,
    draw: int | None = None,
) -> np.ndarray:
    """Boolean mask along ``site`` for the given criteria (all must hold).

    Parameters
    ----------
    ds : xarray.Dataset
        A cube (from :func:`open_cube` or :func:`fingerprint_dataset`).
    element : int or str or sequence, optional
        Atomic number(s) or symbol(s) on the site.
    structure : int or str or sequence, optional
        Structure index (int) or ``structure_id`` (str).
    split : str or sequence of str, optional
        ``"train"``, ``"holdout"`` and/or ``"test"``.
    draw : int, optional
        Only this augmentation draw.

    Returns
    -------
    ndarray of shape (n_sites,), bool
    """
    z = np.asarray(ds[schema.Z].values)
    mask = np.ones(z.shape, dtype=bool)
    site_structure = np.asarray(ds[schema.STRUCTURE_INDEX].values)
    if element is not None:
        mask &= np.isin(z, [_atomic_number(e) for e in _as_list(element)])
    if structure is not None:
        ids = np.asarray(ds[schema.STRUCTURE_ID].values.tolist(), dtype=object)
        wanted = []
        for s in _as_list(structure):
            if isinstance(s, str):
                hits = np.flatnonzero(ids == s)
                if not len(hits):
                    raise AfpxError(f"no structure with id {s!r} in the cube")
                wanted.extend(hits.tolist())
            else:
                if not 0 <= int(s) < len(ids):
                    raise AfpxError(f"structure index {s} outside 0..{len(ids) - 1}")
                wanted.append(int(s))
        mask &= np.isin(site_structure, wanted)
    if split is not None:
        splits = _as_list(split)
        unknown = sorted(set(map(str, splits)) - set(schema.SPLITS))
        if unknown:
            raise AfpxError(f"unknown split {unknown}; choose from {', '.join(schema.SPLITS)}")
        per_structure = np.isin(np.asarray(ds[schema.SPLIT].values.tolist(), dtype=object), splits)
        mask &= per_structure[site_structure]
    if draw is not None:
        mask &= np.asarray(ds[schema.DRAW].values) == draw
    return mask


def select_sites(ds: xr.Dataset, **criteria: Any) -> xr.Dataset:
    """The cube restricted to the sites of :func:`site_mask` (``structure`` dim kept).

    Examples
    --------
    ``select_sites(cube, element="Mn", split="test")`` — all Mn sites of test
    structures; the fingerprints stay lazy.
    """
    return ds.isel({schema.SITE: np.flatnonzero(site_mask(ds, **criteria))})


def _as_list(x: Any) -> list[Any]:
    if isinstance(x, str | int | np.integer):
        return [x]
    return list(x)


def _atomic_number(e: int | str) -> int:
    if isinstance(e, int | np.integer):
        return int(e)
    symbols = schema.element_symbols()
    if e not in symbols:
        raise AfpxError(f"unknown element symbol {e!r}")
    return symbols.index(e) + 1


#: Sites or structures :func:`cube_summary` reads at a time.
_SUMMARY_SLICE = 1 << 16


def cube_summary(ds: xr.Dataset, *, path: str | None = None) -> str:
    """A human summary of a cube: sizes, counts per element and split, parameters, rejections."""
    symbols = schema.element_symbols()
    n_sites = ds.sizes[schema.SITE]
    lines = []
    if path is not None:
        lines.append(f"cube: {path}")
        local = Path(path)
        if local.is_dir():
            size = sum(f.stat().st_size for f in local.rglob("*") if f.is_file())
            lines.append(f"size on disk: {size / 2**20:.1f} MiB")
            for partial in store.partials(local.absolute()):
                state = "stale" if store.stale_partial(partial) else "running"
                lines.append(f"partial build next to it ({state}): {partial}")
    afp = ds[schema.AFP]
    lines += [
        f"afpx version: {ds.attrs.get('afpx_version')}",
        f"structures: {ds.sizes[schema.STRUCTURE]}",
        f"sites: {n_sites} ({ds.attrs.get('draws')} draw(s) per unique site, "
        f"deterministic={ds.attrs.get('deterministic')}, seed={ds.attrs.get('seed')})",
        f"afp: {' x '.join(map(str, afp.shape))} {afp.dtype}, "
        f"{afp.size * afp.dtype.itemsize / 2**30:.2f} GiB in memory, "
        f"chunks of {afp.chunks[0][0] if afp.chunks else n_sites} sites",
    ]
    # counted a slice at a time: nothing held per site or per structure of a large cube
    n_structures = ds.sizes[schema.STRUCTURE]
    sites_of = np.zeros(n_structures, dtype=np.int64)
    per_z: collections.Counter[int] = collections.Counter()
    for lo in range(0, n_sites, _SUMMARY_SLICE):
        hi = min(lo + _SUMMARY_SLICE, n_sites)
        index = np.asarray(ds[schema.STRUCTURE_INDEX][lo:hi].values, dtype=np.int64)
        sites_of += np.bincount(index, minlength=n_structures)
        values, n = np.unique(np.asarray(ds[schema.Z][lo:hi].values), return_counts=True)
        per_z.update(dict(zip(values.tolist(), n.tolist(), strict=True)))
    structures = dict.fromkeys(schema.SPLITS, 0)
    sites = dict.fromkeys(schema.SPLITS, 0)
    for lo in range(0, n_structures, _SUMMARY_SLICE):
        split = np.asarray(ds[schema.SPLIT][lo : lo + _SUMMARY_SLICE].values)
        for name in schema.SPLITS:
            mine = split == name
            structures[name] += int(mine.sum())
            sites[name] += int(sites_of[lo : lo + _SUMMARY_SLICE][mine].sum())
    lines.append("split: structures / sites")
    for name in schema.SPLITS:
        lines.append(f"  {name}: {structures[name]} / {sites[name]}")
    zs = np.array(sorted(per_z), dtype=np.int64)
    counts = np.array([per_z[z] for z in zs.tolist()], dtype=np.int64)
    order = np.argsort(-counts, kind="stable")
    per_element = ", ".join(f"{symbols[zs[i] - 1]} {counts[i]}" for i in order)
    lines.append(f"sites per element ({len(zs)} elements): {per_element}")
    fp = ds.attrs.get("fingerprint", {})
    shown = [
        "perspective_distances",
        "jitter",
        "r_max",
        "n_fine_bins",
        "kaiser_width",
        "kaiser_beta",
        "n_bins",
        "coordination_factor",
    ]
    lines.append("fingerprint: " + ", ".join(f"{k}={fp[k]}" for k in shown if k in fp))
    lines.append(
        "filters: " + ", ".join(f"{k}={v}" for k, v in ds.attrs.get("filters", {}).items())
    )
    lines.append(f"sources: {', '.join(ds.attrs.get('sources', []))}")
    n_rej = ds.sizes.get(schema.REJECT, 0)
    lines.append(f"rejected: {n_rej} of {ds.attrs.get('n_read', '?')} read")
    if n_rej:
        reasons, counts = np.unique(
            np.asarray(ds[schema.REJECT_REASON].values.tolist(), dtype=object), return_counts=True
        )
        lines += [f"  {r}: {c}" for r, c in zip(reasons, counts, strict=True)]
    extra = sorted(
        str(name)
        for name in ds.data_vars
        if str(name)
        not in {
            schema.AFP,
            schema.R0,
            schema.DMIN_RATIO,
            schema.COORDINATION,
            schema.Z,
            schema.MULTIPLICITY,
            schema.WYCKOFF,
            schema.SITE_INDEX,
            schema.STRUCTURE_INDEX,
            schema.DRAW,
            schema.STRUCTURE_ID,
            schema.FORMULA,
            schema.SOURCE,
            schema.SPACEGROUP,
            schema.N_UNIQUE_SITES,
            schema.DMIN,
            schema.SPLIT,
            schema.REJECT_ID,
            schema.REJECT_REASON,
            schema.REJECT_MESSAGE,
        }
    )
    if extra:
        lines.append(f"other variables: {', '.join(extra)}")
    return "\n".join(lines)
