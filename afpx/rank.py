"""Composition ranking for an element set, and export of candidates as CIFs.

:func:`rank` is the whole path behind ``afpx rank``: load a template library
(a cube's, or the built-in default), enumerate the best candidate of every
(template, composition) exactly (:func:`afpx.templates.best_candidates`),
keep the best candidate of each reduced composition, rank the compositions,
and attach the template and site assignment behind each row.

Ties
----
Many compositions tie (identical templates, equal likelihoods). Scores whose
log-likelihoods differ by at most ``tie_tolerance`` × max(1, |score|) (chained
in sorted order) are tied. Each composition gets

* ``rank`` — the mid-rank, 1 + (number better) + (number tied with it) / 2;
* ``rank_optimistic`` — 1 + (number better);
* ``rank_pessimistic`` — (number better) + (size of its tie group).

Rows are listed by score; within a tie group they are listed by formula, for
display only — the ranks above never depend on that order, nor on the order of
the input. When ``top`` cuts through a tie group, the cut follows the same
display order (the ranks of the rows shown still count the whole group).
"""

from __future__ import annotations

import itertools
import math
import os
import sys
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from afpx import AfpxError, AfpxWarning, schema
from afpx.templates import (
    ASSIGNMENT,
    LOG_SCORE,
    REDUCED_COUNTS,
    TEMPLATE,
    TEMPLATE_FORMULA,
    TEMPLATE_N_SITES,
    TEMPLATE_SITE,
    TEMPLATE_SOURCE,
    TEMPLATE_SPACEGROUP,
    TEMPLATE_STRUCTURE_ID,
    CandidateOptions,
    TemplateLibrary,
    best_assignments,
    candidates,
    check_elements,
    composition_index,
    element_symbol,
    element_symbols,
    reduce_compositions,
    reduced_formulas,
)
from afpx.templates.pruning import top_candidates
from afpx.templates.ties import DEFAULT_TIE_TOLERANCE, TIE_RULE, tie_ranks
from afpx.templates.util import index_ranges

if TYPE_CHECKING:
    import pandas as pd
    import xarray as xr

__all__ = [
    "DEFAULT_TIE_TOLERANCE",
    "RankTable",
    "candidate_structure",
    "export_cifs",
    "parse_elements",
    "parse_formula",
    "rank",
    "rank_compositions",
    "rank_formula",
    "rank_rows",
    "rank_table",
    "tie_ranks",
]

# -- names of the ranking dataset ---------------------------------------------
COMPOSITION: Final = "composition"  # dim: one row per reduced composition
SCORE: Final = "score"
RANK: Final = "rank"
RANK_OPTIMISTIC: Final = "rank_optimistic"
RANK_PESSIMISTIC: Final = "rank_pessimistic"
N_TIED: Final = "n_tied"
N_TEMPLATES: Final = "n_templates"
N_BEST_TEMPLATES: Final = "n_best_templates"
CANDIDATE_COUNTS: Final = "candidate_counts"  # counts in the template's cell
ASSIGNMENT_TEXT: Final = "assignment_text"
KNOWN: Final = "known"


# =============================================================================
# ranking
# =============================================================================
def rank_compositions(
    candidates: xr.Dataset,
    *,
    top: int | None = None,
    tie_tolerance: float = DEFAULT_TIE_TOLERANCE,
) -> xr.Dataset:
    """One row per reduced composition: its best candidate, ranked.

    Parameters
    ----------
    candidates : xarray.Dataset
        Output of :func:`afpx.templates.best_candidates`.
    top : int, optional
        Keep the first ``top`` rows (ranks are computed over all rows).
    tie_tolerance : float
        See :func:`afpx.templates.tie_ranks`.

    Returns
    -------
    xarray.Dataset
        dims ``composition`` (rows, best first), ``element``,
        ``template_site``. Variables: ``formula``, ``counts`` (reduced),
        ``score`` = exp(``log_score``), ``log_score``, ``rank``,
        ``rank_optimistic``, ``rank_pessimistic``, ``n_tied``,
        ``template`` (library index of the best candidate's template; the
        lowest index when several templates tie), ``candidate_counts`` (its
        counts in the template's cell), ``structure_id``,
        ``template_formula``, ``spacegroup``, ``source``, ``n_template_sites``,
        ``n_templates`` (templates producing the composition),
        ``n_best_templates`` (templates tying for its best score), and
        ``assignment`` when the candidates carry it. attrs: ``n_compositions``
        (before ``top``), ``n_candidates``, ``tie_rule``.
    """
    from afpx.templates import COUNTS

    template = np.asarray(candidates[TEMPLATE].values, dtype=np.int64)
    reduced = np.asarray(candidates[REDUCED_COUNTS].values, dtype=np.int64)
    cell = np.asarray(candidates[COUNTS].values, dtype=np.int64)
    log_score = np.asarray(candidates[LOG_SCORE].values, dtype=np.float64)
    inverse, unique = composition_index(reduced)
    symbols = [str(s) for s in candidates[schema.SYMBOL].values]
    rows = rank_rows(
        template, inverse, unique, log_score, symbols, top=top, tie_tolerance=tie_tolerance
    )
    assignment = None
    if ASSIGNMENT in candidates:
        assignment = np.asarray(candidates[ASSIGNMENT].values)[rows["row"]]
    provenance = {
        "structure_id": np.asarray(candidates[TEMPLATE_STRUCTURE_ID].values),
        "formula": np.asarray(candidates[TEMPLATE_FORMULA].values),
        "spacegroup": np.asarray(candidates[TEMPLATE_SPACEGROUP].values),
        "source": np.asarray(candidates[TEMPLATE_SOURCE].values),
        "n_sites": np.asarray(candidates[TEMPLATE_N_SITES].values),
    }
    ds = _ranking_dataset(
        rows,
        cell_counts=cell[rows["row"]],
        provenance=provenance,
        elements=np.asarray(candidates[schema.ELEMENT].values),
        symbols=symbols,
        assignment=assignment,
    )
    ds.attrs.update(
        {
            "n_candidates": int(template.size),
            "tie_rule": TIE_RULE.format(tol=tie_tolerance),
            "tie_tolerance": float(tie_tolerance),
        }
    )
    for key in ("n_candidates_bruteforce", "n_dp_updates", "n_templates", "options"):
        if key in candidates.attrs:
            ds.attrs[key] = candidates.attrs[key]
    return ds


