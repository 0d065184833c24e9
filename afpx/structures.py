"""Read crystal structures, filter them as the paper did, and find their unique sites.

Every input a user may have ends up in the same place: CIF files (one structure
per data block), folders of them (recursive), JSON / JSON-lines files of
pymatgen structure dicts (optionally gzipped), ASE databases, and the named
public datasets of :mod:`afpx.datasets` (``"oqmd-icsd"``).  Each record either
becomes an :class:`AnalysedStructure` (compact arrays plus its unique sites) or
a :class:`Rejection` naming the reason; nothing is dropped silently and a file
that cannot be parsed is a rejection, not a traceback.

Filters (all in :class:`FilterParams`, each switchable, applied in this order
after the record has been parsed):

1. ``no_atoms`` -- the record holds no sites;
2. ``bad_cell`` -- non-finite lattice, or zero / negative volume;
3. ``unknown_species`` -- a symbol that is not one of the 118 elements (D, T,
   X, vacancies, charges that cannot be stripped, dummy species);
4. ``r_factor`` -- the CIF states ``_refine_ls_R_factor_gt`` (else ``_all``,
   else ``_obs``) at or above ``r_factor_max``; absent R-factors are kept;
5. ``occupancy`` -- a site holds more than one species, or its occupancy is at
   or below ``min_occupancy``;
6. ``short_distance`` -- an interatomic distance, periodic images included,
   below ``min_distance``;
7. ``symmetry`` -- spglib could not analyse the structure.

Checks of the data itself, always on (see docs/ingestion.md):

* ``formula_mismatch`` -- a CIF states ``_chemical_formula_sum`` and the atoms
  read disagree with it (element set or ratios, hydrogen aside), after the
  species check and before the filters above from 4 on. This is what catches
  label-only CIFs read wrongly (``NH4`` as nihonium, ``BI`` as bismuth) and
  bad symmetry operations. Hydrogen stated but absent from the coordinates is
  accepted, flagged ``metadata["hydrogen_missing"]`` and counted in
  :meth:`ReadResult.summary`; :func:`read_structures` warns once
  (:class:`afpx.AfpxWarning`).
* ``occupancy`` also covers occupancies of zero or below (a site that is not
  there) and occupancies on one position summing above 1;
* ``parse_error`` covers non-numeric occupancies and symmetry operations that
  are not of the form ``x, y, z``;
* ``unknown_species`` covers labels that are ambiguous without
  ``_atom_site_type_symbol`` and ``_chemical_formula_sum`` (``NH4``: N or Nh?)
  and labels reading as an element of Z >= 100 (``Fl1``: flerovium);
* ``bad_cell`` covers cells emptier than :data:`MAX_VOLUME_PER_ATOM`;
* a file larger than ``max_file_mb``, or that is not a regular file, is a
  ``parse_error`` rejection and is never read whole.

Records of an ASE database or JSON file that repeat an earlier record of the
same source exactly (same id, same species, cell and positions, bit for bit)
are ``duplicate`` rejections.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gzip
import hashlib
import io
import json
import logging
import math
import os
import re
import threading
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from afpx import AfpxError, AfpxWarning
from afpx.schema import N_ELEMENTS, REJECT_REASONS

if TYPE_CHECKING:
    from pymatgen.core import Structure

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_FILE_MB",
    "MAX_VOLUME_PER_ATOM",
    "AnalysedStructure",
    "FilterParams",
    "ReadResult",
    "Rejection",
    "SiteTable",
    "SpilledTable",
    "StructureTable",
    "TableRead",
    "element_symbol",
    "load_spilled",
    "load_spilled_column",
    "parse_formula_sum",
    "part_pieces",
    "read_spilled",
    "read_structures",
    "read_table",
    "shortest_distance",
    "split_cif_blocks",
    "unique_sites",
]

CIF_SUFFIXES: Final = (".cif", ".mcif")
JSON_SUFFIXES: Final = (".json", ".jsonl", ".ndjson", ".json.gz", ".jsonl.gz", ".ndjson.gz")
ASE_SUFFIXES: Final = (".db",)

#: Rows of an ASE database handled by one Dask task.
_ROWS_PER_TASK: Final = 1000
#: CIF files handled by one Dask task.
_FILES_PER_TASK: Final = 16
#: Dask tasks computed at a time, or two per task slot of the scheduler where that is
#: more (the progress bar and de-duplication advance between waves). A wave's results
#: are held until it ends: 64 tasks at a time made the reading peak grow with the
#: corpus up to 64,000 rows, 8 keep it the same from 8,000 rows on.
_TASKS_PER_WAVE: Final = 8
#: Held while a reader changes Python's warning filters or records warnings. Both are
#: process-wide: without it, tasks running in threads would record each other's warnings
#: (a "Defaulting to P1" of one CIF rejecting another) and restore each other's filters.
_WARNINGS_LOCK: Final = threading.RLock()

# CIF R-factor keys, in order of preference (``_obs`` is the pre-2000 name of ``_gt``).
_R_FACTOR_KEYS: Final = (
    "_refine_ls_R_factor_gt",
    "_refine_ls_R_factor_all",
    "_refine_ls_R_factor_obs",
)
_SYMOP_KEYS: Final = (
    "_symmetry_equiv_pos_as_xyz",
    "_space_group_symop_operation_xyz",
    "_symmetry_equiv_pos_as_xyz_",
    "_space_group_symop_operation_xyz_",
)
_HM_KEYS: Final = (
    "_symmetry_space_group_name_H-M",
    "_space_group_name_H-M_alt",
    "_symmetry_space_group_name_H_M",
)
_HALL_KEYS: Final = ("_symmetry_space_group_name_Hall", "_space_group_name_Hall")
_SG_NUMBER_KEYS: Final = ("_symmetry_Int_Tables_number", "_space_group_IT_number")
# A CIF type symbol: an element-like token and an optional charge (Fe3+, O2-, Na+, Fe2.5+, Ti0).
_TYPE_SYMBOL: Final = re.compile(r"^([A-Za-z]{1,3})(?:\d*(?:\.\d+)?[+-]?|[+-]\d*(?:\.\d+)?)$")
# Tokens that look like element prefixes of labels but are not elements.
_NOT_ELEMENTS: Final = frozenset({"D", "T", "X", "Xx", "Va", "Vac", "Q"})
# One term of _chemical_formula_sum: an element and an optional amount (Ca, O3, Ti0.5).
_FORMULA_TERM: Final = re.compile(r"^([A-Z][a-z]{0,2})(\d+(?:\.\d*)?|\.\d+)?$")
# One component of a symmetry operation: terms of x, y, z and numbers (-x+1/2, 1/2+y, x-y).
_SYMOP_COMPONENT: Final = re.compile(
    r"^(?:[+-]?(?:\d+(?:\.\d*)?(?:/\d+)?\*?)?[xyz]|[+-]?\d+(?:\.\d*)?(?:/\d+)?)+$"
)
#: Largest accepted cell volume per atom, Å³ (dense solids hold 5-50, open frameworks a
#: few hundred); an emptier cell is a misread, and its neighbour search would exhaust memory.
MAX_VOLUME_PER_ATOM: Final = 1.0e4
#: Default cap on the bytes read from one CIF or JSON file (after decompression), MB.
MAX_FILE_MB: Final = 512.0
#: Stated and read atomic fractions may differ by this much (absolute) ...
_FORMULA_ABS_TOL: Final = 0.02
#: ... plus this fraction of the larger of the two (rounded occupancies, minor dopants).
_FORMULA_REL_TOL: Final = 0.05
#: Label-only CIFs: an element of this atomic number or above read from a label is refused.
_LABEL_MAX_Z: Final = 100


# -- public data classes -------------------------------------------------------


@dataclass(frozen=True)
class FilterParams:
    """Quality filters and symmetry tolerances, defaulting to the paper's values.

    Parameters
    ----------
    r_factor_max : float or None
        Reject a CIF whose stated R-factor is at or above this value (a
        fraction, 0.10 = 10 %). Structures without a stated R-factor are kept.
        None disables the filter.
    min_occupancy : float or None
        Reject a structure with a site of occupancy at or below this value, or
        with more than one species on a site. None disables the filter: each
        site then keeps its majority species and the record says so
        (``metadata["disordered"]``).
    min_distance : float or None
        Reject a structure with an interatomic distance (periodic images
        included) below this value, in Å. None disables the filter.
    check_species : bool
        Reject a structure with a symbol that is not one of the 118 elements
        (D, T, X, vacancies, unstrippable charges). When False, D and T count
        as H; species that have no atomic number at all are still rejected.
    symprec : float
        Distance tolerance of the symmetry search (spglib ``symprec``), in Å.
    angle_tolerance : float
        Angle tolerance of the symmetry search, in degrees.
    """

    r_factor_max: float | None = 0.10
    min_occupancy: float | None = 0.98
    min_distance: float | None = 0.65
    check_species: bool = True
    symprec: float = 0.01
    angle_tolerance: float = 5.0

    def __post_init__(self) -> None:
        _check_tolerances(self.symprec, self.angle_tolerance)
        if self.r_factor_max is not None and not self.r_factor_max > 0:
            raise AfpxError(f"r_factor_max must be positive (a fraction), not {self.r_factor_max}")
        if self.min_occupancy is not None and not 0 <= self.min_occupancy < 1:
            raise AfpxError(f"min_occupancy must lie in [0, 1), not {self.min_occupancy}")
        if self.min_distance is not None and not self.min_distance >= 0:
            raise AfpxError(f"min_distance must be at least 0 Å, not {self.min_distance}")

    def to_attrs(self) -> dict[str, Any]:
        """The parameters as a JSON-able dict (for zarr attributes)."""
        return dataclasses.asdict(self)


def _check_tolerances(symprec: float, angle_tolerance: float) -> None:
    # spglib crashes the interpreter (segmentation fault) on a negative symprec
    if not (math.isfinite(symprec) and symprec > 0):
        raise AfpxError(f"symprec must be a positive distance in Å, not {symprec}")
    if not (math.isfinite(angle_tolerance) and angle_tolerance > 0):
        raise AfpxError(
            f"angle_tolerance must be a positive angle in degrees, not {angle_tolerance}"
        )


@dataclass(frozen=True)
class Rejection:
    """An input that was read but not accepted, and why.

    Attributes
    ----------
    id : str
        Structure id, or the path of a file that could not be read.
    source : str
        File path or dataset name.
    block : str or None
        CIF data block name, database row id or JSON line number.
    reason : str
        One of :data:`afpx.schema.REJECT_REASONS`.
    message : str
        The reason in words, naming the offending value or symbol.
    """

    id: str
    source: str
    block: str | None
    reason: str
    message: str


@dataclass(frozen=True)
class SiteTable:
    """Crystallographically unique sites of one structure.

    Attributes
    ----------
    index : ndarray of shape (n_unique,), int32
        Index of the representative atom of each unique site in the structure.
    z : ndarray of shape (n_unique,), int16
        Atomic number on each unique site.
    multiplicity : ndarray of shape (n_unique,), int32
        Number of atoms of the structure's cell equivalent to the site.
    wyckoff : ndarray of shape (n_unique,), str
        Wyckoff letter of each unique site.
    spacegroup : int
        International space-group number.
    dmin : float
        Shortest interatomic distance in the structure, periodic images
        included, in Å.
    """

    index: np.ndarray
    z: np.ndarray
    multiplicity: np.ndarray
    wyckoff: np.ndarray
    spacegroup: int
    dmin: float

    def __len__(self) -> int:
        return int(self.index.shape[0])


@dataclass(frozen=True)
class AnalysedStructure:
    """An accepted structure as compact arrays, with its unique sites.

    No pymatgen object is kept, so that tens of thousands fit in memory; call
    :meth:`to_structure` for one.

    Attributes
    ----------
    structure_id : str
        Id within its source: for a CIF the database code it states
        (``cod-1000017``, ``amcsd-0000029``, ``icsd-12345``; the file-derived
        id is then kept as ``metadata["file_id"]``), else the file stem
        (``stem#block`` for multi-block files); the ``name`` of a database
        row, ...
    source : str
        File path or dataset name.
    formula : str
        Reduced formula (pymatgen ``Composition.reduced_formula``).
    lattice : ndarray of shape (3, 3), float64
        Lattice vectors as rows, in Å.
    frac_coords : ndarray of shape (n_atoms, 3), float64
        Fractional coordinates.
    numbers : ndarray of shape (n_atoms,), int16
        Atomic numbers.
    sites : SiteTable
        Unique sites.
    metadata : dict
        ``r_factor`` (float or None), ``r_factor_stated`` (bool), ``block`` and
        whatever the source provides (COD id, database key-value pairs, ...).
    """

    structure_id: str
    source: str
    formula: str
    lattice: np.ndarray
    frac_coords: np.ndarray
    numbers: np.ndarray
    sites: SiteTable
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def n_atoms(self) -> int:
        """Number of atoms in the cell."""
        return int(self.numbers.shape[0])

    def to_structure(self) -> Structure:
        """The structure as a :class:`pymatgen.core.Structure`."""
        from pymatgen.core import Lattice, Structure

        symbols = _elements()
        return Structure(
            Lattice(self.lattice), [symbols[int(z)] for z in self.numbers], self.frac_coords
        )


@dataclass
class ReadResult:
    """Accepted structures and rejections of one :func:`read_structures` call.

    Attributes
    ----------
    structures : list of AnalysedStructure
        Accepted structures, in input order.
    rejections : list of Rejection
        Rejected records, in input order.
    n_read : int
        Records read: structures, CIF blocks, rows, lines, and files that
        could not be read at all.
    params : FilterParams
        The filters used.
    """

    structures: list[AnalysedStructure]
    rejections: list[Rejection]
    n_read: int
    params: FilterParams

    def counts(self) -> dict[str, int]:
        """Rejections by reason, in the order of :data:`afpx.schema.REJECT_REASONS`."""
        return _counts(self.rejections)

    def hydrogen_missing(self) -> list[AnalysedStructure]:
        """Accepted structures whose CIF states hydrogen that the coordinates lack."""
        return [s for s in self.structures if s.metadata.get("hydrogen_missing")]

    def summary(self) -> str:
        """Read, accepted and rejected counts, rejections by reason, in words."""
        return _summary(
            self.n_read, len(self.structures), self.rejections, len(self.hydrogen_missing())
        )


def _counts(rejections: Sequence[Rejection]) -> dict[str, int]:
    counter = Counter(r.reason for r in rejections)
    return {reason: counter[reason] for reason in REJECT_REASONS if counter[reason]}


def _summary(n_read: int, n_accepted: int, rejections: Sequence[Rejection], n_h: int) -> str:
    lines = [f"read: {n_read}", f"accepted: {n_accepted}", f"rejected: {len(rejections)}"]
    lines += [f"  {reason}: {n}" for reason, n in _counts(rejections).items()]
    if n_h:
        lines.append(f"accepted without the hydrogen their formula states: {n_h}")
    return "\n".join(lines)


_STRING: Final = np.dtypes.StringDType()
#: Columns of a :class:`StructureTable` with one row per structure, per atom and per site.
_PER_STRUCTURE: Final = (
    "structure_id",
    "source",
    "formula",
    "lattice",
    "spacegroup",
    "dmin",
    "hydrogen_missing",
)
_PER_ATOM: Final = ("frac_coords", "numbers")
_PER_SITE: Final = ("site_index", "site_z", "multiplicity", "wyckoff")


@dataclass(frozen=True)
class StructureTable:
    """Accepted structures as columns: one array per quantity, not objects per structure.

    What a cube needs of the structures (metadata aside), at a fraction of
    the memory of :class:`AnalysedStructure` objects: ``build_cube`` reads
    large corpora into a table (:func:`read_table`). Structure ``i`` has atoms
    ``atom_start[i]:atom_start[i + 1]`` and unique sites
    ``site_start[i]:site_start[i + 1]``. The arrays are read-only.

    Attributes
    ----------
    structure_id, source, formula : ndarray of shape (n_structures,), StringDType
        As in :class:`AnalysedStructure`.
    lattice : ndarray of shape (n_structures, 3, 3), float64
        Lattice vectors as rows, Å.
    atom_start : ndarray of shape (n_structures + 1,), int64
    frac_coords : ndarray of shape (n_atoms, 3), float64
    numbers : ndarray of shape (n_atoms,), int16
        Atomic numbers.
    site_start : ndarray of shape (n_structures + 1,), int64
    site_index : ndarray of shape (n_unique,), int32
        Representative atom of each unique site, counted within its structure.
    site_z : ndarray of shape (n_unique,), int16
    multiplicity : ndarray of shape (n_unique,), int32
    wyckoff : ndarray of shape (n_unique,), StringDType
    spacegroup : ndarray of shape (n_structures,), int16
    dmin : ndarray of shape (n_structures,), float64
        Shortest interatomic distance, Å.
    hydrogen_missing : ndarray of shape (n_structures,), bool
        ``metadata["hydrogen_missing"]`` of each structure.
    """

    structure_id: np.ndarray
    source: np.ndarray
    formula: np.ndarray
    lattice: np.ndarray
    atom_start: np.ndarray
    frac_coords: np.ndarray
    numbers: np.ndarray
    site_start: np.ndarray
    site_index: np.ndarray
    site_z: np.ndarray
    multiplicity: np.ndarray
    wyckoff: np.ndarray
    spacegroup: np.ndarray
    dmin: np.ndarray
    hydrogen_missing: np.ndarray

    def __len__(self) -> int:
        return int(self.lattice.shape[0])

    @classmethod
    def from_structures(cls, structures: Sequence[AnalysedStructure]) -> StructureTable:
        """The table of analysed structures (same order)."""
        return _assemble([_table_columns(structures)])

    def structure(self, i: int) -> AnalysedStructure:
        """Structure ``i`` as an :class:`AnalysedStructure` (metadata: ``hydrogen_missing``)."""
        atoms = slice(int(self.atom_start[i]), int(self.atom_start[i + 1]))
        sites = slice(int(self.site_start[i]), int(self.site_start[i + 1]))
        table = SiteTable(
            index=self.site_index[sites].copy(),
            z=self.site_z[sites].copy(),
            multiplicity=self.multiplicity[sites].copy(),
            wyckoff=np.asarray(self.wyckoff[sites].tolist(), dtype=str),
            spacegroup=int(self.spacegroup[i]),
            dmin=float(self.dmin[i]),
        )
        metadata = {"hydrogen_missing": True} if self.hydrogen_missing[i] else {}
        return AnalysedStructure(
            structure_id=str(self.structure_id[i]),
            source=str(self.source[i]),
            formula=str(self.formula[i]),
            lattice=self.lattice[i].copy(),
            frac_coords=self.frac_coords[atoms].copy(),
            numbers=self.numbers[atoms].copy(),
            sites=table,
            metadata=metadata,
        )


def _table_columns(structures: Sequence[AnalysedStructure]) -> dict[str, np.ndarray]:
    """Columns of a table part: per-structure counts ``n_atoms`` and ``n_sites``, no offsets."""
    s = structures

    def joined(parts: list[np.ndarray], dtype: Any, shape: tuple[int, ...] = ()) -> np.ndarray:
        if not parts:
            return np.zeros((0, *shape), dtype=dtype)
        return np.concatenate(parts).astype(dtype, copy=False)

    return {
        "structure_id": np.array([x.structure_id for x in s], dtype=_STRING),
        "source": np.array([x.source for x in s], dtype=_STRING),
        "formula": np.array([x.formula for x in s], dtype=_STRING),
        "lattice": np.array([x.lattice for x in s], dtype=np.float64).reshape(-1, 3, 3),
        "spacegroup": np.array([x.sites.spacegroup for x in s], dtype=np.int16),
        "dmin": np.array([x.sites.dmin for x in s], dtype=np.float64),
        "hydrogen_missing": np.array(
            [bool(x.metadata.get("hydrogen_missing")) for x in s], dtype=bool
        ),
        "n_atoms": np.array([len(x.frac_coords) for x in s], dtype=np.int64),
        "frac_coords": joined([np.reshape(x.frac_coords, (-1, 3)) for x in s], np.float64, (3,)),
        "numbers": joined([np.reshape(x.numbers, -1) for x in s], np.int16),
        "n_sites": np.array([len(x.sites.index) for x in s], dtype=np.int64),
        "site_index": joined([np.asarray(x.sites.index) for x in s], np.int32),
        "site_z": joined([np.asarray(x.sites.z) for x in s], np.int16),
        "multiplicity": joined([np.asarray(x.sites.multiplicity) for x in s], np.int32),
        "wyckoff": joined([np.asarray(x.sites.wyckoff, dtype=str) for x in s], _STRING),
    }


def _take(columns: dict[str, np.ndarray], keep: np.ndarray) -> dict[str, np.ndarray]:
    """The structures ``keep`` (sorted positions) of a table part."""

    def rows(counts: np.ndarray) -> np.ndarray:
        start = np.concatenate([[0], np.cumsum(counts)])
        return np.concatenate(
            [np.arange(start[k], start[k + 1]) for k in keep] or [np.zeros(0, np.int64)]
        )

    atoms, sites = rows(columns["n_atoms"]), rows(columns["n_sites"])
    per_structure = (*_PER_STRUCTURE, "n_atoms", "n_sites")
    # the columns present: a spilled part, or the labels of one, has only some
    out = {name: columns[name][keep] for name in per_structure if name in columns}
    out.update({name: columns[name][atoms] for name in _PER_ATOM if name in columns})
    out.update({name: columns[name][sites] for name in _PER_SITE if name in columns})
    return out


def _assemble(parts: list[dict[str, np.ndarray]]) -> StructureTable:
    """One table from parts, column by column: the parts' arrays are dropped as they are joined.

    The caller's ``parts`` are emptied; at most one column is held twice at a time.
    """
    names = [*_PER_STRUCTURE, *_PER_ATOM, *_PER_SITE, "n_atoms", "n_sites"]
    columns: dict[str, np.ndarray] = {}
    for name in names:
        pieces = [part.pop(name) for part in parts]
        columns[name] = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        del pieces
    parts.clear()
    for count, start in (("n_atoms", "atom_start"), ("n_sites", "site_start")):
        columns[start] = np.concatenate([[0], np.cumsum(columns.pop(count))]).astype(np.int64)
    for array in columns.values():
        array.flags.writeable = False  # shared with the cube's variables and Dask tasks
    return StructureTable(**columns)


@dataclass
class TableRead:
    """Accepted structures as one :class:`StructureTable`, and rejections (:func:`read_table`).

    Attributes
    ----------
    table : StructureTable or SpilledTable
        Accepted structures, in input order (a :class:`SpilledTable` from
        :func:`read_spilled`).
    rejections : list of Rejection
        Rejected records, in input order.
    n_read : int
        Records read, as for :class:`ReadResult`.
    params : FilterParams
        The filters used.
    """

    table: StructureTable | SpilledTable
    rejections: list[Rejection]
    n_read: int
    params: FilterParams

    def counts(self) -> dict[str, int]:
        """Rejections by reason, in the order of :data:`afpx.schema.REJECT_REASONS`."""
        return _counts(self.rejections)

    def summary(self) -> str:
        """As :meth:`ReadResult.summary`."""
        n_h, _ = _hydrogen_missing(self.table)
        return _summary(self.n_read, len(self.table), self.rejections, n_h)


#: Columns of a :class:`SpilledTable` kept on disk, part by part (the rest stays in memory).
_SPILLED: Final = (
    "lattice",
    "n_atoms",
    "frac_coords",
    "numbers",
    "n_sites",
    "site_index",
    "site_z",
    "multiplicity",
    "wyckoff",
    "dmin",
)


#: Per-structure labels a spilled part keeps beside its geometry: the cube's
#: per-structure variables read them back a chunk at a time.
_SPILLED_LABELS: Final = ("structure_id", "source", "formula", "spacegroup", "hydrogen_missing")

#: Text columns: fixed-width in the parts (np.savez cannot store StringDType without pickle).
_TEXT: Final = ("structure_id", "source", "formula", "wyckoff")


@dataclass(frozen=True)
class SpilledTable:
    """A :class:`StructureTable` kept on disk, one file per part; offsets in memory.

    What :func:`read_spilled` hands to ``build_cube``: the lattices, the
    atoms, the unique sites and the per-structure labels (ids, sources,
    formulas, space groups, shortest distances) are written to ``folder`` as
    they are read, one ``part-NNNNNN.npz`` per reading task, and read back by
    the tasks that need them (:func:`load_spilled`,
    :func:`load_spilled_column`). In memory stay the offsets (16 bytes per
    structure) and what the whole read needs. Structures
    ``part_start[k]:part_start[k + 1]`` are in part ``k``.

    Attributes
    ----------
    folder : str
        Where the parts are.
    atom_start, site_start : ndarray of shape (n_structures + 1,), int64
        As in :class:`StructureTable`.
    part_start : ndarray of shape (n_parts + 1,), int64
        First structure of every part.
    sources : tuple of str
        Distinct sources of the structures, in the order first read.
    n_hydrogen_missing : int
        Structures that state hydrogen in their formula but have no H atoms.
    first_hydrogen_missing : (str, str) or None
        Id and source of the first of them.
    digest : str
        sha256 of the parts' contents, in order: what a resumed build checks.
    """

    folder: str
    atom_start: np.ndarray
    site_start: np.ndarray
    part_start: np.ndarray
    sources: tuple[str, ...]
    n_hydrogen_missing: int
    first_hydrogen_missing: tuple[str, str] | None
    digest: str

    def __len__(self) -> int:
        return int(self.atom_start.shape[0]) - 1

    def part_file(self, k: int) -> str:
        """The file of part ``k``."""
        return _part_file(self.folder, k)

    def pieces(self, lo: int, hi: int, *, along: str = "structure") -> tuple[Any, ...]:
        """Parts holding rows ``lo:hi`` of ``along`` ("structure", "atom" or "site").

        Returns ``(file, first, stop)`` per part: rows ``first:stop`` of that
        part's arrays along ``along``. Small and picklable: what a task needs
        to load its rows (:func:`load_spilled`, :func:`load_spilled_column`).
        """
        starts = {"structure": None, "atom": self.atom_start, "site": self.site_start}[along]
        bounds = self.part_start if starts is None else starts[self.part_start]
        return part_pieces(self.folder, bounds, lo, hi)


def part_pieces(
    folder: str, bounds: np.ndarray, lo: int, hi: int
) -> tuple[tuple[str, int, int], ...]:
    """:meth:`SpilledTable.pieces` from the parts' first rows alone.

    Parameters
    ----------
    folder : str
        :attr:`SpilledTable.folder`.
    bounds : ndarray of shape (n_parts + 1,), int64
        First row of every part along the axis wanted (``part_start`` along
        ``structure``), and the number of rows.
    lo, hi : int
        Rows wanted.

    Returns
    -------
    tuple of (str, int, int)
    """
    if hi <= lo:
        return ()
    k0 = int(np.searchsorted(bounds, lo, side="right")) - 1
    k1 = int(np.searchsorted(bounds, hi - 1, side="right")) - 1
    return tuple(
        (
            _part_file(folder, k),
            max(lo, int(bounds[k])) - int(bounds[k]),
            min(hi, int(bounds[k + 1])) - int(bounds[k]),
        )
        for k in range(k0, k1 + 1)
    )


def _part_file(folder: str, k: int) -> str:
    return os.path.join(folder, f"part-{k:06d}.npz")


def _save_part(path: str, columns: dict[str, np.ndarray]) -> str:
    """Write a part's geometry and labels; returns the sha256 of what it wrote."""
    arrays = {name: columns[name] for name in (*_SPILLED, *_SPILLED_LABELS)}
    for name in _TEXT:
        arrays[name] = np.asarray(arrays[name].tolist(), dtype=str)
    h = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        h.update(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode())
        h.update(array.tobytes())
    np.savez(path, **arrays)  # type: ignore[arg-type]  # numpy's stub: any name may be allow_pickle
    return h.hexdigest()


def load_spilled_column(pieces: Sequence[tuple[str, int, int]], column: str) -> np.ndarray:
    """Rows of one spilled column (``lattice``, ``frac_coords``, ``numbers``...) from its parts.

    Parameters
    ----------
    pieces : sequence of (str, int, int)
        From :meth:`SpilledTable.pieces` along the column's own axis.
    column : str
        A column of :class:`StructureTable` kept on disk (a label too:
        ``structure_id``, ``source``, ``formula``, ``spacegroup``,
        ``hydrogen_missing``).

    Returns
    -------
    ndarray
    """
    parts = []
    for path, lo, hi in pieces:
        with np.load(path) as npz:
            parts.append(npz[column][lo:hi])
    out = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return out.astype(_STRING) if column in _TEXT else out


def load_spilled(pieces: Sequence[tuple[str, int, int]]) -> StructureTable:
    """Structures of a :class:`SpilledTable` as a :class:`StructureTable` (offsets from 0).

    Parameters
    ----------
    pieces : sequence of (str, int, int)
        From :meth:`SpilledTable.pieces` along ``"structure"``.

    Returns
    -------
    StructureTable
        Geometry and unique sites; the labels (ids, sources, formulas,
        space groups) are empty strings and zeros: they stay with the
        :class:`SpilledTable`.
    """
    parts = []
    for path, lo, hi in pieces:
        with np.load(path) as npz:
            columns = {name: npz[name] for name in _SPILLED}
        columns["wyckoff"] = columns["wyckoff"].astype(_STRING)
        n = len(columns["lattice"])
        columns.update(
            structure_id=np.full(n, "", dtype=_STRING),
            source=np.full(n, "", dtype=_STRING),
            formula=np.full(n, "", dtype=_STRING),
            spacegroup=np.zeros(n, np.int16),
            hydrogen_missing=np.zeros(n, bool),
        )
        if (lo, hi) != (0, n):
            columns = _take(columns, np.arange(lo, hi, dtype=np.int64))
        parts.append(columns)
    return _assemble(parts)


# -- unique sites ---------------------------------------------------------------


def shortest_distance(structure: Structure) -> float:
    """Shortest interatomic distance of a structure, periodic images included.

    A one-atom cell gives the length of its shortest lattice vector.

    Parameters
    ----------
    structure : pymatgen.core.Structure
        A periodic structure with at least one site.

    Returns
    -------
    float
        The distance in Å.

    Raises
    ------
    AfpxError
        If the structure has no sites.
    """
    if len(structure) == 0:
        raise AfpxError("a structure without sites has no shortest distance")
    return _closest_pair(
        np.asarray(structure.lattice.matrix, dtype=float),
        np.asarray(structure.frac_coords, dtype=float),
    )[2]


def _closest_pair(lattice: np.ndarray, frac_coords: np.ndarray) -> tuple[int, int, float]:
    """Atoms ``i, j`` of the shortest distance (periodic images included) and the distance.

    Parameters
    ----------
    lattice : ndarray of shape (3, 3)
        Lattice vectors as rows, Å.
    frac_coords : ndarray of shape (n_atoms, 3)
        Fractional coordinates, n_atoms >= 1.
    """
    from pymatgen.optimization.neighbors import find_points_in_spheres

    lattice = np.ascontiguousarray(lattice, dtype=float)
    cart = np.ascontiguousarray(frac_coords @ lattice, dtype=float)
    pbc = np.ones(3, dtype=np.int64)
    # Grow the search radius until some pair is found: the shortest lattice
    # vector bounds the answer, so this ends. Cell lists keep it O(n).
    radius = 3.0
    while True:
        center, neighbour, images, distances = find_points_in_spheres(
            cart, cart, r=radius, pbc=pbc, lattice=lattice, tol=1e-8
        )
        # an atom and itself in the same cell is no pair; two atoms on the same spot are
        keep = ~((center == neighbour) & np.all(images == 0, axis=1))
        if np.any(keep):
            k = int(np.argmin(np.where(keep, distances, np.inf)))
            return int(center[k]), int(neighbour[k]), float(distances[k])
        radius *= 2.0


def symmetry_dataset(
    lattice: Any,
    frac_coords: Any,
    numbers: Any,
    *,
    symprec: float = 0.01,
    angle_tolerance: float = 5.0,
) -> Any:
    """spglib's symmetry dataset of a cell (the one call afpx makes to spglib).

    Parameters
    ----------
    lattice : array_like of shape (3, 3)
        Lattice vectors as rows (Å).
    frac_coords : array_like of shape (n_atoms, 3)
    numbers : array_like of shape (n_atoms,), int
        Atomic numbers (any integer labels: atoms with equal labels may be equivalent).
    symprec, angle_tolerance : float
        spglib's distance (Å) and angle (degrees) tolerances.

    Returns
    -------
    spglib.SpglibDataset
        With ``crystallographic_orbits`` (the first atom of each atom's orbit under
        the space group of the primitive cell), ``wyckoffs`` and ``number``.

    Raises
    ------
    AfpxError
        When spglib finds no space group.
    """
    import spglib

    cell = (
        np.asarray(lattice, dtype=np.float64),
        np.asarray(frac_coords, dtype=np.float64),
        np.asarray(numbers, dtype=np.intc),
    )
    with _WARNINGS_LOCK, warnings.catch_warnings():
        # spglib 2.x warns about its error-handling mode on every failure
        warnings.simplefilter("ignore", DeprecationWarning)
        dataset = spglib.get_symmetry_dataset(
            cell,  # type: ignore[arg-type]  # spglib accepts arrays
            symprec=symprec,
            angle_tolerance=angle_tolerance,
        )
    if dataset is None:
        raise AfpxError(f"spglib found no space group (symprec={symprec}, angle={angle_tolerance})")
    return dataset


def _site_table(
    lattice: np.ndarray,
    frac_coords: np.ndarray,
    numbers: np.ndarray,
    dmin: float,
    *,
    symprec: float,
    angle_tolerance: float,
) -> SiteTable:
    """Unique sites from spglib's symmetry dataset (the cell pymatgen's analyser passes)."""
    dataset = symmetry_dataset(
        lattice, frac_coords, numbers, symprec=symprec, angle_tolerance=angle_tolerance
    )
    # crystallographic_orbits, not equivalent_atoms: the latter uses only the
    # operations that map the given cell onto itself, so a 2x1x1 supercell of a
    # cubic crystal would split one orbit into two
    equivalent = np.asarray(dataset.crystallographic_orbits)
    index, multiplicity = np.unique(equivalent, return_counts=True)
    wyckoffs = np.asarray(dataset.wyckoffs)
    return SiteTable(
        index=index.astype(np.int32),
        z=np.asarray(numbers)[index].astype(np.int16),
        multiplicity=multiplicity.astype(np.int32),
        wyckoff=wyckoffs[index].astype(str),
        spacegroup=int(dataset.number),
        dmin=dmin,
    )


def site_of_atoms(
    lattice: Any,
    frac_coords: Any,
    numbers: Any,
    representatives: Any,
    *,
    symprec: float = 0.01,
    angle_tolerance: float = 5.0,
) -> np.ndarray:
    """The unique site of every atom of a cell, given the sites' representative atoms.

    Atoms are mapped by spglib's crystallographic orbits with the given
    tolerances, as :func:`unique_sites` found the sites.

    Parameters
    ----------
    lattice, frac_coords, numbers
        The cell, as for :func:`symmetry_dataset`.
    representatives : array_like of shape (n_unique,), int
        Atom index of the representative of each unique site (``SiteTable.index``,
        the cube's ``site_index``).
    symprec, angle_tolerance : float

    Returns
    -------
    ndarray of shape (n_atoms,), int64
        Position in ``representatives`` of each atom's site.

    Raises
    ------
    AfpxError
        When an orbit has no representative among ``representatives`` (the
        tolerances differ from those the sites were found with).
    """
    dataset = symmetry_dataset(
        lattice, frac_coords, numbers, symprec=symprec, angle_tolerance=angle_tolerance
    )
    orbit = np.asarray(dataset.crystallographic_orbits, dtype=np.int64)
    reps = np.asarray(representatives, dtype=np.int64).reshape(-1)
    lookup = np.full(orbit.size, -1, dtype=np.int64)
    if reps.size and (reps.min() < 0 or reps.max() >= orbit.size):
        raise AfpxError(
            f"representative atoms {reps.tolist()} lie outside the cell's {orbit.size} atoms"
        )
    lookup[reps] = np.arange(reps.size)
    site = lookup[orbit]
    if np.any(site < 0):
        missing = sorted(set(orbit[site < 0].tolist()))
        raise AfpxError(
            f"the orbits of atoms {missing} have no representative among {reps.tolist()}: "
            "the symmetry tolerances differ from those the unique sites were found with"
        )
    return site


def unique_sites(
    structure: Structure, *, symprec: float = 0.01, angle_tolerance: float = 5.0
) -> SiteTable:
    """Crystallographically unique sites of an ordered structure.

    Parameters
    ----------
    structure : pymatgen.core.Structure
        An ordered structure (one element per site).
    symprec : float
        Distance tolerance of spglib, in Å.
    angle_tolerance : float
        Angle tolerance of spglib, in degrees.

    Returns
    -------
    SiteTable
        Representative atom, element, multiplicity (atoms of this cell in the
        orbit) and Wyckoff letter of each unique site, the space-group number
        and the shortest interatomic distance.

    Notes
    -----
    spglib's ``crystallographic_orbits`` maps every atom to the first atom of
    its orbit under the space group of the primitive cell; the representatives
    are the distinct values, the multiplicities their counts. (Its
    ``equivalent_atoms`` would use only the operations that map the given cell
    onto itself, and split orbits of supercells.) Multiplicities are counts in
    the given cell, so a 2x1x1 supercell doubles them while elements and
    Wyckoff letters stay the same.

    Examples
    --------
    >>> from pymatgen.core import Lattice, Structure
    >>> nacl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"],
    ...                                  [[0, 0, 0], [0.5, 0.5, 0.5]])
    >>> table = unique_sites(nacl)
    >>> table.multiplicity.tolist(), table.wyckoff.tolist(), table.spacegroup
    ([4, 4], ['a', 'b'], 225)
    """
    _check_tolerances(symprec, angle_tolerance)
    if len(structure) == 0:
        raise AfpxError("a structure without sites has no unique sites")
    if not structure.is_ordered:
        raise AfpxError("unique sites need an ordered structure (one element per site)")
    lattice = np.asarray(structure.lattice.matrix, dtype=float)
    frac_coords = np.asarray(structure.frac_coords, dtype=float)
    numbers = np.asarray([site.specie.Z for site in structure])
    try:
        dmin = _closest_pair(lattice, frac_coords)[2]
        return _site_table(
            lattice,
            frac_coords,
            numbers,
            dmin,
            symprec=symprec,
            angle_tolerance=angle_tolerance,
        )
    except AfpxError:
        raise
    except Exception as exc:
        raise AfpxError(f"symmetry analysis failed: {_describe(exc)}") from exc


# -- analysis of one parsed record -------------------------------------------------


@dataclass
class _Record:
    """A parsed record before filtering (internal).

    Either ``structure`` (CIF, JSON: may be disordered, carry charges) or
    ``arrays`` (lattice, frac_coords, numbers of an ASE row) is set.
    """

    id: str
    source: str
    block: str | None
    metadata: dict[str, Any]
    structure: Structure | None = None
    arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    # symbols as written in the source, for the species check
    raw_symbols: list[str] | None = None
    # exact-duplicate key (None: never a duplicate)
    digest: str | None = None


_Outcome = tuple[AnalysedStructure | Rejection, str | None]


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    message = text[0] if text else ""
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


_ELEMENTS: list[str] = []


def _elements() -> list[str]:
    """Symbols of Z = 0..118 (index 0 is the ASE dummy ``X``)."""
    if not _ELEMENTS:
        from pymatgen.core.periodic_table import Element

        _ELEMENTS.extend(["X"] + [Element.from_Z(z).symbol for z in range(1, N_ELEMENTS + 1)])
    return _ELEMENTS


def element_symbol(z: int) -> str:
    """Symbol of atomic number ``z`` (1..118; 0 gives ASE's dummy ``X``)."""
    return _elements()[int(z)]


def _symbol_problem(symbol: str, *, strict: bool) -> str | None:
    """Why a symbol as written in a source is not an element (None: it is one)."""
    text = symbol.strip()
    match = _TYPE_SYMBOL.match(text)
    if match is None:
        return f"symbol {text!r} is not an element with an optional charge"
    element = match.group(1).capitalize()
    if element != "X" and element in _elements():
        return None
    if element in {"D", "T"} and not strict:
        return None
    return f"symbol {text!r} is not an element"


def _cell_problem(matrix: np.ndarray) -> str | None:
    """Why a lattice cannot hold a crystal (None: it can)."""
    if matrix.shape != (3, 3) or not np.all(np.isfinite(matrix)):
        return "lattice is not a finite 3x3 matrix"
    lengths = np.linalg.norm(matrix, axis=1)
    volume = float(np.linalg.det(matrix))
    # a cell whose volume is a tiny fraction of a*b*c is degenerate (flat)
    if np.any(lengths <= 0) or volume <= 1e-6 * float(np.prod(lengths)):
        return f"cell volume is {volume:.4g} Å³ (lengths {np.round(lengths, 4).tolist()} Å)"
    return None


def parse_formula_sum(text: str) -> dict[str, float] | None:
    """Amounts of a CIF ``_chemical_formula_sum`` (``'Ca O3 Ti'``); None if not of that form.

    D and T count as H; terms must be whitespace-separated element symbols with
    optional amounts, as the CIF dictionary prescribes (parentheses, charges
    and free text give None: such a formula cannot be checked).
    """
    amounts: dict[str, float] = {}
    terms = text.strip().strip("'\"").split()
    if not terms:
        return None
    for term in terms:
        match = _FORMULA_TERM.match(term)
        if match is None:
            return None
        element = "H" if match.group(1) in ("D", "T") else match.group(1)
        if element not in _elements()[1:]:
            return None
        amount = float(match.group(2)) if match.group(2) else 1.0
        amounts[element] = amounts.get(element, 0.0) + amount
    return amounts if sum(amounts.values()) > 0 else None


def _formula_problem(stated_text: str, read: dict[str, float]) -> str | None:
    """Whether the atoms read agree with a stated formula sum.

    Returns None when they agree (or the formula cannot be parsed),
    ``"hydrogen"`` when they agree but the stated hydrogen is absent from the
    atoms read, and otherwise the disagreement in words. Hydrogen is left out
    of the ratios (it is often partly located); atomic fractions of the other
    elements may differ by ``_FORMULA_ABS_TOL + _FORMULA_REL_TOL * larger``.
    """
    stated = parse_formula_sum(stated_text)
    if stated is None:
        return None
    read = {el: amt for el, amt in read.items() if amt > 0}
    if "H" in read and "H" not in stated:
        return f"the atoms hold H but _chemical_formula_sum {stated_text!r} states none"
    heavy_stated = {el: amt for el, amt in stated.items() if el != "H"}
    heavy_read = {el: amt for el, amt in read.items() if el != "H"}
    total_stated, total_read = sum(heavy_stated.values()), sum(heavy_read.values())
    if total_stated > 0 and total_read > 0:
        for el in sorted(set(heavy_stated) | set(heavy_read)):
            f_stated = heavy_stated.get(el, 0.0) / total_stated
            f_read = heavy_read.get(el, 0.0) / total_read
            if abs(f_stated - f_read) > _FORMULA_ABS_TOL + _FORMULA_REL_TOL * max(f_stated, f_read):
                read_text = " ".join(f"{e}{a:g}" for e, a in sorted(read.items()))
                return (
                    f"the atoms read ({read_text}) disagree with _chemical_formula_sum"
                    f" {stated_text!r} on {el}: fraction {f_read:.3f} read, {f_stated:.3f} stated"
                )
    elif total_stated != total_read:
        return f"the atoms read disagree with _chemical_formula_sum {stated_text!r}"
    if "H" in stated and "H" not in read:
        return "hydrogen"
    return None


def _ordered_arrays(
    record: _Record, structure: Structure, params: FilterParams
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | Rejection:
    """Species and occupancy checks of a pymatgen structure; its arrays if it passes."""
    from pymatgen.core import DummySpecies, Element, Species

    def reject(reason: str, message: str) -> Rejection:
        return Rejection(record.id, record.source, record.block, reason, message)

    if len(structure) == 0:
        return reject("no_atoms", "the record holds no atoms")
    lattice = np.array(structure.lattice.matrix, dtype=np.float64)
    problem = _cell_problem(lattice)
    if problem:
        return reject("bad_cell", problem)
    # species: the symbols as written (pymatgen reads D as H and Va as V), then
    # pymatgen's species (dummy species)
    for symbol in record.raw_symbols or ():
        problem = _symbol_problem(symbol, strict=params.check_species)
        if problem:
            return reject("unknown_species", problem)
    for site in structure:
        for species in site.species:
            if isinstance(species, DummySpecies) or not isinstance(species, Element | Species):
                return reject(
                    "unknown_species", f"site {site.label} holds {species!s}, not an element"
                )
    stated = record.metadata.get("formula_sum")
    if stated is not None:
        read = structure.composition.element_composition.get_el_amt_dict()
        verdict = _formula_problem(str(stated), read)
        if verdict == "hydrogen":
            record.metadata["hydrogen_missing"] = True
        elif verdict is not None:
            return reject("formula_mismatch", verdict)
    r_factor = record.metadata.get("r_factor")
    if params.r_factor_max is not None and r_factor is not None and r_factor >= params.r_factor_max:
        key = record.metadata.get("r_factor_key", "R-factor")
        return reject("r_factor", f"{key} = {r_factor:g} ≥ {params.r_factor_max:g}")

    numbers = np.empty(len(structure), dtype=np.int16)
    for i, site in enumerate(structure):
        items = sorted(site.species.items(), key=lambda item: -item[1])
        if len(items) > 1 or items[0][1] < 1.0 - 1e-9:
            record.metadata["disordered"] = True
        if params.min_occupancy is not None:
            if len(items) > 1:
                text = " ".join(f"{sp}:{occ:g}" for sp, occ in items)
                return reject("occupancy", f"site {site.label} holds {len(items)} species ({text})")
            if items[0][1] <= params.min_occupancy:
                return reject(
                    "occupancy",
                    f"site {site.label} ({items[0][0]}) has occupancy {items[0][1]:g}"
                    f" ≤ {params.min_occupancy:g}",
                )
        # majority species (the only one when the occupancy filter is on)
        numbers[i] = items[0][0].Z
    return lattice, np.array(structure.frac_coords, dtype=np.float64), numbers


def _analyse(record: _Record, params: FilterParams) -> AnalysedStructure | Rejection:
    """Apply the filters to one parsed record and find its unique sites."""

    def reject(reason: str, message: str) -> Rejection:
        return Rejection(record.id, record.source, record.block, reason, message)

    if record.structure is not None:
        arrays = _ordered_arrays(record, record.structure, params)
        if isinstance(arrays, Rejection):
            return arrays
    else:
        assert record.arrays is not None
        arrays = record.arrays
        if arrays[2].size == 0:
            return reject("no_atoms", "the record holds no atoms")
        problem = _cell_problem(arrays[0])
        if problem:
            return reject("bad_cell", problem)
        unknown = arrays[2][(arrays[2] < 1) | (arrays[2] > N_ELEMENTS)]
        if unknown.size:
            z = int(unknown[0])
            name = "X, a dummy atom" if z == 0 else "no element"
            return reject("unknown_species", f"atomic number {z} ({name}) is not an element")
    lattice, frac_coords, numbers = arrays
    symbols = _elements()
    volume_per_atom = abs(float(np.linalg.det(lattice))) / len(numbers)
    if not volume_per_atom <= MAX_VOLUME_PER_ATOM:
        return reject(
            "bad_cell",
            f"{volume_per_atom:.4g} Å³ per atom (cell lengths"
            f" {np.round(np.linalg.norm(lattice, axis=1), 3).tolist()} Å, {len(numbers)} atoms)"
            f" is emptier than any crystal (limit {MAX_VOLUME_PER_ATOM:g} Å³)",
        )

    i, j, dmin = _closest_pair(lattice, frac_coords)
    if params.min_distance is not None and dmin < params.min_distance:
        return reject(
            "short_distance",
            f"atoms {i} ({symbols[numbers[i]]}) and {j} ({symbols[numbers[j]]}) are"
            f" {dmin:.3f} Å apart < {params.min_distance:g} Å",
        )
    try:
        sites = _site_table(
            lattice,
            frac_coords,
            numbers,
            dmin,
            symprec=params.symprec,
            angle_tolerance=params.angle_tolerance,
        )
    except Exception as exc:
        return reject("symmetry", f"symmetry analysis failed: {_describe(exc)}")
    return AnalysedStructure(
        structure_id=record.id,
        source=record.source,
        formula=_reduced_formula(numbers),
        lattice=lattice,
        frac_coords=frac_coords,
        numbers=numbers.astype(np.int16),
        sites=sites,
        metadata=record.metadata,
    )


def _reduced_formula(numbers: np.ndarray) -> str:
    from pymatgen.core import Composition

    z, counts = np.unique(numbers, return_counts=True)
    symbols = _elements()
    return Composition(
        {symbols[int(k)]: int(n) for k, n in zip(z, counts, strict=True)}
    ).reduced_formula


def _digest(id_: str, species: str, cell: np.ndarray, positions: np.ndarray) -> str:
    """Key of exact duplicates: id, species, cell and positions, bit for bit."""
    h = hashlib.sha1(f"{id_}\0{species}\0".encode())
    for array in (cell.astype(np.float64), positions.astype(np.float64)):
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


# -- CIF ------------------------------------------------------------------------


def _read_text(path: Path, max_bytes: int = int(MAX_FILE_MB * 1e6)) -> str:
    """The text of a file, at most ``max_bytes`` of it (decompressed); raises ValueError."""
    if not path.is_file():
        raise ValueError("not a regular file (a device, pipe or socket); refusing to read it")
    with path.open("rb") as handle:
        stream: Any = gzip.GzipFile(fileobj=handle) if path.suffix == ".gz" else handle
        raw = stream.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise ValueError(f"larger than {max_bytes / 1e6:g} MB; raise --max-file-mb to read it")
    if b"\x00" in raw:
        raise ValueError("binary data (NUL bytes), not a text file")
    try:
        # utf-8-sig: a byte-order mark some editors write is not part of the text
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        # CIF 1.1 is ASCII; older files are often Latin-1
        return raw.decode("latin-1")


def split_cif_blocks(text: str) -> list[tuple[str, str]]:
    """Split CIF text into its data blocks.

    Parameters
    ----------
    text : str
        The text of a CIF file.

    Returns
    -------
    list of (str, str)
        Block name (without ``data_``) and the text of the block, in file
        order. Lines before the first block are dropped; ``data_`` inside
        semicolon-delimited text fields does not start a block.
    """
    blocks: list[tuple[str, list[str]]] = []
    in_text_field = False
    for line in text.splitlines():
        if line.startswith(";"):
            in_text_field = not in_text_field
        elif not in_text_field and line[:5].lower() == "data_":
            blocks.append((line[5:].strip(), []))
        if blocks:
            blocks[-1][1].append(line)
    return [(name, "\n".join(lines) + "\n") for name, lines in blocks]


def _cif_number(value: Any) -> float | None:
    """A CIF number such as ``0.0345(3)``; None for ``?``, ``.`` or absent."""
    if value is None:
        return None
    if isinstance(value, list):
        value = value[0] if value else None
        if value is None:
            return None
    text = str(value).strip().strip("'\"")
    if text in ("", "?", "."):
        return None
    text = re.sub(r"\(\d*\)$", "", text)
    try:
        return float(text)
    except ValueError:
        return None


_HALL_TABLE: dict[str, int] = {}


def _hall_table() -> dict[str, int]:
    """Keys naming a setting -> the first matching Hall number (1..530) of spglib's table.

    Keys: ``hall:<symbol>``, ``full:<symbol>``, ``short:<symbol>`` (each also
    with ``:<choice>``) and ``number:<n>``; symbols without spaces or
    underscores, lower case. The first Hall number of a group is its
    standard setting (origin choice 1, hexagonal axes, unique axis b), the
    setting pymatgen also assumes for a symbol without a choice.
    """
    if not _HALL_TABLE:
        import spglib

        for hall_number in range(1, 531):
            t = spglib.get_spacegroup_type(hall_number)
            if t is None:
                continue
            full, short = (
                _normalise_symbol(t.international_full),
                _normalise_symbol(t.international_short),
            )
            choice = t.choice.lower()
            keys = [f"hall:{_normalise_hall(t.hall_symbol)}", f"number:{t.number}"]
            keys += [f"full:{full}", f"short:{short}"]
            if choice:
                keys += [f"full:{full}:{choice}", f"short:{short}:{choice}"]
            for key in keys:
                _HALL_TABLE.setdefault(key, hall_number)
    return _HALL_TABLE


# Symbols before the "e" glide was named (ITA 2002); spglib knows only the new ones.
_E_GLIDE: Final = {
    "abm2": "aem2",
    "aba2": "aea2",
    "cmca": "cmce",
    "cmma": "cmme",
    "ccca": "ccce",
    "c2/m2/c21/a": "c2/m2/c21/e",
    "c2/m2/m2/a": "c2/m2/m2/e",
    "c2/c2/c2/a": "c2/c2/c2/e",
}


def _normalise_symbol(symbol: str) -> str:
    """An H-M symbol without spaces, underscores and quotes, lower case."""
    return re.sub(r"[\s_'\"]", "", symbol).lower()


def _normalise_hall(symbol: str) -> str:
    """A Hall symbol without spaces, lower case (its ' and " are part of it)."""
    return re.sub(r"\s", "", symbol.strip().strip("'").strip()).lower()


def _setting_of(data: dict[str, Any]) -> int | None:
    """Hall number of the setting a CIF block names (Hall symbol, H-M symbol, number).

    Returns None when the block names no setting spglib's table knows and
    none was asked for explicitly. Raises ValueError when an explicit setting
    (``:2``, ``origin choice 2``) cannot be matched: reading such a block in
    the default setting would put the atoms in the wrong places.
    """
    table = _hall_table()
    hall = next((str(data[k]) for k in _HALL_KEYS if data.get(k)), None)
    if hall is not None and f"hall:{_normalise_hall(hall)}" in table:
        return table[f"hall:{_normalise_hall(hall)}"]
    hm = next((str(data[k]) for k in _HM_KEYS if data.get(k)), None)
    if hm is not None:
        text = hm.strip().strip("'\"")
        match = re.search(r"\(?\s*origin\s+choice\s*(\d)\s*\)?", text, flags=re.IGNORECASE)
        if match:
            text = f"{text[: match.start()]}:{match.group(1)}"
        symbol, _, choice = _normalise_symbol(text).partition(":")
        symbol = _E_GLIDE.get(symbol, symbol)
        suffix = f":{choice}" if choice else ""
        for kind in ("full", "short"):
            if f"{kind}:{symbol}{suffix}" in table:
                return table[f"{kind}:{symbol}{suffix}"]
        if choice:
            raise ValueError(
                f"no symmetry operations, and the setting of {hm.strip()!r} is not one afpx knows"
            )
        # a symbol afpx does not know: leave it to pymatgen (older symbols, e.g. C c c a)
        return None
    number = next((_cif_number(data[k]) for k in _SG_NUMBER_KEYS if data.get(k)), None)
    if hall is None and number is not None and f"number:{int(number)}" in table:
        return table[f"number:{int(number)}"]
    return None


def _symops_for(data: dict[str, Any]) -> list[str] | None:
    """Symmetry operations (``x,y,z`` strings) for a block that lists none.

    pymatgen reads ``F d -3 m:2`` without operations in origin choice 1 when
    the space-group number is also given, and builds operations from symbols
    slowly (seconds for a cubic F group); spglib's table of the 530 Hall
    settings gives the operations of exactly the named setting, at once.
    """
    import spglib

    hall_number = _setting_of(data)
    if hall_number is None:
        return None
    ops = spglib.get_symmetry_from_database(hall_number)
    if ops is None:
        return None
    return [
        _xyz_string(rotation, translation)
        for rotation, translation in zip(ops["rotations"], ops["translations"], strict=True)
    ]


def _xyz_string(rotation: np.ndarray, translation: np.ndarray) -> str:
    from fractions import Fraction

    parts = []
    for row, shift in zip(rotation, translation, strict=True):
        terms = []
        for coefficient, axis in zip(row, "xyz", strict=True):
            if coefficient:
                terms.append(("+" if coefficient > 0 else "-") + axis)
        fraction = Fraction(float(shift)).limit_denominator(12)
        if fraction:
            terms.append(("+" if fraction > 0 else "-") + str(abs(fraction)))
        parts.append("".join(terms).lstrip("+"))
    return ",".join(parts)


def _read_cif_block(name: str, text: str, *, path: Path, structure_id: str) -> _Record | Rejection:
    from pymatgen.io.cif import CifParser

    source = str(path)

    def reject(reason: str, message: str) -> Rejection:
        return Rejection(structure_id, source, name, reason, message)

    with _WARNINGS_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            parser = CifParser.from_str(text)
            data: dict[str, Any] = next(iter(parser.as_dict().values()), {})
        except Exception as exc:
            return reject("parse_error", _describe(exc))
        if "_atom_site_fract_x" not in data and "_atom_site_Cartn_x" not in data:
            return reject("no_atoms", "the block has no _atom_site coordinates")
        site_problem = _atom_site_problem(data)
        if site_problem is not None:
            return reject(*site_problem)
        cell = [
            _cif_number(data.get(k))
            for k in (
                "_cell_length_a",
                "_cell_length_b",
                "_cell_length_c",
                "_cell_angle_alpha",
                "_cell_angle_beta",
                "_cell_angle_gamma",
            )
        ]
        if any(v is None for v in cell):
            return reject("parse_error", "the block lacks some _cell_length/_cell_angle values")
        problem = _cif_cell_problem(*[float(v) for v in cell if v is not None])
        if problem:
            return reject("bad_cell", problem)
        injected = False
        if not any(data.get(k) for k in _SYMOP_KEYS):
            try:
                symops = _symops_for(data)
            except ValueError as exc:
                return reject("parse_error", str(exc))
            if symops:
                loop = "\nloop_\n_symmetry_equiv_pos_as_xyz\n"
                loop += "".join(f"'{op}'\n" for op in symops)
                try:
                    parser = CifParser.from_str(text + loop)
                except Exception as exc:
                    return reject("parse_error", _describe(exc))
                injected = True
        try:
            structures = parser.parse_structures(primitive=False, on_error="raise")
        except Exception as exc:
            if "exceeded tolerance" in str(exc):
                sums = [
                    m.group(1)
                    for w in caught
                    if (m := re.search(r"occupancies \(\[(.*?)\]\)", str(w.message)))
                ]
                where = f" ({sums[0]})" if sums else ""
                return reject(
                    "occupancy",
                    f"occupancies of the atoms on one position sum to more than 1{where};"
                    " fix _atom_site_occupancy",
                )
            return reject("parse_error", _describe(exc))
        if not structures:
            return reject("parse_error", "pymatgen found no structure in the block")
    messages = [str(w.message) for w in caught]
    if any("Defaulting to P1" in m for m in messages):
        stated = [str(data[k]) for k in (*_HM_KEYS, *_HALL_KEYS, *_SG_NUMBER_KEYS) if data.get(k)]
        if stated and stated[0].strip("'\" ").upper() not in ("P1", "P 1", "1"):
            return reject(
                "parse_error",
                f"no symmetry operations and space group {stated[0]!r} not understood",
            )

    metadata: dict[str, Any] = {"block": name, "r_factor": None, "r_factor_stated": False}
    for key in _R_FACTOR_KEYS:
        value = _cif_number(data.get(key))
        if value is not None:
            metadata.update(r_factor=value, r_factor_stated=True, r_factor_key=key)
            break
    cod_id = _cif_number(data.get("_cod_database_code"))
    if cod_id is not None:
        metadata["cod_id"] = str(int(cod_id))
    database_id = _cif_database_id(data)
    if database_id is not None:
        # the database's own id names the structure; the file-derived id is kept
        metadata["file_id"] = structure_id
        structure_id = database_id
    if injected:
        metadata["symops_generated"] = True
    symbols = data.get("_atom_site_type_symbol") or data.get("_atom_site_label") or []
    if isinstance(symbols, str):
        symbols = [symbols]
    raw_symbols = [str(s) for s in symbols]
    if "_atom_site_type_symbol" not in data:
        label_problem = _label_problem(raw_symbols, structures[0], data)
        if label_problem is not None:
            return reject("unknown_species", label_problem)
        raw_symbols = [_label_symbol(s) for s in raw_symbols]
    formula_sum = str(data.get("_chemical_formula_sum") or "").strip()
    if formula_sum not in ("", "?", "."):
        metadata["formula_sum"] = formula_sum
    return _Record(
        structure_id, source, name, metadata, structure=structures[0], raw_symbols=raw_symbols
    )


def _atom_site_problem(data: dict[str, Any]) -> tuple[str, str] | None:
    """(reason, message) for symmetry operations and occupancies a reader must not guess."""
    for key in _SYMOP_KEYS:
        ops = data.get(key)
        for op in [ops] if isinstance(ops, str) else ops or []:
            parts = re.sub(r"\s", "", str(op).strip("'\"")).lower().split(",")
            if len(parts) != 3 or not all(_SYMOP_COMPONENT.match(p) for p in parts):
                return (
                    "parse_error",
                    f"symmetry operation {op!r} ({key}) is not of the form x,y,z"
                    " (e.g. -x+1/2,y,z); fix or remove it",
                )
    occupancies = data.get("_atom_site_occupancy")
    if occupancies is None:
        return None
    occupancies = [occupancies] if isinstance(occupancies, str) else list(occupancies)
    labels = data.get("_atom_site_label") or []
    labels = [labels] if isinstance(labels, str) else list(labels)
    for k, value in enumerate(occupancies):
        label = labels[k] if k < len(labels) else f"#{k + 1}"
        text = str(value).strip().strip("'\"")
        if text in ("?", "."):
            continue  # unknown / inapplicable: pymatgen and afpx take 1
        try:
            occupancy = float(re.sub(r"\(\d*\)$", "", text))
        except ValueError:
            return (
                "parse_error",
                f"_atom_site_occupancy {text!r} of site {label} is not a number",
            )
        if not occupancy > 0:
            return (
                "occupancy",
                f"site {label} has occupancy {text} (a site that is not there);"
                " remove the site or fix its occupancy",
            )
    return None


def _label_problem(labels: list[str], structure: Structure, data: dict[str, Any]) -> str | None:
    """Why elements read from atom-site labels alone cannot be trusted (None: they can).

    With a ``_chemical_formula_sum`` the formula check decides; without one, a
    label read as an element of Z >= 100 or ambiguous in capitals (``NH4``:
    N or Nh, ``BI``: B or Bi) is refused.
    """
    if data.get("_chemical_formula_sum"):
        return None
    for species in structure.composition.element_composition:
        z = int(getattr(species, "Z", 0))
        if z >= _LABEL_MAX_Z:
            return (
                f"a label reads as {species} (Z = {z}), an element no crystal structure is"
                " known of; state the elements with _atom_site_type_symbol"
            )
    for label in labels:
        letters = re.match(r"[A-Za-z]*", label.strip())
        token = letters.group(0) if letters else ""
        if len(token) >= 2 and token[:2].isupper():
            one, two = token[0], token[:2].capitalize()
            if one in _elements()[1:] and two in _elements()[1:]:
                return (
                    f"label {label!r} is ambiguous without _atom_site_type_symbol or"
                    f" _chemical_formula_sum ({one} or {two}?); state _atom_site_type_symbol"
                )
    return None


#: CIF items with a structure's database code, in order of preference, and the
#: prefix of the structure id made from it (``cod-1000017``, ``amcsd-0000029``).
CIF_DATABASE_CODES: Final = (
    ("_cod_database_code", "cod"),
    ("_database_code_amcsd", "amcsd"),
    ("_database_code_icsd", "icsd"),
)


def _cif_database_id(data: dict[str, Any]) -> str | None:
    """``PREFIX-CODE`` from the first database code the block states, else None."""
    items = {str(k).lower(): v for k, v in data.items()}
    for key, prefix in CIF_DATABASE_CODES:
        value = items.get(key)
        if isinstance(value, list):
            value = value[0] if value else None
        code = "" if value is None else str(value).strip().strip("'\"")
        if code not in ("", "?", "."):
            return f"{prefix}-{code}"
    return None


def _label_symbol(label: str) -> str:
    """The element part of an atom-site label (``Na1`` -> ``Na``, ``O2a`` -> ``O``)."""
    letters = re.match(r"[A-Za-z]*", label.strip())
    token = letters.group(0) if letters else ""
    if token in _NOT_ELEMENTS or token.capitalize() in _NOT_ELEMENTS:
        return token
    for n in (2, 1):
        if token[:n].capitalize() in _elements():
            return token[:n].capitalize()
    return label


def _cif_cell_problem(
    a: float, b: float, c: float, alpha: float, beta: float, gamma: float
) -> str | None:
    ca, cb, cg = (math.cos(math.radians(x)) for x in (alpha, beta, gamma))
    root = 1 - ca * ca - cb * cb - cg * cg + 2 * ca * cb * cg
    volume = a * b * c * math.sqrt(root) if root > 0 else 0.0
    if min(a, b, c) <= 0 or volume <= 1e-6 * abs(a * b * c):
        return (
            f"cell a={a:g} b={b:g} c={c:g} Å, α={alpha:g} β={beta:g} γ={gamma:g}°"
            f" has volume {volume:.4g} Å³"
        )
    return None


def _read_cif(path: Path, max_bytes: int) -> Iterator[_Record | Rejection]:
    try:
        text = _read_text(path, max_bytes)
    except Exception as exc:
        yield Rejection(str(path), str(path), None, "parse_error", _describe(exc))
        return
    if not text.strip():
        yield Rejection(str(path), str(path), None, "parse_error", "empty file")
        return
    blocks = split_cif_blocks(text)
    if not blocks:
        yield Rejection(str(path), str(path), None, "parse_error", "no data_ block in the file")
        return
    for name, block_text in blocks:
        structure_id = path.stem if len(blocks) == 1 else f"{path.stem}#{name}"
        yield _read_cif_block(name, block_text, path=path, structure_id=structure_id)


# -- JSON (pymatgen dicts) ------------------------------------------------------------

_JSON_ID_KEYS: Final = ("structure_id", "id", "material_id", "name")


def _json_documents(path: Path, max_bytes: int) -> Iterator[tuple[str, Any]]:
    """(line label, decoded object) for JSON lines, or the items of a JSON file."""
    text = _read_text(path, max_bytes)
    stripped = text.lstrip()
    if stripped.startswith("[") or (stripped.startswith("{") and "\n{" not in stripped.rstrip()):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            doc = None
        if doc is not None:
            items = doc if isinstance(doc, list) else [doc]
            for i, item in enumerate(items):
                yield str(i + 1), item
            return
    for number, line in enumerate(io.StringIO(text), start=1):
        if not line.strip():
            continue
        try:
            yield str(number), json.loads(line)
        except json.JSONDecodeError as exc:
            yield str(number), exc


def _json_stem(path: Path) -> str:
    name = path.name
    for suffix in sorted(JSON_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _read_json(path: Path, max_bytes: int) -> Iterator[_Record | Rejection]:
    from pymatgen.core import Structure

    source = str(path)
    try:
        documents = list(_json_documents(path, max_bytes))
    except Exception as exc:
        yield Rejection(source, source, None, "parse_error", _describe(exc))
        return
    if not documents:
        yield Rejection(source, source, None, "parse_error", "no JSON records in the file")
        return
    stem = _json_stem(path)
    for line, doc in documents:
        default_id = f"{stem}:{line}"
        if isinstance(doc, Exception):
            yield Rejection(default_id, source, line, "parse_error", _describe(doc))
            continue
        if not isinstance(doc, dict):
            message = f"a JSON {type(doc).__name__}, not a structure dict"
            yield Rejection(default_id, source, line, "parse_error", message)
            continue
        struct_dict = doc.get("structure", doc)
        structure_id = next(
            (str(doc[k]) for k in _JSON_ID_KEYS if isinstance(doc.get(k), str | int)), default_id
        )
        metadata: dict[str, Any] = {"block": line, "r_factor": None, "r_factor_stated": False}
        metadata.update(
            {
                k: v
                for k, v in doc.items()
                if k != "structure"
                and not k.startswith("@")
                and isinstance(v, str | int | float | bool)
                and k not in ("lattice", "sites")
            }
        )
        try:
            raw_symbols = [
                str(sp.get("element")) for site in struct_dict["sites"] for sp in site["species"]
            ]
        except Exception as exc:
            yield Rejection(
                structure_id, source, line, "parse_error", f"not a structure dict: {_describe(exc)}"
            )
            continue
        try:
            with _WARNINGS_LOCK, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                structure = Structure.from_dict(struct_dict)
        except Exception as exc:
            # a symbol pymatgen cannot build is the better reason
            bad = next(
                (p for s in raw_symbols if (p := _symbol_problem(s, strict=True)) is not None),
                None,
            )
            if bad is not None:
                yield Rejection(structure_id, source, line, "unknown_species", bad)
            else:
                yield Rejection(structure_id, source, line, "parse_error", _describe(exc))
            continue
        digest = _digest(
            structure_id,
            " ".join(str(site.species) for site in structure),
            np.asarray(structure.lattice.matrix),
            np.asarray(structure.frac_coords),
        )
        yield _Record(
            structure_id,
            source,
            line,
            metadata,
            structure=structure,
            raw_symbols=raw_symbols,
            digest=digest,
        )


# -- ASE databases -----------------------------------------------------------------------

_ASE_ID_KEYS: Final = ("name", "structure_id", "material_id")


def _ase_rows(path: Path, source: str, first: int, last: int) -> Iterator[_Record | _Tagged]:
    """Records of the rows ``first <= id <= last`` of an ASE SQLite database, in id order."""
    import ase.db

    stem = path.stem
    db = ase.db.connect(str(path), type="db")
    # a range of the integer primary key: no sort, no temporary copy of the table
    rows = db.select(f"id>={first},id<={last}", include_data=False)
    for row in sorted(rows, key=lambda row: int(row.id)):
        block = str(row.id)
        kvp = dict(row.key_value_pairs)
        structure_id = next(
            (str(kvp[k]) for k in _ASE_ID_KEYS if isinstance(kvp.get(k), str)), f"{stem}:{row.id}"
        )
        numbers = np.asarray(row.numbers, dtype=np.int64)
        cell = np.asarray(row.cell, dtype=np.float64)
        positions = np.asarray(row.positions, dtype=np.float64).reshape(-1, 3)
        digest = _digest(structure_id, " ".join(map(str, numbers.tolist())), cell, positions)
        metadata: dict[str, Any] = {
            "block": block,
            "row": int(row.id),
            "r_factor": None,
            "r_factor_stated": False,
        }
        metadata.update({k: (v.item() if isinstance(v, np.generic) else v) for k, v in kvp.items()})
        if not np.all(row.pbc):
            message = f"not periodic in all directions (pbc={np.asarray(row.pbc).tolist()})"
            yield _Tagged(Rejection(structure_id, source, block, "bad_cell", message), digest)
            continue
        if _cell_problem(cell) is None and numbers.size:
            # wrap into [0, 1) as pymatgen's readers do; keeps fingerprints origin-free
            frac_coords = np.linalg.solve(cell.T, positions.T).T
            frac_coords -= np.floor(frac_coords)
            frac_coords[frac_coords >= 1.0] = 0.0
        else:
            frac_coords = np.zeros((numbers.size, 3))
        yield _Record(
            structure_id,
            source,
            block,
            metadata,
            arrays=(cell, frac_coords, numbers),
            digest=digest,
        )


@dataclass
class _Tagged:
    """A rejection that still takes part in duplicate detection (internal)."""

    rejection: Rejection
    digest: str | None


# -- tasks ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Task:
    """One unit of reading: a file, or a range of rows of an ASE database (internal)."""

    kind: str  # "cif", "json", "ase", "ase-empty" or "ase-error"
    path: str
    source: str
    first: int = 0  # ASE row ids first..last
    last: int = 0
    n: int = 1  # records expected, for the progress bar
    message: str = ""  # why an "ase-error" task's database cannot be read
    max_bytes: int = int(MAX_FILE_MB * 1e6)  # most bytes a text reader takes from the file


def _kind_of(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(JSON_SUFFIXES):
        return "json"
    if name.endswith(ASE_SUFFIXES):
        return "ase"
    return "cif"


def _is_input_file(path: Path) -> bool:
    name = path.name.lower()
    return not name.startswith(".") and name.endswith(CIF_SUFFIXES + JSON_SUFFIXES + ASE_SUFFIXES)


def _ase_ids(path: Path) -> np.ndarray:
    """Row ids of an ASE SQLite database, sorted; raises if it is not one."""
    import sqlite3

    # read-only: never create or migrate a file the user handed in
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as connection:
        try:
            ids = connection.execute("SELECT id FROM systems ORDER BY id").fetchall()
        except sqlite3.DatabaseError as exc:
            raise ValueError(f"not an ASE SQLite database ({exc})") from exc
    return np.asarray([i for (i,) in ids], dtype=np.int64)


def _tasks_for(item: str | os.PathLike[str]) -> list[_Task]:
    path = Path(item)
    if not path.exists():
        from afpx import datasets

        name = str(item)
        if name in datasets.DATASETS:
            db_path = datasets.dataset_path(name)
            return _ase_tasks(db_path, source=name)
        known = ", ".join(sorted(datasets.DATASETS))
        raise AfpxError(f"{name!r} is neither a file, a folder nor a dataset name ({known})")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _is_input_file(p))
        tasks: list[_Task] = []
        for file in files:
            tasks += _file_tasks(file)
        return tasks
    if not path.is_file():
        raise AfpxError(
            f"{item} is not a regular file (a device, pipe or socket); give files or folders"
        )
    return _file_tasks(path)


def _file_tasks(path: Path) -> list[_Task]:
    kind = _kind_of(path)
    if kind == "ase":
        return _ase_tasks(path, source=str(path))
    return [_Task(kind, str(path), str(path))]


def _ase_tasks(path: Path, *, source: str) -> list[_Task]:
    try:
        ids = _ase_ids(path)
    except Exception as exc:
        return [_Task("ase-error", str(path), source, message=_describe(exc))]
    if ids.size == 0:
        return [_Task("ase-empty", str(path), source)]
    return [
        _Task("ase", str(path), source, int(chunk[0]), int(chunk[-1]), int(chunk.size))
        for chunk in np.array_split(ids, -(-ids.size // _ROWS_PER_TASK))
    ]


def _run_task(task: _Task, params: FilterParams) -> list[_Outcome]:
    """Read and analyse one task; every record becomes one outcome."""
    path = Path(task.path)
    if task.kind == "ase":
        reader: Iterator[Any] = _ase_rows_safe(path, task)
    elif task.kind == "ase-error":
        reader = iter([Rejection(task.path, task.source, None, "parse_error", task.message)])
    elif task.kind == "ase-empty":
        reader = iter(
            [Rejection(task.path, task.source, None, "no_atoms", "the database has no rows")]
        )
    elif task.kind == "json":
        reader = _read_json(path, task.max_bytes)
    else:
        reader = _read_cif(path, task.max_bytes)
    outcomes: list[_Outcome] = []
    for item in reader:
        if isinstance(item, Rejection):
            outcomes.append((item, None))
        elif isinstance(item, _Tagged):
            outcomes.append((item.rejection, item.digest))
        else:
            with _WARNINGS_LOCK, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    result = _analyse(item, params)
                except Exception as exc:  # a bug, but one record must not stop the run
                    logger.exception("analysis of %s failed", item.id)
                    message = f"could not be analysed: {_describe(exc)}"
                    result = Rejection(item.id, item.source, item.block, "parse_error", message)
            outcomes.append((result, item.digest))
    return outcomes


def _ase_rows_safe(path: Path, task: _Task) -> Iterator[_Record | Rejection | _Tagged]:
    try:
        yield from _ase_rows(path, task.source, task.first, task.last)
    except Exception as exc:
        yield Rejection(str(path), task.source, None, "parse_error", _describe(exc))


#: Metadata an accepted structure keeps when ``read_structures(metadata=False)``.
_LEAN_METADATA: Final = ("block", "hydrogen_missing")


def _run_chunk(tasks: list[_Task], params: FilterParams, metadata: bool = True) -> list[_Outcome]:
    outcomes: list[_Outcome] = []
    for task in tasks:
        outcomes += _run_task(task, params)
    if metadata:
        return outcomes
    # a large corpus's database columns would otherwise stay in memory for nothing
    return [
        (
            dataclasses.replace(
                result,
                metadata={k: result.metadata[k] for k in _LEAN_METADATA if k in result.metadata},
            )
            if isinstance(result, AnalysedStructure)
            else result,
            digest,
        )
        for result, digest in outcomes
    ]


def _chunks(tasks: list[_Task]) -> list[list[_Task]]:
    chunks: list[list[_Task]] = []
    current: list[_Task] = []
    for task in tasks:
        if task.kind.startswith("ase"):
            if current:
                chunks.append(current)
                current = []
            chunks.append([task])
            continue
        current.append(task)
        if len(current) >= _FILES_PER_TASK:
            chunks.append(current)
            current = []
    if current:
        chunks.append(current)
    return chunks


def _progress_bar(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="rec", desc="reading", leave=False)


def read_structures(
    inputs: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    *,
    params: FilterParams = FilterParams(),
    progress: bool | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    max_file_mb: float = MAX_FILE_MB,
    metadata: bool = True,
) -> ReadResult:
    """Read, filter and analyse crystal structures.

    Parameters
    ----------
    inputs : sequence of str or path
        CIF files (every data block is a structure), folders (searched
        recursively for ``*.cif``, ``*.json``, ``*.jsonl``, ``*.json.gz``,
        ``*.jsonl.gz`` and ``*.db``), JSON / JSON-lines files of pymatgen
        structure dicts (optionally wrapped as ``{"id": ..., "structure":
        {...}}``), ASE databases, or names of datasets known to
        :mod:`afpx.datasets` (``"oqmd-icsd"``, fetched on first use).
    params : FilterParams
        Quality filters and symmetry tolerances.
    progress : bool or None
        Show a progress bar; None shows one when stderr is a terminal.
    scheduler, workers
        Where the reading tasks (a thousand database rows or sixteen files
        each) run, as for :func:`afpx.scheduler.use_scheduler`: by default on
        Dask's current scheduler (an active ``distributed.Client`` included).
        The result is the same, in the same order, whatever the scheduler.
    max_file_mb : float
        Most megabytes (10^6 bytes, after decompression) read from one CIF or
        JSON file; a larger file is a ``parse_error`` rejection, not read
        whole. ASE databases are read row by row and are not capped.
    metadata : bool
        Keep every structure's metadata; False keeps only ``block`` and
        ``hydrogen_missing`` (what a cube needs: database columns of a large
        corpus are a third of its memory).

    Returns
    -------
    ReadResult
        Accepted structures and rejections, in input order.

    Raises
    ------
    AfpxError
        If an input is neither an existing path nor a dataset name, is a
        special file (device, pipe), the scheduler options are invalid (see
        :func:`afpx.scheduler.use_scheduler`) or ``max_file_mb`` is not positive.

    Warns
    -----
    AfpxWarning
        Once, when accepted structures state hydrogen in their formula that
        their coordinates lack (:meth:`ReadResult.hydrogen_missing`).
    """
    structures: list[AnalysedStructure] = []
    rejections: list[Rejection] = []
    duplicates = _Duplicates()
    n_read = 0
    run = functools.partial(_run_chunk, params=params, metadata=metadata)
    chunks = _read_chunks(
        inputs,
        run,
        progress=progress,
        scheduler=scheduler,
        workers=workers,
        max_file_mb=max_file_mb,
    )
    for outcomes, finished in chunks:
        for result, digest in outcomes:
            n_read += 1
            if digest is not None:
                result = _deduplicate(result, digest, duplicates)
            if isinstance(result, Rejection):
                rejections.append(result)
            else:
                structures.append(result)
        duplicates.forget(finished)
    read = ReadResult(structures, rejections, n_read, params)
    missing = read.hydrogen_missing()
    if missing:
        _warn_hydrogen(len(missing), missing[0].structure_id, missing[0].source)
    return read


def read_table(
    inputs: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    *,
    params: FilterParams = FilterParams(),
    progress: bool | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    max_file_mb: float = MAX_FILE_MB,
) -> TableRead:
    """Read, filter and analyse crystal structures into one :class:`StructureTable`.

    The same records are accepted and rejected as by :func:`read_structures`,
    in the same order and under the same ids, but every reading task packs
    its accepted structures into columns before handing them back, and the
    metadata is not kept (``hydrogen_missing`` aside): what a cube of a large
    corpus needs, in about a quarter of the memory of :class:`AnalysedStructure`
    objects.

    Parameters
    ----------
    inputs, params, progress, scheduler, workers, max_file_mb
        As for :func:`read_structures`.

    Returns
    -------
    TableRead
        Accepted structures and rejections, in input order.

    Raises
    ------
    AfpxError
        As :func:`read_structures`.

    Warns
    -----
    AfpxWarning
        As :func:`read_structures`.
    """
    parts: list[dict[str, np.ndarray]] = []
    rejections: list[Rejection] = []
    duplicates = _Duplicates()
    n_read = 0
    run = functools.partial(_run_chunk_table, params=params)
    chunks = _read_chunks(
        inputs,
        run,
        progress=progress,
        scheduler=scheduler,
        workers=workers,
        max_file_mb=max_file_mb,
    )
    for chunk, finished in chunks:
        n_read += len(chunk.outcomes)
        parts.append(_accept(chunk, rejections, duplicates))
        duplicates.forget(finished)
    table = _assemble(parts)
    _warn_missing_hydrogen(table)
    return TableRead(table, rejections, n_read, params)


def read_spilled(
    inputs: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    folder: str | os.PathLike[str],
    *,
    params: FilterParams = FilterParams(),
    progress: bool | None = None,
    max_file_mb: float = MAX_FILE_MB,
) -> TableRead:
    """As :func:`read_table`, but the bulky columns go to ``folder`` as they are read.

    Reads on the current Dask scheduler. Every reading task's accepted
    structures (duplicates dropped), with their labels, are written to one
    file in ``folder``; only the offsets (16 bytes per structure) and what
    the read as a whole needs (distinct sources, the structures lacking
    hydrogen, a digest) are kept in memory. The caller owns ``folder`` (and
    removes it).

    Parameters
    ----------
    inputs, params, progress, max_file_mb
        As for :func:`read_table`.
    folder : str or path
        An existing, empty folder.

    Returns
    -------
    TableRead
        Its ``table`` is a :class:`SpilledTable`.

    Raises
    ------
    AfpxError
        As :func:`read_structures`.

    Warns
    -----
    AfpxWarning
        As :func:`read_structures`.
    """
    counts: dict[str, list[np.ndarray]] = {"n_atoms": [], "n_sites": []}
    part_sizes: list[int] = []
    rejections: list[Rejection] = []
    duplicates = _Duplicates()
    digest = hashlib.sha256()
    sources: dict[str, None] = {}
    n_hydrogen, first_hydrogen = 0, None
    n_read = 0
    # each reading task writes its structures, labels included, to a file: only what
    # the read as a whole needs comes back, and only counts are kept
    run = functools.partial(_run_chunk_spill, params=params, folder=os.fspath(folder))
    chunks = _read_chunks(
        inputs, run, progress=progress, scheduler=None, workers=None, max_file_mb=max_file_mb
    )
    for chunk, finished in chunks:
        n_read += len(chunk.outcomes)
        labels, keep = _accept_keep(chunk, rejections, duplicates)
        duplicates.forget(finished)
        if chunk.part is None:
            continue
        final = _part_file(os.fspath(folder), len(part_sizes))
        ids = labels["structure_id"]
        if not len(ids):
            os.unlink(chunk.part)  # every structure of the task repeated an earlier one
            continue
        if keep is not None or ids is not chunk.columns["structure_id"]:
            # duplicates dropped or ids renamed: the part as kept
            with np.load(chunk.part) as npz:
                whole = {name: npz[name] for name in (*_SPILLED, *_SPILLED_LABELS)}
            if keep is not None:
                whole = _take(whole, keep)
            whole["structure_id"] = ids
            part_digest = _save_part(final, whole)
            os.unlink(chunk.part)
        else:
            os.replace(chunk.part, final)
            part_digest = chunk.digest
        assert part_digest is not None  # a task that wrote a part says what it wrote
        digest.update(bytes.fromhex(part_digest))
        part_sizes.append(len(ids))
        for name, values in counts.items():
            values.append(labels[name])
        sources.update(dict.fromkeys(labels["source"].tolist()))
        missing = np.flatnonzero(labels["hydrogen_missing"])
        if missing.size:
            n_hydrogen += missing.size
            if first_hydrogen is None:
                first = int(missing[0])
                first_hydrogen = (str(ids[first]), str(labels["source"][first]))

    def offsets(parts: list[np.ndarray]) -> np.ndarray:
        joined = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return np.concatenate([[0], np.cumsum(joined, dtype=np.int64)]).astype(np.int64)

    table = SpilledTable(
        folder=os.fspath(folder),
        atom_start=offsets(counts["n_atoms"]),
        site_start=offsets(counts["n_sites"]),
        part_start=offsets([np.asarray(part_sizes, dtype=np.int64)]),
        sources=tuple(sources),
        n_hydrogen_missing=n_hydrogen,
        first_hydrogen_missing=first_hydrogen,
        digest=digest.hexdigest(),
    )
    _warn_missing_hydrogen(table)
    return TableRead(table, rejections, n_read, params)


def _hydrogen_missing(table: StructureTable | SpilledTable) -> tuple[int, tuple[str, str] | None]:
    """Structures of ``table`` lacking the hydrogen their formula states; the first's id, source."""
    if isinstance(table, SpilledTable):
        return table.n_hydrogen_missing, table.first_hydrogen_missing
    missing = np.flatnonzero(table.hydrogen_missing)
    if not missing.size:
        return 0, None
    first = int(missing[0])
    return int(missing.size), (str(table.structure_id[first]), str(table.source[first]))


def _warn_missing_hydrogen(table: StructureTable | SpilledTable) -> None:
    """Warn once if any structure of ``table`` lacks the hydrogen its formula states."""
    n, first = _hydrogen_missing(table)
    if first is not None:
        _warn_hydrogen(n, *first)


def _warn_hydrogen(n: int, structure_id: str, source: str) -> None:
    warnings.warn(
        f"{n} accepted structure(s) state hydrogen in _chemical_formula_sum but"
        f" have no H coordinates (first: {structure_id}, {source});"
        " their fingerprints lack the H neighbours",
        AfpxWarning,
        stacklevel=3,  # the caller of read_structures or read_table
    )


def _read_chunks(
    inputs: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    run: Callable[[list[_Task]], Any],
    *,
    progress: bool | None,
    scheduler: str | None,
    workers: int | None,
    max_file_mb: float,
) -> Iterator[tuple[Any, list[str]]]:
    """``run`` of every chunk of tasks of ``inputs``, in order, with the progress bar.

    Each result comes with the sources that no later chunk reads.
    """
    import sys

    if isinstance(inputs, str | os.PathLike):
        inputs = [inputs]
    if workers is not None and workers < 1:
        raise AfpxError(f"workers must be at least 1, not {workers}")
    if not (math.isfinite(max_file_mb) and max_file_mb > 0):
        raise AfpxError(f"max_file_mb must be a positive number of megabytes, not {max_file_mb}")
    tasks: list[_Task] = []
    for item in inputs:
        tasks += _tasks_for(item)
    max_bytes = int(max_file_mb * 1e6)
    tasks = [dataclasses.replace(task, max_bytes=max_bytes) for task in tasks]
    if progress is None:
        progress = sys.stderr.isatty()
    chunks = _chunks(tasks)
    last = {task.source: i for i, chunk in enumerate(chunks) for task in chunk}
    finished: list[list[str]] = [[] for _ in chunks]
    for source, i in last.items():
        finished[i].append(source)
    bar = _progress_bar(sum(t.n for t in tasks), bool(progress))
    try:
        results = _map_chunks(chunks, run, scheduler=scheduler, workers=workers)
        for i, (chunk, result) in enumerate(zip(chunks, results, strict=True)):
            yield result, finished[i]
            bar.update(sum(t.n for t in chunk))
    finally:
        bar.close()


@dataclass
class _TableChunk:
    """What one reading task hands to :func:`read_table` (internal).

    ``outcomes`` has one entry per record, in order: its rejection (None for
    the next accepted structure) and its duplicate key; ``blocks`` and
    ``columns`` (see :func:`_table_columns`) describe the accepted structures.
    """

    outcomes: list[tuple[Rejection | None, str | None]]
    blocks: list[str | None]
    columns: dict[str, np.ndarray]
    part: str | None = None  # the file the task wrote its columns to
    digest: str | None = None  # sha256 of what it wrote there


def _run_chunk_table(tasks: list[_Task], params: FilterParams) -> _TableChunk:
    outcomes = _run_chunk(tasks, params)
    accepted = [r for r, _ in outcomes if isinstance(r, AnalysedStructure)]
    return _TableChunk(
        [(r if isinstance(r, Rejection) else None, digest) for r, digest in outcomes],
        [s.metadata.get("block") for s in accepted],
        _table_columns(accepted),
    )


#: Per-structure columns a spilling reading task hands back: what duplicates are
#: checked by, and counts. The rest stays in its file.
_LABELS: Final = ("structure_id", "source", "hydrogen_missing", "n_atoms", "n_sites")


def _run_chunk_spill(tasks: list[_Task], params: FilterParams, folder: str) -> _TableChunk:
    """:func:`_run_chunk_table` that writes its columns to a file in ``folder``.

    Only the outcomes and a few per-structure columns (:data:`_LABELS`)
    travel back: what a wave of reading tasks holds in memory carries
    neither the atoms nor the formulas.
    """
    chunk = _run_chunk_table(tasks, params)
    if not len(chunk.columns["structure_id"]):
        return chunk
    part = os.path.join(folder, f"read-{uuid.uuid4().hex}.npz")
    digest = _save_part(part, chunk.columns)
    labels = {name: chunk.columns[name] for name in _LABELS}
    return _TableChunk(chunk.outcomes, chunk.blocks, labels, part, digest)


def _accept(
    chunk: _TableChunk, rejections: list[Rejection], duplicates: _Duplicates
) -> dict[str, np.ndarray]:
    """The columns of a chunk less its duplicates, which join ``rejections`` with the rest."""
    return _accept_keep(chunk, rejections, duplicates)[0]


def _accept_keep(
    chunk: _TableChunk, rejections: list[Rejection], duplicates: _Duplicates
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """:func:`_accept`, and the positions kept where duplicates were dropped (else None)."""
    columns = dict(chunk.columns)
    keep: list[int] = []
    renamed: dict[int, str] = {}
    k = -1
    for rejection, digest in chunk.outcomes:
        if rejection is not None:
            checked = rejection if digest is None else _deduplicate(rejection, digest, duplicates)
            assert isinstance(checked, Rejection)
            rejections.append(checked)
            continue
        k += 1
        if digest is None:
            keep.append(k)
            continue
        structure_id = str(columns["structure_id"][k])
        verdict = duplicates.check(str(columns["source"][k]), structure_id, chunk.blocks[k], digest)
        if isinstance(verdict, Rejection):
            rejections.append(verdict)
            continue
        keep.append(k)
        if verdict != structure_id:
            renamed[k] = verdict
    if renamed:
        ids = columns["structure_id"].copy()  # arrays from another process may be read-only
        for k, new_id in renamed.items():
            ids[k] = new_id
        columns["structure_id"] = ids
    if len(keep) < len(columns["structure_id"]):
        kept = np.asarray(keep, dtype=np.int64)
        return _take(columns, kept), kept
    return columns, None


class _Duplicates:
    """Exact repeats of earlier records of the same source, as a read goes (internal).

    Keys are the records' sha1 digests as bytes, per source: a few hundred
    bytes per record, held until the source is read to its end (:meth:`forget`).
    """

    def __init__(self) -> None:
        self._first: dict[str, dict[bytes, str]] = {}  # source -> digest -> id first read
        self._ids: dict[str, dict[str, bytes]] = {}  # source -> id -> digest of its first record

    def check(
        self, source: str, structure_id: str, block: str | None, digest: str
    ) -> Rejection | str:
        """A ``duplicate`` rejection, or the id to keep the record under."""
        key = bytes.fromhex(digest)
        first = self._first.setdefault(source, {})
        if key in first:
            return Rejection(
                structure_id,
                source,
                block,
                "duplicate",
                f"same id and identical structure as the record first read as {first[key]!r}"
                f" (block {block} repeats it)",
            )
        first[key] = structure_id
        if self._ids.setdefault(source, {}).setdefault(structure_id, key) != key:
            # same id, different structure: keep it, under an id that says which row
            return f"{structure_id}@{block}"
        return structure_id

    def forget(self, sources: Sequence[str]) -> None:
        """Drop what is known of ``sources``: no record of theirs comes any more."""
        for source in sources:
            self._first.pop(source, None)
            self._ids.pop(source, None)


def _deduplicate(
    result: AnalysedStructure | Rejection, digest: str, duplicates: _Duplicates
) -> AnalysedStructure | Rejection:
    """Turn an exact repeat of an earlier record of the same source into a rejection."""
    if isinstance(result, Rejection):
        source, structure_id, block = result.source, result.id, result.block
    else:
        source, structure_id = result.source, result.structure_id
        block = result.metadata.get("block")
    verdict = duplicates.check(source, structure_id, block, digest)
    if isinstance(verdict, Rejection):
        return verdict
    if verdict == structure_id:
        return result
    if isinstance(result, Rejection):
        return dataclasses.replace(result, id=verdict)
    return dataclasses.replace(result, structure_id=verdict)


def _map_chunks(
    chunks: list[list[_Task]],
    run: Callable[[list[_Task]], Any],
    *,
    scheduler: str | None,
    workers: int | None,
) -> Iterator[Any]:
    """``run`` of every chunk, in order: Dask tasks computed a wave at a time."""
    import dask

    from afpx.scheduler import compute, task_slots, use_scheduler

    task = dask.delayed(run, pure=False)
    with use_scheduler(scheduler, workers=workers) as client:
        per_wave = max(_TASKS_PER_WAVE, 2 * task_slots(client))
        for start in range(0, len(chunks), per_wave):
            wave = chunks[start : start + per_wave]
            yield from compute(*[task(chunk) for chunk in wave])
