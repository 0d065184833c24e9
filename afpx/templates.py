"""Templates and exact candidate enumeration.

A *template* is a known structure stripped of its elements: its unique sites,
their multiplicities, and for every site the likelihood of each of the 118
elements (the sigmoid output of the model). A *candidate* puts one element of a
requested set on every unique site, using every element of the set at least
once. Its likelihood is the product of its site likelihoods (we add logs); its
composition is the multiplicity sum per element, reduced by the greatest common
divisor.

:func:`best_candidates` returns, for every template and every composition the
template can produce, the best candidate (highest likelihood) — exactly, over
every assignment of every template:

* Each template's multiplicities are first divided by their gcd ``g``. The
  counts of every assignment are then divided by ``g`` too, so the reduced
  composition of every candidate is unchanged while the numbers the dynamic
  programme works with shrink.
* Small templates (``k**n`` assignments cheaper than the programme) are
  enumerated outright (*brute force*), vectorised over all templates with the
  same number of sites.
* Larger ones go through a max-plus dynamic programme over multiplicity
  counts: the state after the first ``s`` sites is the count vector of the
  first ``k - 1`` elements (the last count is the rest), and

  .. math:: V_s(c) = \\max_e \\; V_{s-1}(c - m_s \\delta_e) + \\log p_{s,e}

  with :math:`\\delta_{k-1} = 0`. Sites are taken in increasing multiplicity,
  so the reachable count region grows slowly; templates of similar size are
  stacked into one array and advanced together. A count vector whose every
  entry is positive (and whose implied last count is positive) is a candidate
  that uses every element, so no separate "elements used" state is needed.

Within one template, all count vectors sum to the same total, so two different
count vectors never reduce to the same composition: ``(template, counts)`` and
``(template, reduced composition)`` name the same candidate.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from afpx import AfpxError, schema

if TYPE_CHECKING:
    import xarray as xr

__all__ = [
    "LIKELIHOOD_FLOOR",
    "CandidateOptions",
    "TemplateGeometry",
    "TemplateLibrary",
    "best_assignments",
    "best_candidates",
    "composition_index",
    "reduce_compositions",
    "reduced_formulas",
]

# -- names of the candidate dataset (ranking output; not cube variables) ------
CANDIDATE: Final = "candidate"
TEMPLATE_SITE: Final = "template_site"  # position of a unique site within its template
LIBRARY_TEMPLATE: Final = "library_template"  # the library's templates, for provenance
TEMPLATE: Final = "template"
COUNTS: Final = "counts"
REDUCED_COUNTS: Final = "reduced_counts"
LOG_SCORE: Final = "log_score"
ASSIGNMENT: Final = "assignment"
METHOD: Final = "method"  # 0 brute force, 1 dynamic programme
TEMPLATE_STRUCTURE_ID: Final = "template_structure_id"
TEMPLATE_FORMULA: Final = "template_formula"
TEMPLATE_SPACEGROUP: Final = "template_spacegroup"
TEMPLATE_SOURCE: Final = "template_source"
TEMPLATE_N_SITES: Final = "template_n_sites"

#: Likelihoods are clipped to at least this before taking logs (a float32
#: sigmoid can underflow to exactly 0; the log of the floor is -69.1).
LIKELIHOOD_FLOOR: Final = 1e-30

#: Tables with at least this many count axes (k - 1) and cells (states x
#: templates) are updated in bands that skip the unreachable corner; for
#: three elements the saving did not pay for the extra work (measured).
_BAND_MIN_DIMS: Final = 3
#: Blocks of fewer templates repeat each step's likelihoods along the last count
#: axis (see :func:`_step`).
_SPREAD_BELOW: Final = 32
_BAND_MIN_CELLS: Final = 1 << 14
_BANDS: Final = 4
#: Bytes of one stacked block's final table: small enough to stay in a core's
#: cache across the passes of a step, large enough to amortise Python overhead.
_BLOCK_BYTES: Final = 2**20
#: A template whose state table alone would need more than this is refused.
_MAX_TABLE_BYTES: Final = 2 * 2**30
#: Brute force is used when it costs at most this many times the programme's
#: cell updates (a brute-force candidate is cheaper than a gathered DP update).
_BF_ADVANTAGE: Final = 2.0
#: Brute force never enumerates more assignments per template than this.
_BF_MAX_ASSIGNMENTS: Final = 4096
#: Templates stacked in one block of the programme differ in sites and in
#: reduced atoms by at most these ratios (padding against Python overhead).
_BUCKET_SITES: Final = 2.0
_BUCKET_TOTAL: Final = 1.5


# =============================================================================
# the library
# =============================================================================
@dataclass(frozen=True, eq=False)
class TemplateGeometry:
    """Atomic positions of the templates, for exporting candidates as CIFs.

    Parameters
    ----------
    lattice : ndarray of shape (n_templates, 3, 3), float64
        Rows are lattice vectors (Å); NaN for a template without geometry.
    atom_start : ndarray of shape (n_templates + 1,), int64
        Atoms of template ``t`` are ``atom_start[t]:atom_start[t + 1]``.
    frac_coords : ndarray of shape (n_atoms, 3), float64
        Fractional coordinates.
    numbers : ndarray of shape (n_atoms,), int16
        Atomic numbers of the known structure.
    """

    lattice: np.ndarray
    atom_start: np.ndarray
    frac_coords: np.ndarray
    numbers: np.ndarray

    def __post_init__(self) -> None:
        n = self.lattice.shape[0]
        if self.lattice.shape != (n, 3, 3):
            raise AfpxError(f"geometry lattice has shape {self.lattice.shape}, expected (n, 3, 3)")
        if self.atom_start.shape != (n + 1,) or np.any(np.diff(self.atom_start) < 0):
            raise AfpxError("geometry atom_start must be (n_templates + 1,) and non-decreasing")
        n_atoms = int(self.atom_start[-1]) if n else 0
        if self.frac_coords.shape != (n_atoms, 3) or self.numbers.shape != (n_atoms,):
            raise AfpxError(
                f"geometry holds {self.frac_coords.shape[0]} coordinates and "
                f"{self.numbers.shape[0]} numbers, atom_start says {n_atoms}"
            )

    @property
    def n_templates(self) -> int:
        return int(self.lattice.shape[0])

    def has(self, template: int) -> bool:
        """Whether template ``template`` has atoms and a finite lattice."""
        a, b = self.atom_start[template], self.atom_start[template + 1]
        return bool(b > a and np.isfinite(self.lattice[template]).all())

    def subset(self, templates: np.ndarray) -> TemplateGeometry:
        """The geometry of the given templates (int indices), renumbered."""
        counts = np.diff(self.atom_start)[templates]
        rows = _ranges(self.atom_start[templates], counts)
        return TemplateGeometry(
            lattice=self.lattice[templates],
            atom_start=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            frac_coords=self.frac_coords[rows],
            numbers=self.numbers[rows],
        )

    @classmethod
    def from_structures(
        cls, structure_ids: Sequence[str], structures: Iterable[Any]
    ) -> TemplateGeometry:
        """Collect geometry from analysed structures, matched by structure id.

        Parameters
        ----------
        structure_ids : sequence of str, length n_templates
            The library's structure ids, in template order.
        structures : iterable
            Objects with ``structure_id``, ``lattice`` (3, 3), ``frac_coords``
            (n_atoms, 3) and ``numbers`` (n_atoms,), e.g.
            :class:`afpx.structures.AnalysedStructure`. Templates without a
            match get no atoms and a NaN lattice.
        """
        by_id: dict[str, Any] = {}
        for s in structures:
            by_id.setdefault(str(s.structure_id), s)
        n = len(structure_ids)
        lattice = np.full((n, 3, 3), np.nan)
        frac: list[np.ndarray] = []
        nums: list[np.ndarray] = []
        counts = np.zeros(n, dtype=np.int64)
        for t, sid in enumerate(structure_ids):
            s = by_id.get(str(sid))
            if s is None:
                continue
            lattice[t] = np.asarray(s.lattice, dtype=np.float64)
            fc = np.asarray(s.frac_coords, dtype=np.float64).reshape(-1, 3)
            frac.append(fc)
            nums.append(np.asarray(s.numbers, dtype=np.int16).reshape(-1))
            counts[t] = fc.shape[0]
        return cls(
            lattice=lattice,
            atom_start=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            frac_coords=np.concatenate(frac) if frac else np.zeros((0, 3)),
            numbers=np.concatenate(nums) if nums else np.zeros(0, dtype=np.int16),
        )


@dataclass(frozen=True, eq=False)
class TemplateLibrary:
    """All templates' unique sites, concatenated and grouped by template.

    Parameters
    ----------
    site_template : ndarray of shape (n_sites,), int64
        Template index of each site, non-decreasing, in ``0 .. n_templates-1``.
    multiplicity : ndarray of shape (n_sites,), int32
        Number of equivalent atoms of each unique site in the template's cell.
    z : ndarray of shape (n_sites,), int16
        Element on the site in the known structure (for evaluation and for
        the compositions that are already known).
    log_likelihood : ndarray of shape (n_sites, 118), float32
        Log of the site likelihood of elements Z = 1..118 (column ``Z - 1``),
        likelihoods clipped to at least :data:`LIKELIHOOD_FLOOR`.
    structure_id, formula, source : ndarray of shape (n_templates,), str
        Provenance: id within its source, reduced formula (pymatgen's
        ``Composition.reduced_formula``), file or dataset name.
    spacegroup : ndarray of shape (n_templates,), int
        International space-group number.
    split : ndarray of shape (n_templates,), str, or None
        ``train`` / ``holdout`` / ``test`` when known.
    wyckoff : ndarray of shape (n_sites,), str, optional
        Wyckoff letter of each site (for display).
    site_index : ndarray of shape (n_sites,), int, optional
        Index of each site's representative atom in the template's structure
        (needed, with ``geometry``, to export candidates as CIFs).
    geometry : TemplateGeometry, optional
        Lattices and atomic positions of the templates (CIF export).
    attrs : dict
        JSON-able provenance (likelihood model, cube, fingerprint parameters).
    """

    site_template: np.ndarray
    multiplicity: np.ndarray
    z: np.ndarray
    log_likelihood: np.ndarray
    structure_id: np.ndarray
    formula: np.ndarray
    spacegroup: np.ndarray
    source: np.ndarray
    split: np.ndarray | None = None
    wyckoff: np.ndarray | None = None
    site_index: np.ndarray | None = None
    geometry: TemplateGeometry | None = None
    attrs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n_sites = self.site_template.shape[0]
        n_t = self.structure_id.shape[0]
        for name in ("multiplicity", "z"):
            if getattr(self, name).shape != (n_sites,):
                raise AfpxError(f"template library: {name} must have shape ({n_sites},)")
        for name in ("wyckoff", "site_index"):
            v = getattr(self, name)
            if v is not None and v.shape != (n_sites,):
                raise AfpxError(f"template library: {name} must have shape ({n_sites},)")
        if self.log_likelihood.shape != (n_sites, schema.N_ELEMENTS):
            raise AfpxError(
                f"template library: log_likelihood has shape {self.log_likelihood.shape}, "
                f"expected ({n_sites}, {schema.N_ELEMENTS})"
            )
        for name in ("formula", "spacegroup", "source"):
            if getattr(self, name).shape != (n_t,):
                raise AfpxError(f"template library: {name} must have shape ({n_t},)")
        if self.split is not None and self.split.shape != (n_t,):
            raise AfpxError(f"template library: split must have shape ({n_t},)")
        if n_sites and (
            np.any(np.diff(self.site_template) < 0)
            or self.site_template[0] < 0
            or self.site_template[-1] >= n_t
        ):
            raise AfpxError(
                "template library: site_template must be non-decreasing within 0..n_templates-1"
            )
        if n_sites and self.multiplicity.min() < 1:
            raise AfpxError("template library: every multiplicity must be at least 1")
        if self.geometry is not None and self.geometry.n_templates != n_t:
            raise AfpxError("template library: geometry must cover every template")

    # -- sizes and derived per-template arrays (cached; the library is frozen) --
    @property
    def n_templates(self) -> int:
        return int(self.structure_id.shape[0])

    @property
    def n_sites(self) -> int:
        return int(self.site_template.shape[0])

    @functools.cached_property
    def site_start(self) -> np.ndarray:
        """(n_templates + 1,) int64: sites of template t are ``site_start[t]:site_start[t+1]``."""
        return np.searchsorted(self.site_template, np.arange(self.n_templates + 1)).astype(np.int64)

    @functools.cached_property
    def n_unique_sites(self) -> np.ndarray:
        """(n_templates,) int64 number of unique sites of each template."""
        return np.diff(self.site_start)

    @functools.cached_property
    def _plans(self) -> dict[tuple[Any, ...], Any]:
        # enumeration plans by (k, selected templates), which depend on multiplicities
        # only, and the last element set's log-likelihood columns
        return {}

    @functools.cached_property
    def _reduced(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # gcd of each template's multiplicities, reduced multiplicities, reduced totals
        start, n = self.site_start, self.n_unique_sites
        m = self.multiplicity.astype(np.int64)
        g = np.ones(self.n_templates, dtype=np.int64)
        has = n > 0
        if m.size:
            g[has] = np.gcd.reduceat(m, start[:-1][has])
        mr = m // np.repeat(g, n)
        total = np.zeros(self.n_templates, dtype=np.int64)
        if m.size:
            total[has] = np.add.reduceat(mr, start[:-1][has])
        return g, mr, total

    # -- constructors ---------------------------------------------------------
    @classmethod
    def from_cube(cls, ds: xr.Dataset) -> TemplateLibrary:
        """Templates of a cube: its draw-0 sites with their likelihoods.

        Uses ``likelihood_mean`` (mean over augmentation draws) when the cube
        has it, else ``likelihood``.

        Parameters
        ----------
        ds : xarray.Dataset
            An afpx cube (lazy or loaded) with likelihoods.

        Returns
        -------
        TemplateLibrary
        """
        var = (
            schema.LIKELIHOOD_MEAN if schema.LIKELIHOOD_MEAN in ds.variables else schema.LIKELIHOOD
        )
        schema.require_variables(
            ds,
            [var, schema.MULTIPLICITY, schema.Z, schema.STRUCTURE_INDEX, schema.STRUCTURE_ID],
            what="ranking",
            fix="write likelihoods with `afpx likelihood CUBE --model MODEL`",
        )
        structure = np.asarray(ds[schema.STRUCTURE_INDEX].values, dtype=np.int64)
        if schema.DRAW in ds.variables:
            rows = np.flatnonzero(np.asarray(ds[schema.DRAW].values) == 0)
        else:
            rows = np.arange(structure.size)
        structure = structure[rows]
        order = np.argsort(structure, kind="stable")
        if not np.array_equal(order, np.arange(order.size)):
            rows, structure = rows[order], structure[order]
        lik_da = ds[var]
        if lik_da.dims != (schema.SITE, schema.ELEMENT):
            lik_da = lik_da.transpose(schema.SITE, schema.ELEMENT)
        lik = np.asarray(lik_da.isel({schema.SITE: rows}).values, dtype=np.float32)
        if lik.shape[1] != schema.N_ELEMENTS:
            raise AfpxError(f"`{var}` has {lik.shape[1]} elements, expected {schema.N_ELEMENTS}")
        if schema.ELEMENT in lik_da.coords:
            zcoord = np.asarray(lik_da[schema.ELEMENT].values, dtype=np.int64)
            if not np.array_equal(np.sort(zcoord), np.arange(1, schema.N_ELEMENTS + 1)):
                raise AfpxError(f"`{var}` must cover Z = 1..{schema.N_ELEMENTS} once each")
            if not np.array_equal(zcoord, np.arange(1, schema.N_ELEMENTS + 1)):
                lik = lik[:, np.argsort(zcoord)]
        if not np.isfinite(lik).all():
            raise AfpxError(f"`{var}` holds non-finite values; rerun `afpx likelihood`")

        def per_site(name: str, dtype: Any) -> np.ndarray | None:
            if name not in ds.variables:
                return None
            return np.asarray(ds[name].values)[rows].astype(dtype)

        def per_structure(name: str, default: Any) -> np.ndarray:
            if name not in ds.variables:
                return np.full(ds.sizes[schema.STRUCTURE], default, dtype=object)
            return np.asarray(ds[name].values).astype(object)

        sg = (
            np.asarray(ds[schema.SPACEGROUP].values, dtype=np.int64)
            if schema.SPACEGROUP in ds.variables
            else np.zeros(ds.sizes[schema.STRUCTURE], dtype=np.int64)
        )
        attrs: dict[str, Any] = {
            "likelihood_variable": var,
            "likelihood_attrs": _jsonable(dict(ds[var].attrs)),
        }
        for key in ("fingerprint", "filters", "draws", "afpx_version", "sources"):
            if key in ds.attrs:
                attrs[key] = _jsonable(ds.attrs[key])
        return cls(
            site_template=structure,
            multiplicity=np.asarray(ds[schema.MULTIPLICITY].values)[rows].astype(np.int32),
            z=np.asarray(ds[schema.Z].values)[rows].astype(np.int16),
            log_likelihood=_log_likelihood(lik),
            structure_id=per_structure(schema.STRUCTURE_ID, ""),
            formula=per_structure(schema.FORMULA, ""),
            spacegroup=sg,
            source=per_structure(schema.SOURCE, ""),
            split=per_structure(schema.SPLIT, "") if schema.SPLIT in ds.variables else None,
            wyckoff=per_site(schema.WYCKOFF, object),
            site_index=per_site(schema.SITE_INDEX, np.int64),
            attrs=attrs,
        )

    @classmethod
    def from_structures(
        cls,
        structures: Sequence[Any],
        *,
        likelihood: np.ndarray | None = None,
        attrs: Mapping[str, Any] | None = None,
    ) -> TemplateLibrary:
        """Templates (with geometry) straight from analysed structures.

        Parameters
        ----------
        structures : sequence of AnalysedStructure
            E.g. ``read_structures(...).structures``.
        likelihood : ndarray of shape (n_sites, 118), optional
            Site likelihoods in the order of the structures' unique sites;
            without it every likelihood is 1 (the pure template prior).
        attrs : mapping, optional
            Provenance to record (e.g. ``{"filters": params.to_attrs()}``).
        """
        n = np.asarray([len(s.sites) for s in structures], dtype=np.int64)
        n_sites = int(n.sum())
        if likelihood is None:
            logl = np.zeros((n_sites, schema.N_ELEMENTS), dtype=np.float32)
        else:
            lik = np.asarray(likelihood, dtype=np.float32)
            if lik.shape != (n_sites, schema.N_ELEMENTS):
                raise AfpxError(
                    f"likelihood has shape {lik.shape}, expected ({n_sites}, {schema.N_ELEMENTS})"
                )
            logl = _log_likelihood(lik)

        def cat(name: str, dtype: Any) -> np.ndarray:
            parts = [np.asarray(getattr(s.sites, name)) for s in structures]
            return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)

        lib = cls(
            site_template=np.repeat(np.arange(n.size, dtype=np.int64), n),
            multiplicity=cat("multiplicity", np.int32),
            z=cat("z", np.int16),
            log_likelihood=logl,
            structure_id=np.asarray([str(s.structure_id) for s in structures], dtype=object),
            formula=np.asarray([str(s.formula) for s in structures], dtype=object),
            spacegroup=np.asarray([int(s.sites.spacegroup) for s in structures], dtype=np.int64),
            source=np.asarray([str(s.source) for s in structures], dtype=object),
            wyckoff=cat("wyckoff", object),
            site_index=cat("index", np.int64),
            attrs=dict(attrs or {}),
        )
        return lib.with_geometry(structures)

    def with_likelihood(self, likelihood: np.ndarray) -> TemplateLibrary:
        """The same templates with other site likelihoods (e.g. a baseline).

        Parameters
        ----------
        likelihood : ndarray of shape (n_sites, 118)
            Likelihoods in [0, 1]; clipped to :data:`LIKELIHOOD_FLOOR` below.
        """
        lik = np.asarray(likelihood, dtype=np.float32)
        if lik.shape != (self.n_sites, schema.N_ELEMENTS):
            raise AfpxError(
                f"likelihood has shape {lik.shape}, expected ({self.n_sites}, {schema.N_ELEMENTS})"
            )
        if not np.isfinite(lik).all() or lik.min(initial=0.0) < 0.0 or lik.max(initial=0.0) > 1.0:
            raise AfpxError("likelihoods must be finite and within [0, 1]")
        return replace(self, log_likelihood=_log_likelihood(lik))

    def with_geometry(self, structures: Iterable[Any]) -> TemplateLibrary:
        """Attach template geometry from analysed structures (matched by id)."""
        geometry = TemplateGeometry.from_structures(list(self.structure_id), structures)
        return replace(self, geometry=geometry)

    def subset(self, templates: np.ndarray | Sequence[int]) -> TemplateLibrary:
        """The library restricted to some templates, renumbered 0..len-1.

        Parameters
        ----------
        templates : ndarray of shape (n,), int indices or bool mask of shape (n_templates,)
        """
        idx = np.asarray(templates)
        if idx.dtype == bool:
            if idx.shape != (self.n_templates,):
                raise AfpxError(f"template mask must have shape ({self.n_templates},)")
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_templates):
            raise AfpxError(f"template index out of range 0..{self.n_templates - 1}")
        n = self.n_unique_sites[idx]
        rows = _ranges(self.site_start[idx], n)

        def opt(a: np.ndarray | None, sel: np.ndarray) -> np.ndarray | None:
            return None if a is None else a[sel]

        return TemplateLibrary(
            site_template=np.repeat(np.arange(idx.size, dtype=np.int64), n),
            multiplicity=self.multiplicity[rows],
            z=self.z[rows],
            log_likelihood=self.log_likelihood[rows],
            structure_id=self.structure_id[idx],
            formula=self.formula[idx],
            spacegroup=self.spacegroup[idx],
            source=self.source[idx],
            split=opt(self.split, idx),
            wyckoff=opt(self.wyckoff, rows),
            site_index=opt(self.site_index, rows),
            geometry=None if self.geometry is None else self.geometry.subset(idx),
            attrs=dict(self.attrs),
        )

    def known_compositions(self, elements: Sequence[int]) -> np.ndarray:
        """Reduced compositions of the templates made of exactly ``elements``.

        Parameters
        ----------
        elements : sequence of int, length k
            Atomic numbers.

        Returns
        -------
        ndarray of shape (n_known, k), int64
            Unique reduced count vectors (rows sorted), in the order of ``elements``.
        """
        zs = _check_elements(elements)
        counts = _own_counts(self, zs)
        red = _reduce_rows(counts[(counts > 0).all(axis=1)])
        if red.size == 0:
            return red.reshape(0, zs.size)
        return np.unique(red, axis=0)


# =============================================================================
# candidates
# =============================================================================
@dataclass(frozen=True)
class CandidateOptions:
    """Which templates and candidates :func:`best_candidates` considers.

    Parameters
    ----------
    exclude_formulas : tuple of str
        Templates whose own reduced formula is one of these are skipped.
    exclude_own_formula : bool
        Drop a candidate when its composition equals its template's own
        composition (the known structure re-predicting itself; for
        leakage-free evaluation).
    max_unique_sites : int or None
        Skip templates with more unique sites.
    sources : tuple of str or None
        Keep only templates from these sources.
    min_likelihood : float or None
        Drop candidates whose likelihood (product over sites) is below this.
    min_site_likelihood : float or None
        Never put an element on a site whose likelihood for it is below this.
    """

    exclude_formulas: tuple[str, ...] = ()
    exclude_own_formula: bool = False
    max_unique_sites: int | None = None
    sources: tuple[str, ...] | None = None
    min_likelihood: float | None = None
    min_site_likelihood: float | None = None

    def to_attrs(self) -> dict[str, Any]:
        """JSON-able dict (``None`` as the string ``"none"``, as zarr attrs allow it)."""
        out: dict[str, Any] = {}
        for k, v in self.__dict__.items():
            out[k] = "none" if v is None else (list(v) if isinstance(v, tuple) else v)
        return out


def best_candidates(
    library: TemplateLibrary,
    elements: Sequence[int],
    *,
    exclude_formulas: Collection[str] = (),
    exclude_own_formula: bool = False,
    max_unique_sites: int | None = None,
    sources: Collection[str] | None = None,
    min_likelihood: float | None = None,
    min_site_likelihood: float | None = None,
    assignments: bool = True,
) -> xr.Dataset:
    """Best candidate of every (template, composition) for an element set.

    Exact: every assignment of the elements to the unique sites of every
    template is considered (brute force for small templates, a max-plus
    dynamic programme over multiplicity counts for the others), and every
    element is used at least once.

    Parameters
    ----------
    library : TemplateLibrary
    elements : sequence of int, length k >= 1
        Distinct atomic numbers; their order is the order of ``counts``.
    exclude_formulas, exclude_own_formula, max_unique_sites, sources, min_likelihood, \