def rank_rows(
    template: np.ndarray,
    inverse: np.ndarray,
    unique: np.ndarray,
    log_score: np.ndarray,
    symbols: Sequence[str],
    *,
    top: int | None,
    tie_tolerance: float,
) -> dict[str, np.ndarray]:
    """Best candidate per composition and the ranked, cut rows (arrays).

    ``inverse``/``unique`` group the candidates by reduced composition
    (:func:`~afpx.templates.reduce_compositions`); the ranks follow
    :func:`~afpx.templates.tie_ranks`.
    """
    U = unique.shape[0]
    if top is not None and top < 1:
        raise AfpxError(f"top must be at least 1, got {top}")
    best = np.full(U, -np.inf)
    np.maximum.at(best, inverse, log_score)
    hit = np.flatnonzero(log_score == best[inverse])
    n_best = np.bincount(inverse[hit], minlength=U)
    # of the templates tying for the best score, show the lowest library index
    first_t = np.full(U, np.iinfo(np.int64).max)
    np.minimum.at(first_t, inverse[hit], template[hit])
    chosen = hit[template[hit] == first_t[inverse[hit]]]
    row = np.empty(U, dtype=np.int64)
    row[inverse[chosen]] = chosen
    rank, optimistic, pessimistic, group = tie_ranks(best, tolerance=tie_tolerance)
    # display order: by score group, then by formula within a group
    order = np.argsort(group, kind="stable")
    if top is not None and top < U:
        last = int(group[order[top - 1]])
        order = order[group[order] <= last]
    formulas = reduced_formulas(unique[order], symbols)
    by_formula = _by_formula_within_groups(group[order], formulas)
    order, formulas = order[by_formula], formulas[by_formula]
    if top is not None:
        order, formulas = order[:top], formulas[:top]
    return {
        "composition": order,
        "row": row[order],
        "template": template[row[order]],
        "formula": formulas,
        "counts": unique[order],
        "log_score": best[order],
        "rank": rank[order],
        "rank_optimistic": optimistic[order],
        "rank_pessimistic": pessimistic[order],
        "n_tied": (pessimistic - optimistic + 1)[order],
        "n_templates": np.bincount(inverse, minlength=U)[order],
        "n_best_templates": n_best[order],
        "n_compositions": np.asarray(U),
    }


def _by_formula_within_groups(group: np.ndarray, formulas: np.ndarray) -> np.ndarray:
    """The permutation listing rows sorted by ``group`` (non-decreasing) by formula within a group.

    Only rows of tie groups of two or more move: a string sort of those alone,
    equal to ``np.lexsort((formulas.astype(str), group))``.
    """
    perm = np.arange(group.size)
    if group.size == 0:
        return perm
    first = np.r_[True, group[1:] != group[:-1]]
    size = np.diff(np.r_[np.flatnonzero(first), group.size])
    tied = np.flatnonzero(np.repeat(size > 1, size))
    if tied.size:
        rows = zip(group[tied].tolist(), formulas[tied].tolist(), tied.tolist(), strict=True)
        keyed = sorted(rows)
        perm[tied] = [row for _, _, row in keyed]
    return perm


def _ranking_vars(
    rows: dict[str, np.ndarray],
    *,
    cell_counts: np.ndarray,
    provenance: dict[str, np.ndarray],
    assignment: np.ndarray | None,
) -> dict[str, tuple[tuple[str, ...], np.ndarray]]:
    """The variables of a ranking, ``name -> (dims, values)``, in dataset order."""
    t = rows["template"]
    C = (COMPOSITION,)
    CE = (COMPOSITION, schema.ELEMENT)
    out: dict[str, tuple[tuple[str, ...], np.ndarray]] = {
        schema.FORMULA: (C, rows["formula"].astype(object)),
        "counts": (CE, rows["counts"]),
        SCORE: (C, np.exp(rows["log_score"])),
        LOG_SCORE: (C, rows["log_score"]),
        RANK: (C, rows["rank"]),
        RANK_OPTIMISTIC: (C, rows["rank_optimistic"]),
        RANK_PESSIMISTIC: (C, rows["rank_pessimistic"]),
        N_TIED: (C, rows["n_tied"]),
        TEMPLATE: (C, t),
        CANDIDATE_COUNTS: (CE, cell_counts),
        schema.STRUCTURE_ID: (C, provenance["structure_id"][t].astype(object)),
        TEMPLATE_FORMULA: (C, provenance["formula"][t].astype(object)),
        schema.SPACEGROUP: (C, provenance["spacegroup"][t].astype(np.int64)),
        schema.SOURCE: (C, provenance["source"][t].astype(object)),
        "n_template_sites": (C, provenance["n_sites"][t].astype(np.int64)),
        N_TEMPLATES: (C, rows["n_templates"]),
        N_BEST_TEMPLATES: (C, rows["n_best_templates"]),
    }
    if assignment is not None:
        width = int(provenance["n_sites"][t].max()) if t.size else 0
        out[ASSIGNMENT] = ((COMPOSITION, TEMPLATE_SITE), assignment[:, :width])
    return out


#: Columns of :func:`to_frame` and of the CSV/JSON output, in order (when present).
FRAME_COLUMNS: Final = (
    RANK,
    RANK_OPTIMISTIC,
    RANK_PESSIMISTIC,
    schema.FORMULA,
    SCORE,
    LOG_SCORE,
    schema.STRUCTURE_ID,
    TEMPLATE_FORMULA,
    schema.SPACEGROUP,
    schema.SOURCE,
    ASSIGNMENT_TEXT,
    KNOWN,
    N_TIED,
    N_TEMPLATES,
    N_BEST_TEMPLATES,
    TEMPLATE,
)


