"""Screening a chemical space: rank every element set of one size, on Dask, into one store.

:func:`screen` ranks the compositions of every ``k``-element subset of a list
of elements (all ternaries of 20 elements: 1,140 sets) with the ranking of
``afpx rank`` (:func:`afpx.rank.rank_table`), and writes the ``top`` rows of
each set into one zarr store, labelled by element set and row:

* per set (dim ``element_set``): ``elements`` (atomic numbers, dim ``slot``),
  ``n_rows``, ``n_compositions``, ``n_candidates``, ``n_set_templates`` and
  ``done`` (the set's batch is written);
* per row (dims ``element_set`` × ``row``): the variables of a ranking —
  ``formula``, ``counts`` (per ``slot``), ``score``, ``log_score``, ``rank``
  (with its optimistic and pessimistic bounds and ``n_tied``), ``template``,
  ``structure_id``, ``template_formula``, ``spacegroup``, ``source``,
  ``assignment_text``, ``candidate_counts``, ``n_templates``,
  ``n_best_templates`` and, with ``known``, ``known``. Rows past ``n_rows``
  hold fill values (``""``, NaN, -1, False).

The sets are cut into batches of ``batch_size``; each batch is one Dask task
that ranks its sets and writes its own chunk of every variable (chunks are
one batch long, so concurrent writes never share a chunk), then marks the
batch done. The graph runs on the current Dask scheduler
(:func:`afpx.scheduler.compute`), so a screen spreads over a
``distributed`` cluster unchanged. A killed screen is continued with
``resume=True``: only batches not marked done are ranked again, and since
every chunk depends on its sets alone, the finished store is byte for byte
the one an uninterrupted screen writes. The options are stored in the
store's attributes, and a resume with different ones is refused.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import shutil
import threading
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from afpx import AfpxError, AfpxWarning
from afpx.rank import DEFAULT_TIE_TOLERANCE, parse_elements

if TYPE_CHECKING:
    import pandas as pd
    import xarray as xr

    from afpx.templates import TemplateLibrary

__all__ = [
    "ScreenOptions",
    "element_sets",
    "open_screen",
    "screen",
    "screen_frame",
]

logger = logging.getLogger(__name__)

# -- names of the screen store ------------------------------------------------
SET: Final = "element_set"  # dim and coordinate: "Li-Mn-Ge"
ROW: Final = "row"  # dim and coordinate: display position 1..top within a set
SLOT: Final = "slot"  # dim: position of an element within its set
DONE: Final = "done"
N_ROWS: Final = "n_rows"
#: Attribute holding the screen's options (JSON), compared on resume.
OPTIONS_ATTR: Final = "afpx_screen"
#: Root attribute of a screen store being created (removed when its options are written).
CREATING_ATTR: Final = "afpx_screen_creating"

#: Per-row variables: name -> (dtype, fill value, has a ``slot`` dim).
ROW_VARIABLES: Final[dict[str, tuple[str, Any, bool]]] = {
    "formula": ("str", "", False),
    "counts": ("int64", -1, True),
    "score": ("float64", np.nan, False),
    "log_score": ("float64", np.nan, False),
    "rank": ("float64", np.nan, False),
    "rank_optimistic": ("int64", -1, False),
    "rank_pessimistic": ("int64", -1, False),
    "n_tied": ("int64", -1, False),
    "template": ("int64", -1, False),
    "structure_id": ("str", "", False),
    "template_formula": ("str", "", False),
    "spacegroup": ("int64", -1, False),
    "source": ("str", "", False),
    "assignment_text": ("str", "", False),
    "candidate_counts": ("int64", -1, True),
    "n_template_sites": ("int64", -1, False),
    "n_templates": ("int64", -1, False),
    "n_best_templates": ("int64", -1, False),
    "known": ("bool", False, False),
}
#: Per-set variables (besides ``elements`` and ``done``): name -> (dtype, fill value).
SET_VARIABLES: Final[dict[str, tuple[str, Any]]] = {
    N_ROWS: ("int64", -1),
    "n_compositions": ("int64", -1),
    "n_candidates": ("int64", -1),
    "n_set_templates": ("int64", -1),
}
#: RankTable attribute behind each per-set variable.
_SET_ATTRS: Final = {
    "n_compositions": "n_compositions",
    "n_candidates": "n_candidates",
    "n_set_templates": "n_templates",
}


@dataclass(frozen=True)
class ScreenOptions:
    """What a screen computes; stored in the result and compared on resume.

    Attributes
    ----------
    elements : tuple of str
        Element symbols, in the order the sets are drawn (sets keep it).
    size : int
        Elements per set (``k``).
    top : int
        Rows kept per set (the best compositions, as ``afpx rank --top``).
    known : bool
        Add ``known`` (composition among the library's structures).
    max_sites : int or None
        Skip templates with more unique sites.
    exclude_own_formula : bool
        Drop candidates whose composition is their template's own.
    tie_tolerance : float
        See :func:`afpx.templates.tie_ranks`.
    cube : str or None
        The cube whose library ranks (absolute path); None: the built-in one.
    batch_size : int
        Sets per Dask task and per zarr chunk along ``element_set``.
    """

    elements: tuple[str, ...]
    size: int
    top: int = 50
    known: bool = False
    max_sites: int | None = None
    exclude_own_formula: bool = False
    tie_tolerance: float = DEFAULT_TIE_TOLERANCE
    cube: str | None = None
    batch_size: int = 8

    def rank_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`afpx.rank.rank_table` for each set."""
        options: dict[str, Any] = {
            "top": self.top,
            "known": self.known,
            "tie_tolerance": self.tie_tolerance,
            "exclude_own_formula": self.exclude_own_formula,
        }
        if self.max_sites is not None:
            options["max_unique_sites"] = self.max_sites
        return options

    def to_attrs(self) -> dict[str, Any]:
        """The options as JSON-compatible values."""
        out = asdict(self)
        out["elements"] = list(self.elements)
        return out


def element_sets(elements: Sequence[str], size: int) -> list[tuple[str, ...]]:
    """Every ``size``-element subset of ``elements``, in :func:`itertools.combinations` order.

    >>> element_sets(["Li", "Mn", "Ge"], 2)
    [('Li', 'Mn'), ('Li', 'Ge'), ('Mn', 'Ge')]
    """
    return list(itertools.combinations(elements, size))


def _check_options(
    elements: str | Sequence[str], size: int, top: int, batch_size: int
) -> tuple[str, ...]:
    from afpx.templates import element_symbol

    zs = parse_elements(elements)  # unknown or repeated symbols
    if size < 2:
        raise AfpxError(
            f"the set size must be at least 2 (a ranking needs two elements), got {size}"
        )
    if size > len(zs):
        raise AfpxError(
            f"sets of {size} elements cannot be drawn from the {len(zs)} elements given; "
            f"give at least {size} elements or a smaller size"
        )
    if top < 1:
        raise AfpxError(f"top must be at least 1, got {top}")
    if batch_size < 1:
        raise AfpxError(f"batch size must be at least 1, got {batch_size}")
    return tuple(element_symbol(z) for z in zs)


def _check_library(library: TemplateLibrary, options: ScreenOptions) -> None:
    """Fail before writing anything when no template can hold ``size`` elements."""
    sizes = np.asarray(library.n_unique_sites)
    if options.max_sites is not None:
        sizes = sizes[sizes <= options.max_sites]
    most = int(sizes.max()) if sizes.size else 0
    if options.size > most:
        raise AfpxError(
            f"sets of {options.size} elements need templates with at least {options.size} "
            f"unique sites; the most any template has is {most}"
            + (" (with --max-sites)" if options.max_sites is not None else "")
        )


# -- ranking, once per process ------------------------------------------------
#: Serialises ranking within a process: the library's plan cache is not thread-safe.
_RANK_LOCK = threading.Lock()


@functools.lru_cache(maxsize=2)
def _cached_library(cube: str | None) -> TemplateLibrary:
    from afpx.rank import load_library

    return load_library(cube)


def _library(source: TemplateLibrary | str | None) -> TemplateLibrary:
    """The library a task ranks with: given, or loaded once per process from its cube."""
    from afpx.templates import TemplateLibrary

    if isinstance(source, TemplateLibrary):
        return source
    with _RANK_LOCK:
        return _cached_library(source)


def _rank_sets(
    library: TemplateLibrary, sets: Sequence[tuple[str, ...]], options: ScreenOptions
) -> dict[str, np.ndarray]:
    """The store's variables for ``sets`` (leading dim: the sets), in memory."""
    from afpx.rank import rank_table

    n, top, k = len(sets), options.top, options.size
    out: dict[str, np.ndarray] = {}
    for name, (dtype, fill, per_slot) in ROW_VARIABLES.items():
        shape = (n, top, k) if per_slot else (n, top)
        out[name] = np.full(shape, fill, dtype=object if dtype == "str" else dtype)
    for name, (dtype, fill) in SET_VARIABLES.items():
        out[name] = np.full(n, fill, dtype=dtype)
    for i, symbols in enumerate(sets):
        # the untrained-element warning is given once per screen, not once per set
        with _RANK_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", AfpxWarning)
            try:
                table = rank_table(list(symbols), library=library, **options.rank_options())
            except AfpxError as exc:
                raise AfpxError(f"element set {'-'.join(symbols)}: {exc}") from exc
        m = len(table)
        for name in ROW_VARIABLES:
            if name in table.variables:
                out[name][i, :m] = table.variables[name][1]
        out[N_ROWS][i] = m
        for name, attr in _SET_ATTRS.items():
            out[name][i] = table.attrs[attr]
    return out


def _write_batch(
    source: TemplateLibrary | str | None,
    path: str,
    start: int,
    sets: Sequence[tuple[str, ...]],
    options: ScreenOptions,
) -> int:
    """One Dask task: rank ``sets``, write their chunk, then mark it done."""
    import zarr

    values = _rank_sets(_library(source), sets, options)
    group = zarr.open_group(path, mode="r+", zarr_format=3)
    stop = start + len(sets)
    for name, block in [*values.items(), (DONE, np.ones(len(sets), dtype=bool))]:
        # ``done`` last: a batch killed before it is ranked again on resume
        array = group.get(name)
        if isinstance(array, zarr.Array):
            array[start:stop] = block
    return len(sets)


# -- the store ----------------------------------------------------------------
def _create_store(path: str, options: ScreenOptions, sets: Sequence[tuple[str, ...]]) -> None:
    """Create the store's arrays; the options attribute, which makes it a screen, comes last.

    Until then the root carries :data:`CREATING_ATTR`, so that a creation cut
    short in place (at a URL; a local store is created beside its path and
    renamed) is recognised and may be started again.
    """
    import zarr

    from afpx.templates import element_symbols

    n, top, k, chunk = len(sets), options.top, options.size, options.batch_size
    lookup = {s: z for z, s in enumerate(element_symbols(), start=1)}
    # every chunk on disk, fill values included: a resumed store equals a one-shot one
    config: Any = {"write_empty_chunks": True}
    from afpx.store import is_url

    # a URL was checked (and cleared) by the caller: listings may lag behind a removal
    group = zarr.open_group(path, mode="w" if is_url(path) else "w-", zarr_format=3)
    group.attrs[CREATING_ATTR] = True

    def create(
        name: str, dims: tuple[str, ...], shape: tuple[int, ...], dtype: str, fill: Any
    ) -> Any:
        chunks = tuple(min(chunk, s) if d == SET else s for d, s in zip(dims, shape, strict=True))
        return group.create_array(
            name,
            shape=shape,
            chunks=tuple(max(c, 1) for c in chunks),
            dtype=str if dtype == "str" else dtype,
            fill_value=fill,
            dimension_names=list(dims),
            config=config,
        )

    create(SET, (SET,), (n,), "str", "")[:] = np.asarray(["-".join(s) for s in sets], dtype=object)
    create(ROW, (ROW,), (top,), "int64", -1)[:] = np.arange(1, top + 1)
    elements = np.asarray([[lookup[e] for e in s] for s in sets], dtype=np.int16)
    create("elements", (SET, SLOT), (n, k), "int16", 0)[:] = elements
    for name, (dtype, fill, per_slot) in ROW_VARIABLES.items():
        if name == "known" and not options.known:
            continue
        dims = (SET, ROW, SLOT) if per_slot else (SET, ROW)
        create(name, dims, (n, top, k) if per_slot else (n, top), dtype, fill)
    for name, (dtype, fill) in SET_VARIABLES.items():
        create(name, (SET,), (n,), dtype, fill)
    create(DONE, (SET,), (n,), "bool", False)
    attrs = dict(group.attrs)
    del attrs[CREATING_ATTR]
    attrs[OPTIONS_ATTR] = json.dumps(options.to_attrs(), sort_keys=True)
    group.attrs.put(attrs)


def _location(path: str | os.PathLike[str]) -> str:
    """A URL as given, a local path made absolute (how a screen records its cube)."""
    from afpx.store import is_url

    return os.fspath(path) if is_url(path) else os.path.abspath(os.fspath(path))


def _root_attrs(path: str) -> dict[str, Any] | None:
    """The root attributes of the zarr group at ``path`` (a path or URL), or None."""
    import zarr

    try:
        return dict(zarr.open_group(path, mode="r", zarr_format=3).attrs)
    except (OSError, ValueError, zarr.errors.BaseZarrError):
        return None


def _stored_options(path: str) -> dict[str, Any] | None:
    """The options of the screen store at ``path``, or None if it is not one."""
    raw = (_root_attrs(path) or {}).get(OPTIONS_ATTR)
    return json.loads(raw) if isinstance(raw, str) else None


def _cut_short_while_created(path: str) -> bool:
    """Whether ``path`` holds a screen store whose creation did not finish."""
    attrs = _root_attrs(path)
    return attrs is not None and bool(attrs.get(CREATING_ATTR)) and OPTIONS_ATTR not in attrs


def _differences(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    return [
        f"{key}: stored {stored.get(key)!r}, asked {wanted.get(key)!r}"
        for key in sorted(set(stored) | set(wanted))
        if stored.get(key) != wanted.get(key)
    ]


def open_screen(path: str | os.PathLike[str]) -> xr.Dataset:
    """A screen store as a lazy :class:`xarray.Dataset` (see the module docstring).

    Raises
    ------
    AfpxError
        When ``path`` is not a screen store.
    """
    import xarray as xr

    stored = _stored_options(os.fspath(path))
    if stored is None:
        raise AfpxError(f"{os.fspath(path)!r} is not an afpx screen store (made by `afpx screen`)")
    ds = xr.open_zarr(path, consolidated=False, zarr_format=3)
    ds.attrs[OPTIONS_ATTR] = stored
    return ds


def screen_frame(ds: xr.Dataset) -> pd.DataFrame:
    """The filled rows of a screen as a :class:`pandas.DataFrame`, one row per (set, row).

    Columns: ``element_set``, ``row`` and the per-row variables (``counts``
    and ``candidate_counts`` as lists, one count per element of the set).
    """
    import pandas as pd

    ds = ds.load()
    n_rows = ds[N_ROWS].values
    filled = np.arange(ds.sizes[ROW])[None, :] < n_rows[:, None]
    set_index, row_index = np.nonzero(filled)
    columns: dict[str, Any] = {
        SET: ds[SET].values[set_index].astype(object),
        ROW: ds[ROW].values[row_index],
    }
    for name in ROW_VARIABLES:
        if name not in ds:
            continue
        values = ds[name].values[set_index, row_index]
        columns[name] = list(values.tolist()) if values.ndim == 2 else values
        if values.dtype.kind in "TUO":
            columns[name] = values.astype(object)
    return pd.DataFrame(columns)


def screen(
    elements: str | Sequence[str],
    size: int,
    output: str | os.PathLike[str],
    *,
    cube: str | os.PathLike[str] | None = None,
    library: TemplateLibrary | None = None,
    top: int = 50,
    known: bool = False,
    max_sites: int | None = None,
    exclude_own_formula: bool = False,
    tie_tolerance: float = DEFAULT_TIE_TOLERANCE,
    batch_size: int = 8,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = False,
) -> xr.Dataset:
    """Rank every ``size``-element subset of ``elements`` into the zarr store ``output``.

    Runs on the current Dask scheduler (choose it with
    :func:`afpx.scheduler.use_scheduler`). Within one process the ranking
    itself runs one set at a time (the library's plan cache is shared), so
    parallel speed comes from worker processes (``processes`` or a
    ``distributed`` cluster), each loading the library once.

    Parameters
    ----------
    elements : str or sequence of str
        The chemical space, e.g. ``"Li,Na,Mn,Fe,Ge,Si"``.
    size : int
        Elements per set (2: binaries, 3: ternaries, ...).
    output : str or path
        The zarr store to write: a local folder or a URL (``s3://bucket/screen.zarr``,
        any fsspec protocol; written in place there, the options attribute last).
    cube : path, optional
        A cube with likelihoods; default: the built-in template library.
    library : TemplateLibrary, optional
        A library in memory instead (it is sent with every task; for a
        cluster, prefer ``cube``). Recorded as ``cube=None``.
    top, known, max_sites, exclude_own_formula, tie_tolerance
        As for :func:`afpx.rank.rank` (``max_sites``: ``max_unique_sites``).
    batch_size : int
        Sets per Dask task and per zarr chunk.
    overwrite : bool
        Replace an existing screen store at ``output``.
    resume : bool
        Continue the screen stored at ``output`` (the same options), ranking
        only the batches not marked done; a missing store starts afresh.
    progress : bool
        A progress bar over the batches on stderr.

    Returns
    -------
    xarray.Dataset
        The store, opened lazily (:func:`open_screen`).

    Raises
    ------
    AfpxError
        Bad elements, size, top or batch size; a library whose templates
        cannot hold ``size`` elements; ``output`` existing without
        ``overwrite`` or ``resume`` (or not being a screen store);
        ``overwrite`` with ``resume``; a resume with different options.
    """
    import dask

    from afpx.rank import untrained_elements
    from afpx.scheduler import compute

    symbols = _check_options(elements, size, top, batch_size)
    if overwrite and resume:
        raise AfpxError("overwrite and resume exclude each other: pick one")
    options = ScreenOptions(
        elements=symbols,
        size=size,
        top=top,
        known=known,
        max_sites=max_sites,
        exclude_own_formula=exclude_own_formula,
        tie_tolerance=float(tie_tolerance),
        cube=None if cube is None or library is not None else _location(cube),
        batch_size=batch_size,
    )
    lib = library if library is not None else _library(options.cube)
    _check_library(lib, options)
    from afpx import store

    where = _location(output)
    sets = element_sets(symbols, size)
    if store.exists(where):
        stored = _stored_options(where)
        if stored is None and _cut_short_while_created(where):
            if not (resume or overwrite):
                raise AfpxError(
                    f"{where!r} holds a screen whose creation was cut short (nothing was "
                    "ranked yet): pass --resume or --overwrite to start it again"
                )
            store.remove(where)
        elif stored is None:
            raise AfpxError(
                f"{where!r} exists and is not an afpx screen store; "
                "choose another output (nothing was changed)"
            )
        elif resume:
            differ = _differences(stored, options.to_attrs())
            if differ:
                raise AfpxError(
                    f"cannot resume {where!r} with other options ("
                    + "; ".join(differ)
                    + "): rerun with the stored ones, or pass --overwrite to start again"
                )
        elif overwrite:
            store.remove(where)
        else:
            raise AfpxError(
                f"{where!r} exists: pass --resume to continue that screen "
                "or --overwrite to replace it"
            )
    if store.exists(where):
        if not store.is_url(where):
            # temporaries of chunk writes cut short by a kill (zarr writes a chunk
            # to ``NAME.HEX.partial``, then renames it)
            for leftover in Path(where).rglob("*.partial"):
                leftover.unlink()
    elif store.is_url(where):
        # object stores have no rename: created in place, the options attribute last
        _create_store(where, options, sets)
    else:
        # made beside it and renamed: a kill while creating leaves no half store
        path = Path(where)
        if not path.parent.is_dir():
            raise AfpxError(
                f"the folder {path.parent} of {where} does not exist; create it or choose "
                "another output"
            )
        partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.creating")
        try:
            _create_store(str(partial), options, sets)
            partial.rename(path)
        finally:
            shutil.rmtree(partial, ignore_errors=True)

    import zarr

    done = np.asarray(zarr.open_array(f"{where}/{DONE}", mode="r")[:])
    starts = range(0, len(sets), batch_size)
    pending = [s for s in starts if not done[s : s + batch_size].all()]
    if len(pending) < len(starts):
        logger.info(
            "resuming: %d of %d batches already done", len(starts) - len(pending), len(starts)
        )
    unseen = untrained_elements(lib, parse_elements(symbols))
    if unseen:
        warnings.warn(
            AfpxWarning(
                f"{', '.join(unseen)}: on no site of the library's training split, so the "
                "model never learned where they go; read the rows of their sets as guesses"
            ),
            stacklevel=2,
        )
    # keys unique to this run: two screens on one cluster must not share tasks
    tag = uuid.uuid4().hex
    source: Any = library if library is not None else options.cube
    if library is not None:
        # one graph key for the library, shared by every task
        source = dask.delayed(library, name=f"afpx-screen-library-{tag}")
    tasks = [
        dask.delayed(_write_batch, pure=False)(
            source,
            where,
            start,
            sets[start : start + batch_size],
            options,
            dask_key_name=f"afpx-screen-{tag}-{start}",
        )
        for start in pending
    ]
    if tasks:
        compute(*tasks, progress=progress)
    return open_screen(where)