min_site_likelihood
        See :class:`CandidateOptions`.
    assignments : bool
        Also return the site → element assignment of every candidate (costs
        one backtracking pass; ranking only needs it for the rows it shows,
        see :func:`best_assignments`).

    Returns
    -------
    xarray.Dataset
        dims ``candidate``, ``element`` (k), ``template_site`` (largest
        template), ``library_template`` (the library's templates). Variables:

        - ``template`` (candidate) int64: index into the library;
        - ``counts`` (candidate, element) int64: atoms of each element in the
          template's cell;
        - ``reduced_counts`` (candidate, element) int64: counts / their gcd;
        - ``formula`` (candidate) str: reduced formula (pymatgen's convention);
        - ``log_score`` (candidate) float64: sum of the log site likelihoods;
        - ``method`` (candidate) int8: 0 brute force, 1 dynamic programme;
        - ``assignment`` (candidate, template_site) int8: index into
          ``elements`` per unique site, in library order, -1 padding;
        - ``template_structure_id``, ``template_formula``,
          ``template_spacegroup``, ``template_source``, ``template_n_sites``
          (library_template): provenance.

        Candidates come grouped by template (all of one template together,
        sorted by counts), the groups in a fixed order of the enumeration
        (sort by ``template`` if you need it). attrs:
        ``n_candidates_bruteforce`` (assignments enumerated),
        ``n_dp_updates`` (state updates of the programme), ``n_templates``
        (templates considered), ``options``.
    """
    import xarray as xr

    zs = _check_elements(elements)
    opts = CandidateOptions(
        exclude_formulas=tuple(exclude_formulas),
        exclude_own_formula=exclude_own_formula,
        max_unique_sites=max_unique_sites,
        sources=None if sources is None else tuple(sources),
        min_likelihood=min_likelihood,
        min_site_likelihood=min_site_likelihood,
    )
    result, selected = _candidates(library, zs, opts, assignments=assignments)
    inverse, unique = reduce_compositions(result.counts)
    symbols = [_symbol(z) for z in zs.tolist()]
    formulas = reduced_formulas(unique, symbols)[inverse]
    width = int(library.n_unique_sites[selected].max()) if selected.size else 0
    if result.assignment is None:
        assign = np.full((result.template.size, width), -1, dtype=np.int8)
    else:
        assign = result.assignment[:, :width]
    coords = {
        schema.ELEMENT: (schema.ELEMENT, zs.astype(np.int16)),
        schema.SYMBOL: (schema.ELEMENT, np.asarray(symbols, dtype=object)),
    }
    data_vars: dict[str, Any] = {
        TEMPLATE: (CANDIDATE, result.template),
        COUNTS: ((CANDIDATE, schema.ELEMENT), result.cell_counts(library)),
        REDUCED_COUNTS: ((CANDIDATE, schema.ELEMENT), unique[inverse]),
        schema.FORMULA: (CANDIDATE, formulas),
        LOG_SCORE: (CANDIDATE, result.log_score),
        METHOD: (CANDIDATE, result.method),
        TEMPLATE_STRUCTURE_ID: (LIBRARY_TEMPLATE, library.structure_id),
        TEMPLATE_FORMULA: (LIBRARY_TEMPLATE, library.formula),
        TEMPLATE_SPACEGROUP: (LIBRARY_TEMPLATE, library.spacegroup),
        TEMPLATE_SOURCE: (LIBRARY_TEMPLATE, library.source),
        TEMPLATE_N_SITES: (LIBRARY_TEMPLATE, library.n_unique_sites),
    }
    if assignments:
        data_vars[ASSIGNMENT] = ((CANDIDATE, TEMPLATE_SITE), assign)
    ds = xr.Dataset(data_vars, coords=coords)
    ds.attrs.update(
        {
            "n_candidates_bruteforce": int(result.n_bruteforce),
            "n_dp_updates": int(result.n_dp_updates),
            "n_templates": int(selected.size),
            "options": opts.to_attrs(),
            "likelihood": _jsonable(library.attrs.get("likelihood_attrs", {})),
        }
    )
    return ds


def best_assignments(
    library: TemplateLibrary,
    elements: Sequence[int],
    templates: np.ndarray | Sequence[int],
    counts: np.ndarray,
    *,
    min_site_likelihood: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Best site assignment of given (template, counts) pairs.

    Re-runs the exact enumeration for the listed templates only, so that a
    ranking can show the assignment behind its top rows without
    backtracking every candidate.

    Parameters
    ----------
    library : TemplateLibrary
    elements : sequence of int, length k
    templates : ndarray of shape (n,), int
    counts : ndarray of shape (n, k), int
        Cell counts, as in the ``counts`` of :func:`best_candidates`.
    min_site_likelihood : float, optional
        As in :func:`best_candidates` (must match to reproduce its scores).

    Returns
    -------
    assignment : ndarray of shape (n, max_sites), int8
        Index into ``elements`` per unique site (library order), -1 padding.
    log_score : ndarray of shape (n,), float64
    """
    zs = _check_elements(elements)
    t = np.asarray(templates, dtype=np.int64).reshape(-1)
    c = np.asarray(counts, dtype=np.int64).reshape(t.size, zs.size)
    uniq = np.unique(t)
    opts = CandidateOptions(min_site_likelihood=min_site_likelihood)
    res = _enumerate(library, zs, uniq, opts, assignments=True)
    width = int(library.n_unique_sites[uniq].max()) if uniq.size else 0
    out = np.full((t.size, width), -1, dtype=np.int8)
    score = np.full(t.size, np.nan)
    if res.template.size == 0:
        if t.size:
            raise AfpxError("no candidate of the requested templates uses every element")
        return out, score
    assert res.assignment is not None
    # match (template, counts) rows by a sort on a combined key
    key_res = np.concatenate([res.template[:, None], res.cell_counts(library)], axis=1)
    key_req = np.concatenate([t[:, None], c], axis=1)
    both = np.concatenate([key_res, key_req])
    _, inv = np.unique(both, axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    lookup = np.full(int(inv.max()) + 1, -1, dtype=np.int64)
    lookup[inv[: key_res.shape[0]]] = np.arange(key_res.shape[0])
    found = lookup[inv[key_res.shape[0] :]]
    if np.any(found < 0):
        bad = int(np.flatnonzero(found < 0)[0])
        raise AfpxError(
            f"template {int(t[bad])} has no candidate with counts {c[bad].tolist()} "
            "that uses every element"
        )
    out[:] = res.assignment[found, :width]
    score[:] = res.log_score[found]
    return out, score


# =============================================================================
# orchestration of the enumeration
# =============================================================================
@dataclass
class _Result:
    template: np.ndarray  # (N,) int64
    counts: np.ndarray  # (N, k) int64, in units of the template's multiplicity gcd
    log_score: np.ndarray  # (N,) float64
    method: np.ndarray  # (N,) int8
    assignment: np.ndarray | None  # (N, width) int8, library site order
    n_bruteforce: int = 0
    n_dp_updates: int = 0

    def take(self, idx: np.ndarray) -> _Result:
        return _Result(
            self.template[idx],
            self.counts[idx],
            self.log_score[idx],
            self.method[idx],
            None if self.assignment is None else self.assignment[idx],
            self.n_bruteforce,
            self.n_dp_updates,
        )

    def cell_counts(self, library: TemplateLibrary, rows: np.ndarray | None = None) -> np.ndarray:
        """(N, k) int64 atoms of each element in the template's cell (of ``rows`` if given)."""
        counts = self.counts if rows is None else self.counts[rows]
        g = library._reduced[0][self.template if rows is None else self.template[rows]]
        return _scale_rows(counts, g)


def _candidates(
    library: TemplateLibrary,
    zs: np.ndarray,
    opts: CandidateOptions,
    *,
    assignments: bool,
) -> tuple[_Result, np.ndarray]:
    """Enumerate, then apply the candidate-level options; also return the templates used."""
    selected = _select_templates(library, zs.size, opts)
    result = _enumerate(library, zs, selected, opts, assignments=assignments)
    if opts.exclude_own_formula and result.template.size:
        own = _own_counts(library, zs)[result.template]
        keep = ~(own == result.cell_counts(library)).all(axis=1)
        result = result.take(np.flatnonzero(keep))
    if opts.min_likelihood is not None:
        if not opts.min_likelihood > 0:
            raise AfpxError(f"min_likelihood must be positive, got {opts.min_likelihood}")
        keep = result.log_score >= math.log(opts.min_likelihood)
        result = result.take(np.flatnonzero(keep))
    return result, selected


def _check_elements(elements: Sequence[int]) -> np.ndarray:
    zs = np.asarray(list(elements))
    if zs.ndim != 1 or zs.size < 1:
        raise AfpxError("give at least one element")
    if not np.issubdtype(zs.dtype, np.integer):
        raise AfpxError(f"elements must be atomic numbers (int), got {list(elements)!r}")
    zs = zs.astype(np.int64)
    if zs.min() < 1 or zs.max() > schema.N_ELEMENTS:
        raise AfpxError(f"atomic numbers must lie in 1..{schema.N_ELEMENTS}, got {zs.tolist()}")
    if np.unique(zs).size != zs.size:
        raise AfpxError(f"repeated element in {zs.tolist()}")
    if zs.size > 127:
        raise AfpxError("at most 127 elements per set")
    return zs


def _select_templates(library: TemplateLibrary, k: int, opts: CandidateOptions) -> np.ndarray:
    keep = library.n_unique_sites >= k
    if opts.max_unique_sites is not None:
        keep &= library.n_unique_sites <= opts.max_unique_sites
    if opts.sources is not None:
        keep &= np.isin(library.source.astype(str), np.asarray(list(opts.sources), dtype=str))
    if opts.exclude_formulas:
        names = {_normalise_formula(f) for f in opts.exclude_formulas}
        keep &= ~np.isin(library.formula.astype(str), np.asarray(sorted(names), dtype=str))
    return np.flatnonzero(keep)


def _normalise_formula(formula: str) -> str:
    from pymatgen.core import Composition

    try:
        return str(Composition(formula).reduced_formula)
    except Exception as exc:  # pymatgen raises several types for bad formulas
        raise AfpxError(f"cannot read formula {formula!r}: {exc}") from exc


def _own_counts(library: TemplateLibrary, zs: np.ndarray) -> np.ndarray:
    """(n_templates, k) cell counts of each template's own elements; -1 if not made of zs."""
    k = zs.size
    pos = np.full(schema.N_ELEMENTS + 1, -1, dtype=np.int64)
    pos[zs] = np.arange(k)
    p = pos[library.z.astype(np.int64)]
    ok = p >= 0
    counts = np.zeros((library.n_templates, k), dtype=np.int64)
    np.add.at(counts, (library.site_template[ok], p[ok]), library.multiplicity[ok].astype(np.int64))
    foreign = np.zeros(library.n_templates, dtype=bool)
    foreign[library.site_template[~ok]] = True
    counts[foreign] = -1
    return counts


def _enumerate(
    library: TemplateLibrary,
    zs: np.ndarray,
    templates: np.ndarray,
    opts: CandidateOptions,
    *,
    assignments: bool,
) -> _Result:
    k = zs.size
    plan = _plan(library, k, templates)
    logl = _site_log_likelihood(library, zs, opts.min_site_likelihood)
    width = int(library.n_unique_sites[templates].max()) if templates.size else 0

    parts = [_bruteforce(logl, grp, k, assignments=assignments) for grp in plan.bruteforce]
    parts += [_dp(logl, blk, k, assignments=assignments) for blk in plan.dp]
    if not parts:
        return _Result(
            np.zeros(0, np.int64),
            np.zeros((0, k), np.int64),
            np.zeros(0),
            np.zeros(0, np.int8),
            np.zeros((0, width), np.int8) if assignments else None,
        )
    assign = None
    if assignments:
        n_all = sum(p.template.size for p in parts)
        assign = np.full((n_all, width), -1, dtype=np.int8)
        row = 0
        for p in parts:
            assert p.assignment is not None
            assign[row : row + p.template.size, : p.assignment.shape[1]] = p.assignment
            row += p.template.size
    return _Result(
        np.concatenate([p.template for p in parts]),
        np.concatenate([p.counts for p in parts]).reshape(-1, k),
        np.concatenate([p.log_score for p in parts]),
        np.concatenate([p.method for p in parts]),
        assign,
        n_bruteforce=sum(p.n_bruteforce for p in parts),
        n_dp_updates=sum(p.n_dp_updates for p in parts),
    )


# =============================================================================
# the plan: what depends on the templates and k only, computed once and cached
# =============================================================================
@dataclass(frozen=True, eq=False)
class _BFGroup:
    """Templates with ``n`` sites each, enumerated outright.

    The composition of every assignment depends on multiplicities only, so
    the grouping of assignments by (template, counts) is precomputed:
    ``perm`` lists the flat (template, assignment) indices sorted by
    (template, counts), ``seg_start`` starts each (template, counts) segment.
    """

    templates: np.ndarray  # (T,)
    rows: np.ndarray  # (T, n) library site rows
    assign: np.ndarray  # (A, n) int8
    perm: np.ndarray  # (T * A,) int64
    seg_start: np.ndarray  # (n_seg,) int64
    seg_template: np.ndarray  # (n_seg,) int64, local template index
    seg_counts: np.ndarray  # (n_seg, k) int64, reduced multiplicity units


@dataclass(frozen=True, eq=False)
class _DPBlock:
    """Templates stacked for the programme; sites padded at the front."""

    templates: np.ndarray  # (T,)
    slot: np.ndarray  # (T, npad) library site row, n_sites for padding
    real: np.ndarray  # (T, npad) bool
    m: np.ndarray  # (T, npad) reduced multiplicities, 0 for padding
    bound: np.ndarray  # (npad,) largest count reachable after each step
    # per step: (u, additive mask over templates: 0 where m == u, else -inf; None if all)
    shifts: tuple[tuple[tuple[int, np.ndarray | None], ...], ...]
    total: np.ndarray  # (T,) reduced totals
    states: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray, np.ndarray]] = field(
        default_factory=dict
    )


@dataclass(frozen=True, eq=False)
class _Plan:
    bruteforce: tuple[_BFGroup, ...]
    dp: tuple[_DPBlock, ...]


def _plan(library: TemplateLibrary, k: int, templates: np.ndarray) -> _Plan:
    key = (k, templates.size, hash(templates.tobytes()))
    cache = library._plans
    plan = cache.get(key)
    if plan is None:
        plan = _make_plan(library, k, templates)
        if templates.size < 256:  # cheap to rebuild; keep the big plans in the cache
            return plan
        plans = [c for c in cache if c[0] != "logl"]
        if len(plans) >= 8:
            del cache[plans[0]]
        cache[key] = plan
    return plan


def _make_plan(library: TemplateLibrary, k: int, templates: np.ndarray) -> _Plan:
    _, mr, total = library._reduced
    n = library.n_unique_sites
    start = library.site_start
    templates = templates[n[templates] >= k]  # fewer sites than elements: no candidate
    nt = n[templates]
    # cost model per template: brute-force assignments vs. DP state updates
    small = nt * math.log(k) <= math.log(max(_BF_MAX_ASSIGNMENTS, 1)) + 1e-9
    small &= _BF_MAX_ASSIGNMENTS > 0
    bf_cost = np.where(small, float(k) ** np.where(small, nt, 0), np.inf)
    use_bf = small & (bf_cost * nt <= _BF_ADVANTAGE * _dp_cost(mr, start, templates, k))
    bf_t = templates[use_bf]
    groups = tuple(
        _bf_group(mr, start, total, bf_t[n[bf_t] == nsite], int(nsite), k)
        for nsite in np.unique(n[bf_t]).tolist()
    )
    blocks = tuple(
        _dp_block(mr, start, total, blk, k, library.n_sites)
        for blk in _dp_blocks(templates[~use_bf], n, total, k)
    )
    return _Plan(groups, blocks)


def _site_log_likelihood(
    library: TemplateLibrary, zs: np.ndarray, min_site_likelihood: float | None
) -> np.ndarray:
    """(n_sites + 1, k) float64 log-likelihoods of the elements, a zero row for padding.

    The last one is cached on the library (ranking re-enumerates the top
    templates with the same elements to recover their assignments).
    """
    if min_site_likelihood is not None and not 0 < min_site_likelihood <= 1:
        raise AfpxError(f"min_site_likelihood must lie in (0, 1], got {min_site_likelihood}")
    key = (tuple(zs.tolist()), min_site_likelihood)
    cache = library._plans
    hit = cache.get(("logl", key))
    if hit is not None:
        return hit
    logl = np.empty((library.n_sites + 1, zs.size))
    logl[:-1] = library.log_likelihood[:, zs - 1]
    logl[-1] = 0.0
    if min_site_likelihood is not None:
        body = logl[:-1]
        body[body < math.log(min_site_likelihood)] = -np.inf
    for old in [c for c in cache if c[0] == "logl"]:
        del cache[old]
    cache[("logl", key)] = logl
    return logl


def _dp_cost(mr: np.ndarray, start: np.ndarray, templates: np.ndarray, k: int) -> np.ndarray:
    """State updates of the programme per template (sites in increasing multiplicity)."""
    if templates.size == 0:
        return np.zeros(0)
    n = start[templates + 1] - start[templates]
    rows = _ranges(start[templates], n)
    owner = np.repeat(np.arange(templates.size), n)
    m = mr[rows]
    order = np.lexsort((m, owner))
    prefix = np.cumsum(m[order])
    first = np.concatenate([[0], np.cumsum(n)[:-1]])
    base = np.repeat(prefix[first] - m[order][first], n)
    p = (prefix - base).astype(np.float64)
    cells = (p + 1.0) ** (k - 1) * k
    return np.add.reduceat(cells, first)


# =============================================================================
# kernels: brute force
# =============================================================================
@functools.lru_cache(maxsize=64)
def _surjections(k: int, n: int) -> np.ndarray:
    """(A, n) int8: every assignment of k elements to n sites using each element."""
    grid = np.indices((k,) * n, dtype=np.int8).reshape(n, -1).T
    used = np.zeros((grid.shape[0], k), dtype=bool)
    for s in range(n):
        used[np.arange(grid.shape[0]), grid[:, s]] = True
    out = np.ascontiguousarray(grid[used.all(axis=1)])
    out.flags.writeable = False
    return out


def _bf_group(
    mr: np.ndarray, start: np.ndarray, total: np.ndarray, templates: np.ndarray, n: int, k: int
) -> _BFGroup:
    A = _surjections(k, n)
    n_assign = A.shape[0]
    T = templates.size
    rows = start[templates][:, None] + np.arange(n)[None, :]
    m = mr[rows]
    counts = np.stack([(m[:, None, :] * (A[None, :, :] == e)).sum(axis=2) for e in range(k)], -1)
    # lexicographic code of (c_0, ..., c_{k-2}); c_{k-1} is the rest
    B = int(total[templates].max()) + 1
    d = k - 1
    weights = np.asarray([B ** (d - 1 - e) for e in range(d)], dtype=np.int64)
    code = counts[:, :, :d] @ weights if d else np.zeros((T, n_assign), dtype=np.int64)
    key = (np.arange(T)[:, None] * B**d + code).ravel()
    perm = np.argsort(key, kind="stable")
    sk = key[perm]
    seg_start = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
    first = perm[seg_start]
    return _BFGroup(
        templates=templates,
        rows=rows,
        assign=A,
        perm=perm,
        seg_start=seg_start,
        seg_template=first // n_assign,
        seg_counts=counts.reshape(T * n_assign, k)[first],
    )


def _bruteforce(logl: np.ndarray, grp: _BFGroup, k: int, *, assignments: bool) -> _Result:
    """Enumerate every surjective assignment of a group of templates."""
    A = grp.assign
    T, n = grp.rows.shape
    L = logl[grp.rows]  # (T, n, k)
    # sequential sum over sites: the same additions, in the same order, as the programme
    score = np.zeros((T, A.shape[0]))
    for s in range(n):
        score += L[:, s, :][:, A[:, s]]
    flat = score.ravel()[grp.perm]
    best = np.maximum.reduceat(flat, grp.seg_start)
    seg_len = np.diff(np.r_[grp.seg_start, flat.size])
    # the first assignment (in enumeration order) reaching each segment's maximum
    pos = np.flatnonzero(flat == np.repeat(best, seg_len))
    seg_of = np.repeat(np.arange(grp.seg_start.size), seg_len)[pos]
    first = pos[np.r_[True, seg_of[1:] != seg_of[:-1]]]
    ok = np.isfinite(best)
    a = grp.perm[first[ok]] % A.shape[0]
    tl = grp.seg_template[ok]
    return _Result(
        template=grp.templates[tl],
        counts=grp.seg_counts[ok],
        log_score=best[ok],
        method=np.zeros(tl.size, dtype=np.int8),
        assignment=A[a] if assignments else None,
        n_bruteforce=T * A.shape[0],
    )


# =============================================================================
# kernels: max-plus dynamic programme
# =============================================================================
def _dp_blocks(templates: np.ndarray, n: np.ndarray, total: np.ndarray, k: int) -> list[np.ndarray]:
    """Stack templates of similar (sites, total) into blocks within a memory budget."""
    if templates.size == 0:
        return []
    nt, Mt = n[templates], total[templates]
    # geometric buckets: padding wastes at most a bucket's ratio per dimension
    bucket_n = np.floor(np.log(nt) / math.log(_BUCKET_SITES)).astype(np.int64)
    bucket_m = np.floor(np.log(Mt + 1) / math.log(_BUCKET_TOTAL)).astype(np.int64)
    order = np.lexsort((nt, Mt, bucket_n, bucket_m))
    blocks: list[np.ndarray] = []
    keys = bucket_m[order] * 10_000 + bucket_n[order]
    cuts = np.flatnonzero(np.diff(keys)) + 1
    for grp in np.split(order, cuts):
        tt = templates[grp]
        nmax, mmax = int(n[tt].max()), int(total[tt].max())
        # three live tables (two buffers and a temporary) of the final size
        per_template = 3 * 8.0 * (mmax + 1) ** (k - 1)
        if per_template > _MAX_TABLE_BYTES:
            big = tt[np.argmax(total[tt])]
            raise AfpxError(
                f"a set of {k} elements on template {int(big)} ({nmax} unique sites, "
                f"{mmax} atoms after reduction) needs more than "
                f"{_MAX_TABLE_BYTES / 2**30:g} GiB of states; restrict templates with "
                "max_unique_sites (--max-sites) or use fewer elements"
            )
        # stacked final tables small enough to stay in cache between passes
        size = max(1, int(_BLOCK_BYTES // (8.0 * (mmax + 1) ** (k - 1))))
        for lo in range(0, tt.size, size):
            blocks.append(tt[lo : lo + size])
    return blocks


def _dp_block(
    mr: np.ndarray, start: np.ndarray, total: np.ndarray, templates: np.ndarray, k: int, pad: int
) -> _DPBlock:
    T = templates.size
    n_t = start[templates + 1] - start[templates]
    npad = int(n_t.max())
    # padding sites (multiplicity 0, log-likelihood 0) first, then each template's
    # sites in increasing multiplicity, so that the reachable counts grow slowly
    slot = np.full((T, npad), pad, dtype=np.int64)
    for_t = np.repeat(np.arange(T), n_t)
    rows = _ranges(start[templates], n_t)
    rows = rows[np.lexsort((mr[rows], for_t))]
    within = np.arange(rows.size) - np.repeat(np.cumsum(n_t) - n_t, n_t)
    slot[for_t, npad - np.repeat(n_t, n_t) + within] = rows
    real = slot < pad
    m = np.where(real, mr[np.minimum(slot, pad - 1)], 0)
    bound = np.cumsum(m, axis=1).max(axis=0)
    shifts = []
    for s in range(npad):
        step = []
        for u in np.unique(m[:, s]).tolist():
            if u > 0:
                rows = m[:, s] == u
                # -inf for templates whose site here has another multiplicity
                mask = None if rows.all() else np.where(rows, 0.0, -np.inf)
                step.append((int(u), mask))
        shifts.append(tuple(step))
    return _DPBlock(templates, slot, real, m, bound, tuple(shifts), total[templates])


def _dp(logl: np.ndarray, blk: _DPBlock, k: int, *, assignments: bool) -> _Result:
    """Max-plus programme over count vectors for a block of templates.

    Tables are state-major, shape ``(p + 1, ..., p + 1, T)`` (``k - 1`` count
    axes, then templates), ``p`` the largest count reachable so far: the shift
    of a table by a site's multiplicity ``u`` along a count axis is then a
    slice whose inner loop runs over all templates. Templates whose site at
    this step has another multiplicity take part with a log-likelihood of
    -inf, so one slice serves every template with that ``u``. Tables live in
    two reused buffers (or fresh arrays when kept for backtracking).
    """
    d = k - 1
    T, npad = blk.slot.shape
    # (npad, k, T): each step's likelihoods contiguous along templates
    L = np.ascontiguousarray(logl[blk.slot.T].transpose(0, 2, 1))
    p_last = int(blk.bound[-1])
    size = T * (p_last + 1) ** d
    if assignments:
        kept = 8.0 * T * float(((blk.bound.astype(np.float64) + 1) ** d).sum())
        if kept > _MAX_TABLE_BYTES:
            raise AfpxError(
                f"backtracking the assignments of {T} template(s) with {npad} unique sites "
                f"and {k} elements needs {kept / 2**30:.1f} GiB of tables; ask for scores "
                "only (assignments=False) or use fewer elements"
            )
    bufs = (np.empty(size), np.empty(size)) if not assignments else ()
    tmp = np.empty(size)
    V = np.zeros((1,) * d + (T,))  # before any site: all counts zero, score 0
    tables: list[np.ndarray] = [V]
    updates = 0
    for s in range(npad):
        pp = V.shape[0] - 1 if d else 0
        p = int(blk.bound[s])
        shape = (*((p + 1,) * d), T)
        n_out = T * (p + 1) ** d
        out = (bufs[s % 2][:n_out] if bufs else np.empty(n_out)).reshape(shape)
        if d >= _BAND_MIN_DIMS and n_out >= _BAND_MIN_CELLS:
            _step_banded(V, out, L[s], blk.shifts[s], tmp, pp, p, d)
        else:
            _step(V, out, L[s], blk.shifts[s], tmp, pp, p, d)
        updates += n_out * k
        V = out
        if assignments:
            tables.append(V)

    # candidates: every count positive, the implied last count positive
    flat, tl, counts = _dp_states(blk, k, V.shape)
    score = V.reshape(-1)[flat]
    ok = np.isfinite(score)
    if not ok.all():
        tl, counts, score = tl[ok], counts[ok], score[ok]
    assign = None
    if assignments:
        padded = _backtrack(tables, L, blk.m, tl, counts[:, :d], score, k)
        # from padded, multiplicity-sorted slots back to library site order
        n_t = blk.real.sum(axis=1)
        lib_assign = np.full((tl.size, int(n_t.max())), -1, dtype=np.int8)
        first_row = np.where(blk.real, blk.slot, np.iinfo(np.int64).max).min(axis=1)
        r, cpos = np.nonzero(blk.real[tl])
        lib_assign[r, blk.slot[tl[r], cpos] - first_row[tl[r]]] = padded[r, cpos]
        assign = lib_assign
    return _Result(
        template=blk.templates[tl],
        counts=counts,
        log_score=score,
        method=np.ones(tl.size, dtype=np.int8),
        assignment=assign,
        n_dp_updates=updates,
    )


def _step(
    V: np.ndarray,
    out: np.ndarray,
    Ls: np.ndarray,
    shifts: tuple[tuple[int, np.ndarray | None], ...],
    tmp: np.ndarray,
    pp: int,
    p: int,
    d: int,
) -> None:
    """Advance the tables ``V`` (counts up to ``pp``) by one site into ``out`` (up to ``p``)."""
    T = Ls.shape[1]
    # with few templates, a (T,) operand broadcast over the count axes keeps numpy's
    # inner loop T long; repeating it along the last count axis lets it coalesce
    spread = d >= 2 and T < _SPREAD_BELOW

    def row(lik: np.ndarray, n: int) -> np.ndarray:
        return np.tile(lik, (n, 1)) if spread else lik

    # the last element leaves the counts unchanged; what it cannot reach is -inf
    old = (slice(0, pp + 1),) * d
    np.add(V, row(Ls[d], pp + 1), out=out[old])
    for e in range(d):
        rest = (*((slice(0, pp + 1),) * e), slice(pp + 1, None))
        out[rest] = -np.inf
    for u, lik_mask in shifts:
        hi = min(pp, p - u)  # source counts that stay within the new bound
        if hi < 0:
            continue
        for e in range(d):
            lik = Ls[e] if lik_mask is None else Ls[e] + lik_mask
            src = [slice(0, pp + 1)] * d
            dst = [slice(0, pp + 1)] * d
            src[e] = slice(0, hi + 1)
            dst[e] = slice(u, u + hi + 1)
            source = V[tuple(src)]
            shifted = tmp[: source.size].reshape(source.shape)
            np.add(source, row(lik, source.shape[d - 1]), out=shifted)
            target = out[tuple(dst)]
            np.maximum(target, shifted, out=target)


def _step_banded(
    V: np.ndarray,
    out: np.ndarray,
    Ls: np.ndarray,
    shifts: tuple[tuple[int, np.ndarray | None], ...],
    tmp: np.ndarray,
    pp: int,
    p: int,
    d: int,
) -> None:
    """:func:`_step` restricted to bands of the first count axis.

    Reachable states have ``c_0 + ... + c_{d-1} <= pp``: a band of rows
    starting at ``c_0 = a`` only needs ``c_e <= pp - a`` on the other axes,
    which skips most of the unreachable corner of the cube for four or more
    elements. Everything not written is -inf.
    """
    out.fill(-np.inf)
    edges = np.unique(np.linspace(0, pp + 1, _BANDS + 1).round().astype(int))
    bands = list(zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True))
    # every band's own states first: shifts into later rows must not be overwritten
    for a, b in bands:
        rest = (slice(0, pp + 1 - a),) * (d - 1)
        np.add(V[(slice(a, b), *rest)], Ls[d], out=out[(slice(a, b), *rest)])
    for a, b in bands:
        w = pp + 1 - a  # extent of the other axes in this band
        rest = (slice(0, w),) * (d - 1)
        for u, lik_mask in shifts:
            for e in range(d):
                lik = Ls[e] if lik_mask is None else Ls[e] + lik_mask
                src = [slice(a, b), *rest]
                dst = [slice(a, b), *rest]
                if e == 0:
                    rows = min(b, p - u + 1) - a
                    if rows <= 0:
                        continue
                    src[0] = slice(a, a + rows)
                    dst[0] = slice(a + u, a + u + rows)
                else:
                    cols = min(w, p - u + 1)
                    if cols <= 0:
                        continue
                    src[e] = slice(0, cols)
                    dst[e] = slice(u, u + cols)
                source = V[tuple(src)]
                shifted = tmp[: source.size].reshape(source.shape)
                np.add(source, lik, out=shifted)
                target = out[tuple(dst)]
                np.maximum(target, shifted, out=target)


def _dp_states(
    blk: _DPBlock, k: int, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The final table's entries that are candidates: flat index, template, counts.

    A state is a candidate when every tracked count and the implied last count
    are positive. Ordered by template, then counts. Cached on the block (it
    depends on multiplicities only).
    """
    cached = blk.states.get(shape)
    if cached is not None:
        return cached
    d = k - 1
    M = blk.total
    if d:
        grids = np.indices(shape[:-1], sparse=True)
        csum = sum(grids, np.zeros((1,) * d, dtype=np.int64))
        ok = csum[..., None] <= (M - 1)
        for gcoord in grids:
            ok = ok & (gcoord[..., None] >= 1)
    else:
        ok = np.ones(shape, dtype=bool)
    hits = np.nonzero(ok)
    flat = np.ravel_multi_index(hits, shape)
    tl = hits[-1]
    counts = np.empty((flat.size, k), dtype=np.int64)
    for e in range(d):
        counts[:, e] = hits[e]
    counts[:, d] = M[tl] - counts[:, :d].sum(axis=1)
    order = np.argsort(tl, kind="stable")  # by template, then counts (row-major order)
    out = (flat[order], tl[order], counts[order])
    blk.states[shape] = out
    return out


def _backtrack(
    tables: list[np.ndarray],
    L: np.ndarray,
    m: np.ndarray,
    tl: np.ndarray,
    cc: np.ndarray,
    score: np.ndarray,
    k: int,
) -> np.ndarray:
    """Recover an optimal assignment per candidate from the stored tables.

    The forward pass computed each table entry as the maximum of exactly the
    float sums recomputed here, so an optimal predecessor matches with ``==``.
    """
    d = k - 1
    N = tl.size
    npad = m.shape[1]
    out = np.full((N, npad), -1, dtype=np.int8)
    c = cc.copy()
    val = score.copy()
    for s in range(npad - 1, -1, -1):
        prev = tables[s]
        p_prev = prev.shape[0] - 1 if d else 0
        chosen = np.full(N, -1, dtype=np.int64)
        best_val = np.full(N, np.nan)
        # the forward pass's order: last element first
        for e in [d, *range(d)]:
            cp = c.copy()
            if e < d:
                cp[:, e] -= m[tl, s]
            inside = (cp >= 0).all(axis=1) & (cp <= p_prev).all(axis=1)
            todo = np.flatnonzero((chosen < 0) & inside)
            if todo.size == 0:
                continue
            before = prev[(*cp[todo].T, tl[todo])]
            hit = todo[before + L[s, e, tl[todo]] == val[todo]]
            chosen[hit] = e
            best_val[hit] = prev[(*cp[hit].T, tl[hit])]
        if np.any(chosen < 0):  # pragma: no cover - would be a bug in the forward pass
            raise AssertionError("backtracking found no optimal predecessor")
        move = np.flatnonzero(chosen < d)
        if d:
            c[move, chosen[move]] -= m[tl[move], s]
        val = best_val
        out[:, s] = chosen
    return out


# =============================================================================
# compositions and formulas
# =============================================================================
# (N, k) arrays with a small k: numpy pays a per-row overhead when it broadcasts
# or reduces along the short axis, so the helpers below work column by column.
def _scale_rows(counts: np.ndarray, factor: np.ndarray) -> np.ndarray:
    out = np.empty(counts.shape, dtype=np.int64)
    for e in range(counts.shape[1]):
        np.multiply(counts[:, e], factor, out=out[:, e])
    return out


def _row_gcd(counts: np.ndarray) -> np.ndarray:
    g = np.zeros(counts.shape[0], dtype=np.int64)
    for e in range(counts.shape[1]):
        g = np.gcd(g, counts[:, e])
    return g


def _reduce_rows(counts: np.ndarray) -> np.ndarray:
    """Divide each row of a (N, k) int array by its gcd (rows of zeros stay zero)."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.size == 0:
        return counts.reshape(counts.shape[0], counts.shape[-1] if counts.ndim == 2 else 0)
    g = _row_gcd(counts)
    g[g == 0] = 1
    out = np.empty(counts.shape, dtype=np.int64)
    for e in range(counts.shape[1]):
        np.floor_divide(counts[:, e], g, out=out[:, e])
    return out


def reduce_compositions(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reduced compositions of count vectors, grouped.

    Parameters
    ----------
    counts : ndarray of shape (N, k), int
        Counts per element (any common factor).

    Returns
    -------
    inverse : ndarray of shape (N,), int64
        Row of ``unique`` for each input row.
    unique : ndarray of shape (U, k), int64
        Distinct reduced compositions (each row divided by its gcd).
    """
    # group first, then take gcds of the distinct rows only (gcd is the slow part)
    inv_raw, raw = composition_index(counts)
    inv_red, unique = composition_index(_reduce_rows(raw))
    return inv_red[inv_raw], unique


def composition_index(reduced: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group identical rows of a (N, k) int array.

    Returns
    -------
    inverse : ndarray of shape (N,), int64
        Row of ``unique`` for each input row.
    unique : ndarray of shape (U, k), int64
        Distinct rows in lexicographic order.
    """
    reduced = np.asarray(reduced, dtype=np.int64)
    N = reduced.shape[0]
    k = reduced.shape[1] if reduced.ndim == 2 else 0
    if N == 0:
        return np.zeros(0, dtype=np.int64), reduced.reshape(0, k)
    base = int(reduced.max()) + 1
    if k and base**k <= 1 << 24:
        # dense table: linear time instead of a sort
        weights = base ** np.arange(k - 1, -1, -1, dtype=np.int64)
        key = np.zeros(N, dtype=np.int64)
        for e in range(k):
            key += reduced[:, e] * weights[e]
        present = np.zeros(base**k, dtype=bool)
        present[key] = True
        ukeys = np.flatnonzero(present)
        lookup = np.zeros(base**k, dtype=np.int64)
        lookup[ukeys] = np.arange(ukeys.size)
        unique = np.empty((ukeys.size, k), dtype=np.int64)
        for e in range(k):
            unique[:, e] = (ukeys // weights[e]) % base
        return lookup[key], unique
    if k and base**k < 1 << 62:
        # one int64 key per row: a 1-D sort, much faster than unique rows
        weights = base ** np.arange(k - 1, -1, -1, dtype=np.int64)
        key = np.zeros(N, dtype=np.int64)
        for e in range(k):
            key += reduced[:, e] * weights[e]
        ukeys, inverse = np.unique(key, return_inverse=True)
        unique = np.empty((ukeys.size, k), dtype=np.int64)
        for e in range(k):
            unique[:, e] = (ukeys // weights[e]) % base
        return inverse.reshape(-1).astype(np.int64), unique
    unique, inverse = np.unique(reduced, axis=0, return_inverse=True)
    return inverse.reshape(-1).astype(np.int64), unique


@functools.lru_cache(maxsize=1)
def _symbols() -> tuple[str, ...]:
    return tuple(schema.element_symbols())


def _symbol(z: int) -> str:
    return _symbols()[z - 1]


@functools.lru_cache(maxsize=256)
def _electronegativity(symbol: str) -> float:
    import warnings

    from pymatgen.core.periodic_table import Element

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymatgen warns for elements without X
        return float(Element(symbol).X)


def reduced_formulas(reduced: np.ndarray, symbols: Sequence[str]) -> np.ndarray:
    """Reduced formulas of integer compositions, as pymatgen writes them.

    Reproduces ``Composition.reduced_formula`` (electronegativity order with
    an alphabetical tie-break, the polyanion rule, and pymatgen's special
    formulas such as Li2O2) for many compositions of one element set at once,
    without building a Composition per row.

    Parameters
    ----------
    reduced : ndarray of shape (U, k), int
        Non-negative counts per element (zeros are omitted; rows are reduced
        by their gcd here).
    symbols : sequence of str, length k
        Element symbols of the columns.

    Returns
    -------
    ndarray of shape (U,), object (str)

    Examples
    --------
    >>> reduced_formulas(np.array([[2, 4], [1, 1]]), ["Mn", "Ge"]).tolist()
    ['MnGe2', 'MnGe']
    """
    from pymatgen.core.composition import Composition

    r = _reduce_rows(np.asarray(reduced, dtype=np.int64))
    U, k = r.shape
    out = np.full(U, "", dtype=object)
    if U == 0:
        return out
    xs = [_electronegativity(sym) for sym in symbols]
    order = sorted(range(k), key=lambda i: (math.inf if math.isnan(xs[i]) else xs[i], symbols[i]))
    # "Mn", "Mn2", ... per element: one lookup per entry instead of a str() call
    top = int(r.max())
    piece = [
        np.asarray(
            [""] + [symbols[i] + ("" if n == 1 else str(n)) for n in range(1, top + 1)],
            dtype=object,
        )
        for i in range(k)
    ]
    special: Mapping[str, str] = Composition.special_formulas
    present = r > 0
    patterns, pinv = np.unique(present, axis=0, return_inverse=True)
    pinv = pinv.reshape(-1)
    for pi, pat in enumerate(patterns):
        rows = np.flatnonzero(pinv == pi) if patterns.shape[0] > 1 else np.arange(U)
        syms = [i for i in order if pat[i]]
        sub = r[rows]
        poly = np.zeros(rows.size, dtype=bool)
        if len(syms) >= 3:
            a, b = syms[-2], syms[-1]
            if xs[b] - xs[a] < 1.65:  # NaN compares False, as in pymatgen
                poly = np.gcd(sub[:, a], sub[:, b]) != 1
        text = np.full(rows.size, "", dtype=object)
        for i in syms:
            text = text + piece[i][sub[:, i]]
        for j in np.flatnonzero(poly):
            # pymatgen writes a polyanion of the last two elements as (AB)n
            a, b = syms[-2], syms[-1]
            f = math.gcd(int(sub[j, a]), int(sub[j, b]))
            head = "".join(piece[i][sub[j, i]] for i in syms[:-2])
            inner = piece[a][sub[j, a] // f] + piece[b][sub[j, b] // f]
            text[j] = f"{head}({inner}){f}"
        if len(syms) <= 2 and {symbols[i] for i in syms} <= _special_symbols(special):
            text = np.asarray([special.get(f, f) for f in text], dtype=object)
        out[rows] = text
    return out


@functools.lru_cache(maxsize=1)
def _special_symbols_cached(keys: tuple[str, ...]) -> frozenset[str]:
    # elements of pymatgen's special formulas (``LiO`` → ``Li2O2``, ``O`` → ``O2``, ...)
    import re

    return frozenset(re.findall(r"[A-Z][a-z]?", "".join(keys)))


def _special_symbols(special: Mapping[str, str]) -> frozenset[str]:
    return _special_symbols_cached(tuple(special))


# =============================================================================
# helpers
# =============================================================================
def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(s, s + n)`` for each (start, length) pair."""
    starts = np.asarray(starts, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    return np.arange(total, dtype=np.int64) + offsets


def _log_likelihood(likelihood: np.ndarray) -> np.ndarray:
    lik = np.clip(np.asarray(likelihood, dtype=np.float32), LIKELIHOOD_FLOOR, 1.0)
    return np.log(lik).astype(np.float32)


def _jsonable(value: Any) -> Any:
    """A JSON-able copy of attrs (numpy scalars and arrays become Python values)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)