@dataclass
class RankTable:
    """A ranking as plain numpy arrays: what :func:`rank` returns, before xarray.

    The command line renders it directly (no xarray or pandas import);
    :meth:`to_dataset` and :meth:`to_frame` give the labelled forms.

    Attributes
    ----------
    elements : list of int
        Atomic numbers, in the order of the ``element`` dimension.
    symbols : list of str
    variables : dict
        ``name -> (dims, values)``, as in the dataset.
    attrs : dict
    """

    elements: list[int]
    symbols: list[str]
    variables: dict[str, tuple[tuple[str, ...], np.ndarray]]
    attrs: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.variables[RANK][1].shape[0])

    def columns(self) -> dict[str, np.ndarray]:
        """The one-value-per-row variables of :data:`FRAME_COLUMNS`, in order."""
        return {n: self.variables[n][1] for n in FRAME_COLUMNS if n in self.variables}

    def to_dataset(self) -> xr.Dataset:
        """The ranking as an :class:`xarray.Dataset` (see :func:`rank_compositions`)."""
        import xarray as xr

        coords = {
            schema.ELEMENT: (schema.ELEMENT, np.asarray(self.elements, dtype=np.int16)),
            schema.SYMBOL: (schema.ELEMENT, np.asarray(list(self.symbols), dtype=object)),
        }
        ds = xr.Dataset(dict(self.variables.items()), coords=coords)
        ds.attrs.update(self.attrs)
        return ds

    def to_frame(self) -> pd.DataFrame:
        """The ranking as a :class:`pandas.DataFrame`, one row per composition."""
        import pandas as pd

        return pd.DataFrame(self.columns())

    def _text_columns(self) -> dict[str, np.ndarray]:
        """:meth:`columns`, checked to hold one value per row (for the writers)."""
        cols = self.columns()
        for name, values in cols.items():
            if values.shape[:1] != (len(self),):
                raise AfpxError(
                    f"column {name!r} has shape {values.shape} in a table of {len(self)} rows; "
                    "give every column of a RankTable one value per row"
                )
        return cols

    def json_rows(self) -> list[str]:
        """Each row as compact JSON, exactly as ``json.JSONEncoder().encode(dict(row))``.

        Encoded column by column (see :meth:`json_text`).
        """
        if len(self) == 0:
            return []
        # ASCII JSON never holds a raw line break, so the rows split back apart
        return self.json_text("\n").split("\n")

    def json_text(self, separator: str = ",\n") -> str:
        """The rows of :meth:`json_rows` joined by ``separator``, built in one join.

        Every column is encoded at once (the per-row encoder was a third of a
        full ternary list's time); the rows are then one interleaving of keys
        and values, with no Python work per row. Numpy scalars left in object
        columns are written as their Python value, other objects as their
        ``str``.
        """
        from json.encoder import encode_basestring_ascii

        cols = self._text_columns()
        lead = "{"
        pieces: list[tuple[str, list[str]]] = []
        for name, values in cols.items():
            lead += encode_basestring_ascii(name) + ": "
            plain = _plain_json_strings(values)
            if plain is None:
                pieces.append((lead, _json_values(values)))
                lead = ", "
            else:
                # nothing to escape: the quotes go into the texts around the values
                pieces.append((lead + '"', plain))
                lead = '", '
        close = lead[:-2] + "}"  # '"}' after a plain string column, else '}'
        return _interleave(pieces, close + separator, len(self), last=close)

    def to_csv(self) -> str:
        """The rows as CSV with a header, exactly as :func:`csv.writer` (``\\n`` line ends)."""
        cols = self._text_columns()
        header = ",".join(_csv_field(str(n)) for n in cols) + "\n"
        pieces = [("," if i else "", _csv_values(v)) for i, v in enumerate(cols.values())]
        return header + _interleave(pieces, "\n", len(self))


def _interleave(
    pieces: Sequence[tuple[str, list[str]]], end: str, n: int, *, last: str | None = None
) -> str:
    """Row ``i`` is ``lead_1 + values_1[i] + lead_2 + values_2[i] + ... + end``, all rows joined.

    The last row ends with ``last`` when given. One flat list filled by
    strided slice assignments and one ``str.join``: C loops only, whatever
    the number of rows.
    """
    if n == 0 or not pieces:
        return ""
    stride = 2 * len(pieces) + 1
    flat: list[str] = [end] * (n * stride)
    for j, (lead, values) in enumerate(pieces):
        flat[2 * j :: stride] = [lead] * n
        flat[2 * j + 1 :: stride] = values
    if last is not None:
        flat[-1] = last
    return "".join(flat)


def _int_texts(values: np.ndarray) -> list[str]:
    """Decimal text of an integer column; small non-negative values from a table of texts."""
    if values.size == 0:
        return []
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= values.size // 2:
        return list(map(int.__repr__, values.tolist()))
    # counts, space groups, template indices: fewer distinct texts than rows
    texts = np.asarray(list(map(str, range(high + 1))), dtype=object)
    return list(texts[values].tolist())


def _plain_json_strings(values: np.ndarray) -> list[str] | None:
    """The items of a column of strings that JSON writes unescaped, else None.

    The JSON encoder (ASCII mode) escapes quotes, backslashes and anything
    outside ``" "..."~"``; a few scans of the joined texts decide for the whole
    column, so that the writer adds the quotes around each value without
    any work per row.
    """
    if values.dtype.kind not in "OTU" or values.size == 0:
        return None
    items = values.tolist()
    if not set(map(type, items)) <= {str}:
        return None
    joined = "".join(items)
    # printable ASCII (isprintable is False for the control characters and DEL)
    if not (joined.isascii() and joined.isprintable()) or '"' in joined or "\\" in joined:
        return None
    return items


def _json_values(values: np.ndarray) -> list[str]:
    """JSON text of every value of a column (what the C encoder writes for each)."""
    import json

    kind = values.dtype.kind
    if kind == "b":
        return ["true" if v else "false" for v in values.tolist()]
    if kind in "iu":
        return _int_texts(values)
    if kind == "f" and np.isfinite(values).all():
        return list(map(float.__repr__, values.tolist()))
    items = values.tolist()
    kinds = set(map(type, items))
    if kinds <= {str}:
        from json.encoder import encode_basestring_ascii

        return list(map(encode_basestring_ascii, items))
    if kinds <= {int}:
        return list(map(int.__repr__, items))

    def plain(value: Any) -> Any:
        item = getattr(value, "item", None)
        return item() if callable(item) else str(value)

    encode = json.JSONEncoder(default=plain).encode
    return [encode(v) for v in items]


