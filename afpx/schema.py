"""Names, dtypes and checks shared by every afpx artefact.

This module is the contract between the layers: the cube writer, the training
stream, the likelihood writer, ranking and evaluation all take their dimension
and variable names from here, never from string literals of their own.

The cube is one zarr store opened as an :class:`xarray.Dataset`:

========================  ======================  ==========================================
variable                  dims                    meaning
========================  ======================  ==========================================
``afp``                   site, perspective, bin  fingerprint, float32
``r0``                    site                    nearest-neighbour distance of the site (Å)
``dmin_ratio``            site                    shortest distance in the structure / r0
``coordination``          site                    neighbours within 1.2 × r0
``z``                     site                    atomic number on the site
``multiplicity``          site                    number of equivalent sites in the cell
``wyckoff``               site                    Wyckoff letter
``site_index``            site                    index of the representative atom
``structure``             site                    index into the ``structure`` dimension
``draw``                  site                    augmentation draw (0 .. draws-1)
``structure_id``          structure               id within its source
``formula``               structure               reduced formula
``source``                structure               file path or dataset name
``spacegroup``            structure               international space-group number
``n_unique_sites``        structure               unique sites of the structure
``dmin``                  structure               shortest interatomic distance (Å)
``split``                 structure               ``train`` / ``holdout`` / ``test``
``likelihood``            site, element           sigmoid output, written after training
``reject_id``             reject                  rejected input (path or id)
``reject_reason``         reject                  reason category (see ``REJECT_REASONS``)
``reject_message``        reject                  the reason in words
========================  ======================  ==========================================
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final, TypeVar

import numpy as np

from afpx import AfpxError

if TYPE_CHECKING:
    import xarray as xr

T = TypeVar("T")

# -- dimensions ---------------------------------------------------------------
SITE: Final = "site"
PERSPECTIVE: Final = "perspective"
BIN: Final = "bin"
STRUCTURE: Final = "structure"
ELEMENT: Final = "element"
REJECT: Final = "reject"
ATOM: Final = "atom"  # every atom of every structure's cell, structure-major (template geometry)
VECTOR: Final = "vector"  # lattice vectors a, b, c
AXIS: Final = "axis"  # x, y, z (Cartesian for lattice rows, fractional for atoms)

# -- per-site variables -------------------------------------------------------
AFP: Final = "afp"
R0: Final = "r0"
DMIN_RATIO: Final = "dmin_ratio"
COORDINATION: Final = "coordination"
Z: Final = "z"
MULTIPLICITY: Final = "multiplicity"
WYCKOFF: Final = "wyckoff"
SITE_INDEX: Final = "site_index"
STRUCTURE_INDEX: Final = "structure"  # a variable along ``site`` named like the dim it indexes
DRAW: Final = "draw"
LIKELIHOOD: Final = "likelihood"
LIKELIHOOD_MEAN: Final = "likelihood_mean"  # mean over draws, along ``site`` of draw 0
SOFTMAX_PRED: Final = "softmax_pred"  # predicted Z of the auxiliary softmax classifier

# -- per-structure variables --------------------------------------------------
STRUCTURE_ID: Final = "structure_id"
FORMULA: Final = "formula"
SOURCE: Final = "source"
SPACEGROUP: Final = "spacegroup"
N_UNIQUE_SITES: Final = "n_unique_sites"
DMIN: Final = "dmin"
SPLIT: Final = "split"
LATTICE: Final = "lattice"  # (structure, vector, axis): lattice vectors as rows, Å
N_ATOMS: Final = "n_atoms"  # atoms of the structure's cell along ``atom``

# -- per-atom variables (template geometry, for CIF export) -------------------
ATOM_FRAC_COORDS: Final = "atom_frac_coords"
ATOM_Z: Final = "atom_z"

#: Variables that carry the templates' geometry (``afpx rank --cube --export-cif``).
GEOMETRY_VARIABLES: Final = (LATTICE, N_ATOMS, ATOM_FRAC_COORDS, ATOM_Z)

# -- rejection record ---------------------------------------------------------
REJECT_ID: Final = "reject_id"
REJECT_REASON: Final = "reject_reason"
REJECT_MESSAGE: Final = "reject_message"

# -- coordinates --------------------------------------------------------------
SYMBOL: Final = "symbol"  # element symbol, a coordinate along ``element``

SPLITS: Final = ("train", "holdout", "test")
N_ELEMENTS: Final = 118
N_PERSPECTIVES: Final = 12
N_BINS: Final = 256

#: Every rejection carries one of these categories (and a message in words).
REJECT_REASONS: Final = (
    "parse_error",  # the file or record could not be parsed at all
    "no_atoms",  # parsed, but holds no sites
    "bad_cell",  # zero or negative volume, non-finite lattice
    "r_factor",  # stated R-factor at or above the limit
    "occupancy",  # mixed or partial occupancy
    "unknown_species",  # D, X, vacancies, unstrippable charges, unknown symbols
    "formula_mismatch",  # the atoms read disagree with the stated _chemical_formula_sum
    "short_distance",  # interatomic distance below the limit
    "symmetry",  # symmetry analysis failed
    "duplicate",  # exact duplicate of an earlier record
)

DTYPES: Final[dict[str, np.dtype[np.generic]]] = {
    AFP: np.dtype("float32"),
    R0: np.dtype("float32"),
    DMIN_RATIO: np.dtype("float32"),
    COORDINATION: np.dtype("int16"),
    Z: np.dtype("int16"),
    MULTIPLICITY: np.dtype("int32"),
    SITE_INDEX: np.dtype("int32"),
    STRUCTURE_INDEX: np.dtype("int64"),
    DRAW: np.dtype("int16"),
    LIKELIHOOD: np.dtype("float32"),
    LIKELIHOOD_MEAN: np.dtype("float32"),
    SOFTMAX_PRED: np.dtype("int16"),
    SPACEGROUP: np.dtype("int16"),
    N_UNIQUE_SITES: np.dtype("int32"),
    DMIN: np.dtype("float32"),
    LATTICE: np.dtype("float64"),
    N_ATOMS: np.dtype("int32"),
    ATOM_FRAC_COORDS: np.dtype("float64"),
    ATOM_Z: np.dtype("int16"),
}

#: Default number of sites per zarr chunk (256 streamed ~3x faster than 4096).
DEFAULT_CHUNK_SITES: Final = 256


def element_symbols() -> list[str]:
    """Symbols of elements Z = 1..118, in order."""
    from pymatgen.core.periodic_table import Element

    return [Element.from_Z(z).symbol for z in range(1, N_ELEMENTS + 1)]


def element_coords() -> dict[str, tuple[str, np.ndarray]]:
    """Coordinates of the ``element`` dimension: Z = 1..118 and the symbols."""
    return {
        ELEMENT: (ELEMENT, np.arange(1, N_ELEMENTS + 1, dtype=np.int16)),
        SYMBOL: (ELEMENT, np.asarray(element_symbols(), dtype=object)),
    }


def require_variables(ds: xr.Dataset, names: Iterable[str], *, what: str, fix: str) -> None:
    """Raise :class:`AfpxError` naming the missing variables and the fix.

    Parameters
    ----------
    ds : xarray.Dataset
        The cube (or any afpx artefact).
    names : iterable of str
        Variables that must be present.
    what : str
        What the caller wanted to do, for the message.
    fix : str
        The command or step that creates the missing variables.
    """
    missing = [n for n in names if n not in ds.variables]
    if missing:
        raise AfpxError(f"{what} needs {', '.join(missing)}, which the cube lacks; {fix}")


def check_cube(ds: xr.Dataset) -> None:
    """Check the dimensions, sizes and dtypes of a cube; raise :class:`AfpxError`."""
    require_variables(
        ds,
        [AFP, R0, DMIN_RATIO, Z, MULTIPLICITY, STRUCTURE_INDEX, STRUCTURE_ID],
        what="an afpx cube",
        fix="build it with `afpx build-cube`",
    )
    if ds[AFP].dims != (SITE, PERSPECTIVE, BIN):
        raise AfpxError(f"`afp` has dims {ds[AFP].dims}, expected ({SITE}, {PERSPECTIVE}, {BIN})")
    for name, dtype in DTYPES.items():
        if name in ds.variables and ds[name].dtype != dtype:
            raise AfpxError(f"`{name}` has dtype {ds[name].dtype}, expected {dtype}")


def config_from_dict(cls: type[T], d: Mapping[str, Any], *, what: str) -> T:
    """Build the frozen dataclass ``cls`` from a JSON-like dict, checking names and types.

    Every value must have the type of the field's default (an int is accepted
    for a float field, a list for a tuple field, None where the default is
    None or the annotation allows it). A wrong name or type raises
    :class:`afpx.AfpxError` naming the key, the value and what was expected,
    before anything is computed or written.
    """
    import dataclasses
    import typing

    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise AfpxError(f"unknown {what} keys: {', '.join(unknown)}")
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for key, value in d.items():
        default = fields[key].default
        optional = "None" in str(hints.get(key, ""))
        if value is None and (default is None or optional):
            out[key] = None
            continue
        expected = type(default) if default is not None else None
        if expected is None:  # None default: take the annotation's other type
            text = str(hints.get(key, ""))
            expected = int if "int" in text else float if "float" in text else None
        ok: bool
        if expected is bool:
            ok = isinstance(value, bool)
        elif expected is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            value = float(value) if ok else value
        elif expected is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif expected is tuple:
            ok = isinstance(value, list | tuple)
            value = tuple(value) if ok else value
        elif expected is str:
            ok = isinstance(value, str)
        else:
            ok = True
        if not ok:
            name = expected.__name__ if expected is not None else "a value"
            raise AfpxError(f"{what} key {key!r} must be {name}, got {value!r}")
        out[key] = value
    return cls(**out)