_CSV_SPECIAL: Final = frozenset(',"\r\n')


def _csv_field(text: str) -> str:
    if _CSV_SPECIAL.isdisjoint(text):
        return text
    return '"' + text.replace('"', '""') + '"'


def _csv_values(values: np.ndarray) -> list[str]:
    """CSV fields of a column as :func:`csv.writer` writes them (minimal quoting)."""
    if values.dtype.kind in "iu":
        return _int_texts(values)
    if values.dtype.kind in "bf":
        return list(map(str, values.tolist()))
    items = values.tolist()
    kinds = set(map(type, items))
    if kinds <= {int} or kinds <= {float} or kinds <= {bool}:
        return list(map(str, items))
    if kinds <= {str}:
        joined = "".join(items)
        if _CSV_SPECIAL.isdisjoint(joined):
            return items  # nothing to quote: no work per field
        if '"' not in joined and "\r" not in joined and "\n" not in joined:
            # only commas (assignment texts): quote the fields holding one, nothing to escape
            return [f'"{v}"' if "," in v else v for v in items]
    return [_csv_field("" if v is None else str(v)) for v in items]


def _table_variables(
    lib: TemplateLibrary,
    rows: dict[str, Any],
    cell: np.ndarray,
    assignment: np.ndarray,
    symbols: Sequence[str],
) -> dict[str, Any]:
    """Ranking variables of ``rows``, with template provenance and the assignment text."""
    provenance = {
        "structure_id": lib.structure_id,
        "formula": lib.formula,
        "spacegroup": lib.spacegroup,
        "source": lib.source,
        "n_sites": lib.n_unique_sites,
    }
    variables = _ranking_vars(rows, cell_counts=cell, provenance=provenance, assignment=assignment)
    variables[ASSIGNMENT_TEXT] = (
        (COMPOSITION,),
        _assignment_text(lib, rows["template"], assignment, symbols),
    )
    return variables


def _ranking_dataset(
    rows: dict[str, np.ndarray],
    *,
    cell_counts: np.ndarray,
    provenance: dict[str, np.ndarray],
    elements: np.ndarray,
    symbols: Sequence[str],
    assignment: np.ndarray | None,
) -> xr.Dataset:
    variables = _ranking_vars(
        rows, cell_counts=cell_counts, provenance=provenance, assignment=assignment
    )
    attrs = {"n_compositions": int(rows["n_compositions"]), "elements": list(symbols)}
    table = RankTable([int(z) for z in elements], list(symbols), variables, attrs)
    return table.to_dataset()


# =============================================================================
# the whole path
# =============================================================================
def parse_elements(elements: str | Sequence[str | int]) -> list[int]:
    """Atomic numbers of an element set given as symbols (``"Li,Mn,Ge"`` or a list).

    Raises :class:`AfpxError` for an unknown symbol, a repeated element or
    fewer than two elements.
    """
    items: list[str | int]
    if isinstance(elements, str):
        if "," in elements and any(not part.strip() for part in elements.split(",")):
            raise AfpxError(
                f"empty element in {elements!r}: separate symbols by single commas, "
                "e.g. --elements Li,Mn,Ge"
            )
        items = [e.strip() for e in elements.replace(" ", ",").split(",") if e.strip()]
    else:
        items = list(elements)
    symbols = element_symbols()
    lookup = {s.lower(): i + 1 for i, s in enumerate(symbols)}
    zs: list[int] = []
    for item in items:
        if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            z = int(item)
            if not 1 <= z <= schema.N_ELEMENTS:
                raise AfpxError(f"atomic number {z} is not in 1..{schema.N_ELEMENTS}")
        else:
            name = str(item).strip()
            found = lookup.get(name.lower())
            if found is None:
                raise AfpxError(f"unknown element symbol {name!r}")
            z = found
        if z in zs:
            raise AfpxError(f"element {symbols[z - 1]} is repeated in the element set")
        zs.append(z)
    if len(zs) < 2:
        raise AfpxError(f"give at least two elements (got {len(zs)}), e.g. --elements Mn,Ge")
    return zs


def load_library(cube: str | os.PathLike[str] | None = None) -> TemplateLibrary:
    """The template library of a cube, or the built-in default when ``cube`` is None."""
    if cube is None:
        from afpx.default import load_default_library

        return load_default_library()
    import dataclasses

    from afpx.cube import open_cube, structure_geometry
    from afpx.templates import TemplateGeometry

    path = os.fspath(cube)  # a local path or a URL (not a Path: it would mangle "s3://")
    ds = open_cube(path)
    if schema.LIKELIHOOD not in ds.variables and schema.LIKELIHOOD_MEAN not in ds.variables:
        raise AfpxError(
            f"cube {path!r} has no likelihoods; write them with "
            f"`afpx likelihood {path} --model MODEL`"
        )
    lib = TemplateLibrary.from_cube(ds)
    lib.attrs["cube"] = path
    geometry = structure_geometry(ds)  # stored by build-cube, for CIF export
    if geometry is not None:
        lib = dataclasses.replace(lib, geometry=TemplateGeometry(**geometry))
    return lib


def _candidate_options(lib: TemplateLibrary, k: int, options: dict[str, Any]) -> CandidateOptions:
    """Check the ranking options against the library; :class:`AfpxError` when unusable."""
    unknown = set(options) - set(CandidateOptions.__dataclass_fields__)
    if unknown:
        raise AfpxError(f"unknown ranking option(s): {', '.join(sorted(unknown))}")
    for key in ("exclude_formulas", "sources"):
        if options.get(key) is not None:
            options[key] = tuple(options[key])
    opts = CandidateOptions(**options)
    sizes = lib.n_unique_sites
    if opts.max_unique_sites is not None:
        sizes = sizes[sizes <= opts.max_unique_sites]
    most = int(sizes.max()) if sizes.size else 0
    if k > most:
        raise AfpxError(
            f"{k} elements need a template with at least {k} unique sites; the most "
            f"any template has is {most}"
        )
    return opts


def parse_formula(formula: str) -> tuple[list[int], np.ndarray]:
    """Atomic numbers and reduced integer counts of a formula such as ``"Li2MnGe"``.

    Raises :class:`AfpxError` for a formula pymatgen cannot read, fractional
    amounts or fewer than two elements.
    """
    import re

    from pymatgen.core import Composition

    # pymatgen drops an element with amount 0 ("Li2Mn0Ge" reads as Li2Ge): refuse it
    for symbol, amount in re.findall(r"([A-Z][a-z]?)(\d*\.?\d+)", formula):
        if float(amount) == 0:
            raise AfpxError(
                f"formula {formula!r} gives {symbol} the amount {amount}; "
                "drop the element or give it a positive amount, e.g. Li2MnGe"
            )
    # pymatgen reads an unknown symbol as a dummy species ("Q" -> Q0+) or fails on
    # it with its own words: name it as written
    known = set(element_symbols())
    unknown = sorted({sym for sym in re.findall(r"[A-Z][a-z]?", formula) if sym not in known})
    if unknown:
        raise AfpxError(
            f"cannot read formula {formula!r}: unknown element symbol(s) {', '.join(unknown)}; "
            "write elements as symbols with amounts, e.g. Li2MnGe"
        )
    try:
        comp = Composition(formula)
    except Exception as exc:  # pymatgen raises several types for bad formulas
        raise AfpxError(f"cannot read formula {formula!r}: {exc}") from exc
    if not comp.elements:
        raise AfpxError(f"formula {formula!r} names no element; write e.g. Li2MnGe")
    amounts = [float(a) for a in comp.values()]
    if any(a <= 0 or abs(a - round(a)) > 1e-8 for a in amounts):
        raise AfpxError(f"formula {formula!r} must have whole, positive amounts, e.g. Li2MnGe")
    zs = [int(el.Z) for el in comp.elements]
    if len(zs) < 2:
        raise AfpxError(f"give a formula of at least two elements (got {formula!r}), e.g. Li2MnGe")
    counts = np.asarray([round(a) for a in amounts], dtype=np.int64)
    return zs, counts // np.gcd.reduce(counts)


def rank_formula(
    formula: str,
    *,
    cube: str | os.PathLike[str] | None = None,
    library: TemplateLibrary | None = None,
    top: int | None = 20,
    tie_tolerance: float = DEFAULT_TIE_TOLERANCE,
    **options: Any,
) -> RankTable:
    """The best candidate structures of one composition: template, assignment, score.

    Every template that can take the composition contributes its best
    candidate (exact, over every assignment, as in :func:`rank`); rows are
    ranked by score with the one tie rule (:func:`afpx.templates.tie_ranks`),
    tied rows listed by template index.

    Parameters
    ----------
    formula : str
        A composition, e.g. ``"Li2MnGe"`` (reduced by the gcd of its amounts).
    cube, library, top, tie_tolerance, **options
        As in :func:`rank`.

    Returns
    -------
    RankTable
        One row per template (``composition`` dimension), the variables of
        :func:`rank`; ``n_templates`` counts every template yielding the
        composition, ``n_best_templates`` those tied with the row.
    """
    zs, target = parse_formula(formula)
    lib = library if library is not None else load_library(cube)
    if top is not None and top < 1:
        raise AfpxError(f"top must be at least 1, got {top}")
    opts = _candidate_options(lib, len(zs), options)
    result, selected = candidates(lib, check_elements(zs), opts, assignments=False)
    inverse, unique = reduce_compositions(result.counts)
    symbols = [element_symbol(z) for z in zs]
    name = str(reduced_formulas(target[None, :], symbols)[0])
    hit = np.flatnonzero((unique == target[None, :]).all(axis=1))
    if hit.size == 0:
        raise AfpxError(
            f"no template of the library can take the composition {name} "
            f"(options {opts.to_attrs()})"
        )
    cand = np.flatnonzero(inverse == hit[0])
    ties = tie_ranks(result.log_score[cand], tolerance=tie_tolerance)
    order = np.lexsort((result.template[cand], ties.group))
    if top is not None:
        order = order[:top]
    sel = cand[order]
    n = sel.size
    rows: dict[str, np.ndarray] = {
        "row": sel,
        "template": result.template[sel],
        "formula": np.full(n, name, dtype=object),
        "counts": np.repeat(target[None, :], n, axis=0),
        "log_score": result.log_score[sel],
        "rank": ties.rank[order],
        "rank_optimistic": ties.optimistic[order],
        "rank_pessimistic": ties.pessimistic[order],
        "n_tied": (ties.pessimistic - ties.optimistic + 1)[order],
        "n_templates": np.full(n, cand.size, dtype=np.int64),
        "n_best_templates": (ties.pessimistic - ties.optimistic + 1)[order],
        "n_compositions": np.asarray(cand.size),
    }
    cell = result.cell_counts(lib, sel)
    assignment, _ = best_assignments(
        lib, zs, rows["template"], cell, min_site_likelihood=opts.min_site_likelihood
    )
    variables = _table_variables(lib, rows, cell, assignment, symbols)
    return RankTable(
        list(zs),
        symbols,
        variables,
        {
            "n_compositions": int(cand.size),
            "elements": list(symbols),
            "formula": name,
            "n_candidates": int(cand.size),
            "n_templates": int(selected.size),
            "tie_rule": TIE_RULE.format(tol=tie_tolerance),
            "tie_tolerance": float(tie_tolerance),
            "options": opts.to_attrs(),
            "library": _library_label(lib),
        },
    )


def rank_table(
    elements: str | Sequence[str | int],
    *,
    cube: str | os.PathLike[str] | None = None,
    library: TemplateLibrary | None = None,
    top: int | None = 20,
    known: bool = False,
    tie_tolerance: float = DEFAULT_TIE_TOLERANCE,
    prune: bool = True,
    **options: Any,
) -> RankTable:
    """:func:`rank` as plain arrays (:class:`RankTable`); imports neither xarray nor pandas.

    With ``top``, only the templates whose upper bound can reach the rows
    asked for are enumerated (:func:`afpx.templates.pruning.top_candidates`);
    the number of compositions, ``n_templates`` and every rank shown stay
    exact. ``prune=False`` enumerates every template (the same table; for
    comparison). Safe to call from several threads on one library.
    """
    zs = parse_elements(elements)
    lib = library if library is not None else load_library(cube)
    opts = _candidate_options(lib, len(zs), options)
    za = check_elements(zs)
    unseen = untrained_elements(lib, zs)
    if unseen:
        import warnings

        warnings.warn(
            AfpxWarning(
                f"{', '.join(unseen)}: no site of the library's training split carries "
                f"{'it' if len(unseen) == 1 else 'them'}, so the model never learned where "
                f"{'it goes' if len(unseen) == 1 else 'they go'}; read rows with "
                f"{'it' if len(unseen) == 1 else 'them'} as guesses"
            ),
            stacklevel=2,
        )
    if top is not None and top < 1:
        raise AfpxError(f"top must be at least 1, got {top}")
    pruned = None
    if prune and top is not None:
        pruned = top_candidates(lib, za, opts, top=top, tie_tolerance=tie_tolerance)
    if pruned is not None:
        result, selected = pruned.result, pruned.selected
    else:
        # the full list: keep the programme's tables, backtrack the rows shown from them
        result, selected = candidates(lib, za, opts, assignments=False, keep_tables=top is None)
    if result.template.size == 0:
        raise AfpxError(
            f"no candidate uses every element: no template passes the options ({opts.to_attrs()})"
        )
    inverse, unique = reduce_compositions(result.counts)
    symbols = [element_symbol(z) for z in zs]
    rows = rank_rows(
        result.template,
        inverse,
        unique,
        result.log_score,
        symbols,
        top=top,
        tie_tolerance=tie_tolerance,
    )
    n_candidates = int(result.template.size)
    if pruned is not None:
        # the rows' ranks are exact; counts over templates not enumerated come from the census
        rows["n_templates"] = pruned.n_templates(rows["counts"])
        rows["n_compositions"] = np.asarray(pruned.n_compositions)
        n_candidates = pruned.n_candidates
    cell = result.cell_counts(lib, rows["row"])
    if result.deferred is not None:
        width = int(lib.n_unique_sites[rows["template"]].max())
        assignment = result.deferred(rows["row"], width)
    else:
        assignment, score_again = best_assignments(
            lib, zs, rows["template"], cell, min_site_likelihood=opts.min_site_likelihood
        )
        if not np.allclose(score_again, rows["log_score"], rtol=0, atol=1e-9):  # pragma: no cover
            raise AssertionError("re-enumerated assignments do not reproduce the scores")
    variables = _table_variables(lib, rows, cell, assignment, symbols)
    if known:
        known_rows = lib.known_compositions(zs)
        variables[KNOWN] = ((COMPOSITION,), _rows_in(rows["counts"], known_rows))
    return RankTable(
        list(zs),
        symbols,
        variables,
        {
            "n_compositions": int(rows["n_compositions"]),
            "elements": list(symbols),
            "n_candidates": n_candidates,
            "n_templates": int(selected.size),
            "n_templates_enumerated": int(selected.size if pruned is None else pruned.enumerated),
            "n_candidates_bruteforce": int(result.n_bruteforce),
            "n_dp_updates": int(result.n_dp_updates),
            "tie_rule": TIE_RULE.format(tol=tie_tolerance),
            "tie_tolerance": float(tie_tolerance),
            "options": opts.to_attrs(),
            "library": _library_label(lib),
            "untrained_elements": unseen,
        },
    )


def untrained_elements(lib: TemplateLibrary, zs: Sequence[int]) -> list[str]:
    """Symbols of the elements of ``zs`` on no site of the library's training split.

    A library without a split (built from a cube without one) counts every
    site as training data.
    """
    site_split = None if lib.split is None else np.asarray(lib.split).astype(str)[lib.site_template]
    train_z = lib.z if site_split is None else lib.z[site_split == "train"]
    seen = np.zeros(max(int(lib.z.max(initial=0)), max(zs, default=0)) + 1, bool)
    seen[np.asarray(train_z, dtype=np.int64)] = True
    return [element_symbol(z) for z in zs if not seen[z]]


def rank(
    elements: str | Sequence[str | int],
    *,
    cube: str | os.PathLike[str] | None = None,
    library: TemplateLibrary | None = None,
    top: int | None = 20,
    known: bool = False,
    as_frame: bool = False,
    tie_tolerance: float = DEFAULT_TIE_TOLERANCE,
    **options: Any,
) -> xr.Dataset | pd.DataFrame:
    """Rank the compositions an element set can take in the known templates.

    Parameters
    ----------
    elements : str or sequence of str
        Element symbols, e.g. ``"Li,Mn,Ge"`` or ``["Mn", "Ge"]`` (at least two).
    cube : path, optional
        A cube with likelihoods; without it (and without ``library``) the
        built-in default library is used.
    library : TemplateLibrary, optional
        A library already in memory (takes precedence over ``cube``).
    top : int or None
        Rows to return (None: all compositions).
    known : bool
        Add ``known``: whether the composition is one of the library's
        structures.
    as_frame : bool
        Return a :class:`pandas.DataFrame` with the same columns (counts and
        assignment as text) instead of a Dataset.
    tie_tolerance : float
        See :func:`afpx.templates.tie_ranks`.
    **options
        ``exclude_formulas``, ``exclude_own_formula``, ``max_unique_sites``,
        ``sources``, ``min_likelihood``, ``min_site_likelihood``
        (see :class:`afpx.templates.CandidateOptions`).

    Returns
    -------
    xarray.Dataset or pandas.DataFrame
        As :func:`rank_compositions`, plus ``assignment`` (element index per
        template site), ``assignment_text`` (``"Mn 2a, Ge 2b"``: element and
        Wyckoff letter, or site number, per unique site) and ``known``.
    """
    table = rank_table(
        elements,
        cube=cube,
        library=library,
        top=top,
        known=known,
        tie_tolerance=tie_tolerance,
        **options,
    )
    return table.to_frame() if as_frame else table.to_dataset()


def to_frame(ranked: xr.Dataset) -> pd.DataFrame:
    """A ranking as a :class:`pandas.DataFrame`, one row per composition."""
    import pandas as pd

    return pd.DataFrame({n: ranked[n].values for n in FRAME_COLUMNS if n in ranked})


def _assignment_text(
    lib: TemplateLibrary, templates: np.ndarray, assignment: np.ndarray, symbols: Sequence[str]
) -> np.ndarray:
    """``"Mn 2a, Ge 4b"`` per row: element and site label of every unique site, in bulk.

    Each (site, element) piece of text is written once; the rows are one
    gather of pieces (and a separator after each row), one join and one split.
    """
    out = np.empty(templates.size, dtype=object)
    if templates.size == 0:
        return out
    k = len(symbols)
    uniq, inv = np.unique(np.asarray(templates, dtype=np.int64), return_inverse=True)
    inv = inv.reshape(-1)
    n_u = lib.site_start[uniq + 1] - lib.site_start[uniq]
    sites = index_ranges(lib.site_start[uniq], n_u)  # library rows of the sites of uniq
    first_u = np.cumsum(n_u) - n_u  # where each template's sites start in `sites`
    within = np.arange(sites.size) - np.repeat(first_u, n_u)
    mult = lib.multiplicity[sites].tolist()
    if lib.wyckoff is not None:
        labels = [f"{m}{w}" for m, w in zip(mult, lib.wyckoff[sites].tolist(), strict=True)]
    else:
        labels = [f"site{j + 1}×{m}" for j, m in zip(within.tolist(), mult, strict=True)]
    last = (within == np.repeat(n_u, n_u) - 1).tolist()
    # piece (site position p, element e) at p * k + e
    pieces = [
        f"{sym} {lab}" if end else f"{sym} {lab}, "
        for lab, end in zip(labels, last, strict=True)
        for sym in symbols
    ]
    # rows end with a character no piece holds, so that one split cuts them apart
    alphabet = set("".join(pieces))
    sep = next(chr(i) for i in itertools.count() if chr(i) not in alphabet)
    table = np.asarray([*pieces, sep], dtype=object)
    n_r = n_u[inv]
    row_of = np.repeat(np.arange(templates.size), n_r)
    j = np.arange(row_of.size) - np.repeat(np.cumsum(n_r) - n_r, n_r)
    idx = np.full(row_of.size + templates.size, len(pieces), dtype=np.int64)
    body = np.ones(idx.size, dtype=bool)
    body[np.cumsum(n_r + 1) - 1] = False
    idx[body] = (first_u[inv][row_of] + j) * k + assignment[row_of, j].astype(np.int64)
    out[:] = "".join(table[idx].tolist()).split(sep)[:-1]
    return out


def _rows_in(rows: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Whether each row of ``rows`` (n, k) occurs in ``table`` (m, k)."""
    if table.shape[0] == 0 or rows.shape[0] == 0:
        return np.zeros(rows.shape[0], dtype=bool)
    both = np.concatenate([table, rows])
    inv, _ = composition_index(both)
    present = np.zeros(int(inv.max()) + 1, dtype=bool)
    present[inv[: table.shape[0]]] = True
    return present[inv[table.shape[0] :]]


def _library_label(lib: TemplateLibrary) -> str:
    if "cube" in lib.attrs:
        return f"cube {lib.attrs['cube']}"
    if "default" in lib.attrs:
        return f"built-in default ({lib.attrs['default']})"
    return "library in memory"


# =============================================================================
# CIF export
# =============================================================================
SCALE_RULES: Final = ("dls", "radii", "none")


def candidate_structure(
    library: TemplateLibrary,
    template: int,
    elements: Sequence[int],
    assignment: np.ndarray,
    *,
    scale: str = "dls",
    symprec: float | None = None,
    angle_tolerance: float | None = None,
) -> tuple[Any, dict[str, Any]]:
    """The template's structure with the candidate's elements on its sites.

    Every atom takes the element of the unique site it belongs to (atoms are
    mapped to unique sites by spglib's crystallographic orbits with the
    tolerances the library was built with, as in :mod:`afpx.structures`),
    and the lattice is scaled isotropically:

    * ``"dls"`` — to the volume predicted by pymatgen's
      ``DLSVolumePredictor`` (data-mined bond lengths, ionic and metallic
      radii); when it has no data for an element, the ``"radii"`` rule;
    * ``"radii"`` — so that the closest pair of atoms (periodic images
      included) sits at the sum of their atomic radii (pymatgen
      ``Element.atomic_radius``, else ``atomic_radius_calculated``): the
      closest contact touches, none overlaps;
    * ``"none"`` — the template's own lattice.

    Fingerprints are scale-free, so the prediction says nothing about the
    scale: the rule is only a starting point for relaxation.

    Parameters
    ----------
    library : TemplateLibrary
        With ``geometry`` and ``site_index``.
    template : int
    elements : sequence of int, length k
    assignment : ndarray of shape (n_unique_sites,), int
        Index into ``elements`` per unique site (library order).
    scale : {"dls", "radii", "none"}

    Returns
    -------
    structure : pymatgen.core.Structure
    info : dict
        ``scale_rule`` (the rule applied), ``scale_factor`` (linear),
        ``volume_template``, ``volume`` (Å^3).
    """
    import warnings

    from pymatgen.core import Lattice, Structure

    from afpx.structures import site_of_atoms

    if scale not in SCALE_RULES:
        raise AfpxError(f"unknown scale rule {scale!r}; choose one of {', '.join(SCALE_RULES)}")
    geo = library.geometry
    if geo is None or library.site_index is None:
        raise AfpxError(
            "this template library carries no template geometry, so candidates cannot be "
            "exported as CIFs; attach it with TemplateLibrary.with_geometry(structures)"
        )
    if not geo.has(template):
        raise AfpxError(
            f"template {library.structure_id[template]} has no geometry in this library"
        )
    filters = library.attrs.get("filters", {}) if isinstance(library.attrs, dict) else {}
    symprec = float(symprec if symprec is not None else filters.get("symprec", 0.01))
    angle = float(
        angle_tolerance if angle_tolerance is not None else filters.get("angle_tolerance", 5.0)
    )
    a0, a1 = int(geo.atom_start[template]), int(geo.atom_start[template + 1])
    lattice = np.asarray(geo.lattice[template], dtype=np.float64)
    frac = np.asarray(geo.frac_coords[a0:a1], dtype=np.float64)
    numbers = np.asarray(geo.numbers[a0:a1], dtype=np.intc)
    s0, s1 = int(library.site_start[template]), int(library.site_start[template + 1])
    reps = np.asarray(library.site_index[s0:s1], dtype=np.int64)
    try:
        site_of_atom = site_of_atoms(
            lattice, frac, numbers, reps, symprec=symprec, angle_tolerance=angle
        )
    except AfpxError as exc:
        raise AfpxError(f"template {library.structure_id[template]}: {exc}") from exc
    mult = np.bincount(site_of_atom, minlength=reps.size)
    if not np.array_equal(mult, library.multiplicity[s0:s1]):
        raise AfpxError(
            f"template {library.structure_id[template]}: multiplicities found "
            f"{mult.tolist()} differ from the library's {library.multiplicity[s0:s1].tolist()}"
        )

    zs = list(elements)
    species = [element_symbol(int(zs[int(assignment[j])])) for j in site_of_atom]
    structure = Structure(Lattice(lattice), species, frac)
    v0 = float(structure.volume)
    rule = scale
    factor = 1.0
    if scale == "dls":
        try:
            from pymatgen.analysis.structure_prediction.volume_predictor import (
                DLSVolumePredictor,
            )

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                volume = float(DLSVolumePredictor().predict(structure))
            if not (math.isfinite(volume) and volume > 0):
                raise ValueError(f"predicted volume {volume}")
            factor = (volume / v0) ** (1.0 / 3.0)
        except Exception:  # DLS lacks data for some elements: documented fall-back
            rule = "radii"
    if rule == "radii":
        factor = _radii_scale(structure)
    if factor != 1.0:
        structure.scale_lattice(v0 * factor**3)
    return structure, {
        "scale_rule": rule,
        "scale_factor": factor,
        "volume_template": v0,
        "volume": float(structure.volume),
    }


def _radii_scale(structure: Any) -> float:
    """Linear factor that puts the closest pair of atoms at the sum of their radii."""
    import warnings

    from pymatgen.core.periodic_table import Element

    def radius(symbol: str) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            el = Element(symbol)
            r = el.atomic_radius if el.atomic_radius is not None else el.atomic_radius_calculated
        if r is None:
            raise AfpxError(f"no atomic radius for {symbol}; use another scale rule")
        return float(r)

    # closest pair, periodic images included: grow the search radius until one is found
    cutoff = 2.0
    while True:
        centres, points, _, dists = structure.get_neighbor_list(cutoff)
        keep = dists > 1e-8
        if keep.any():
            break
        cutoff *= 2.0
    best = int(np.argmin(np.where(keep, dists, np.inf)))
    i, j, d = int(centres[best]), int(points[best]), float(dists[best])
    r = radius(structure[i].specie.symbol) + radius(structure[j].specie.symbol)
    return r / d


def export_cifs(
    ranked: xr.Dataset,
    library: TemplateLibrary,
    directory: str | os.PathLike[str],
    *,
    scale: str = "dls",
) -> list[Path]:
    """Write each ranked row's best candidate as a CIF.

    Files are named ``<rank position>_<formula>_<structure id>.cif``; the
    comments at the top give the element set, formula, score, ranks, template
    provenance, the site assignment and the scale rule (see
    :func:`candidate_structure`).

    Parameters
    ----------
    ranked : xarray.Dataset
        Output of :func:`rank` (needs ``assignment``).
    library : TemplateLibrary
        The library the ranking came from (with geometry).
    directory : path
        Created if missing.
    scale : {"dls", "radii", "none"}

    Returns
    -------
    list of Path
    """
    import re

    from pymatgen.io.cif import CifWriter

    from afpx import __version__

    if ASSIGNMENT not in ranked:
        raise AfpxError("the ranking carries no assignment; rank with afpx.rank(...)")
    out_dir = Path(directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    zs = [int(z) for z in ranked[schema.ELEMENT].values]
    symbols = [str(s) for s in ranked[schema.SYMBOL].values]
    paths: list[Path] = []
    for i in range(ranked.sizes[COMPOSITION]):
        t = int(ranked[TEMPLATE].values[i])
        assign = np.asarray(ranked[ASSIGNMENT].values[i])
        structure, info = candidate_structure(library, t, zs, assign, scale=scale)
        formula = str(ranked[schema.FORMULA].values[i])
        sid = str(library.structure_id[t])
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{i + 1:03d}_{formula}_{sid}")
        header = [
            f"# afpx {__version__} candidate structure",
            f"# element set: {'-'.join(symbols)}",
            f"# formula: {formula}",
            f"# score (likelihood): {float(ranked[SCORE].values[i]):.6g}",
            f"# log score: {float(ranked[LOG_SCORE].values[i]):.10g}",
            f"# rank: {float(ranked[RANK].values[i]):g} "
            f"(optimistic {int(ranked[RANK_OPTIMISTIC].values[i])}, "
            f"pessimistic {int(ranked[RANK_PESSIMISTIC].values[i])})",
            f"# template: {sid} ({library.formula[t]}, space group "
            f"{int(library.spacegroup[t])}) from {library.source[t]}",
        ]
        if ASSIGNMENT_TEXT in ranked:
            header.append(f"# assignment: {ranked[ASSIGNMENT_TEXT].values[i]}")
        header += [
            f"# lattice scaled by rule '{info['scale_rule']}', linear factor "
            f"{info['scale_factor']:.6f} (volume {info['volume_template']:.3f} -> "
            f"{info['volume']:.3f} A^3); fingerprints are scale free: relax before use",
            f"# templates library: {_library_label(library)}",
        ]
        text = "\n".join(header) + "\n" + str(CifWriter(structure))
        path = out_dir / f"{safe}.cif"
        path.write_text(text)
        paths.append(path)
    return paths


class _CallableModule(types.ModuleType):
    """``afpx.rank`` is both this module and the function :func:`rank`.

    ``import afpx.rank`` binds the module to the attribute ``afpx.rank``,
    hiding the lazily exported function; calling the module calls the
    function, so ``afpx.rank("Li,Mn,Ge")`` works whatever was imported first.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return rank(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
