"""The template library: every known structure's unique sites, multiplicities and likelihoods."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from afpx import AfpxError, schema
from afpx.templates.compositions import reduce_rows
from afpx.templates.util import check_elements, index_ranges, jsonable

if TYPE_CHECKING:
    import xarray as xr

__all__ = [
    "LIKELIHOOD_FLOOR",
    "LazyLogLikelihood",
    "TemplateGeometry",
    "TemplateLibrary",
    "own_counts",
]

#: Likelihoods are clipped to at least this before taking logs (a float32
#: sigmoid can underflow to exactly 0; the log of the floor is -69.1).
LIKELIHOOD_FLOOR: Final = 1e-30


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
        rows = index_ranges(self.atom_start[templates], counts)
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


class LazyLogLikelihood:
    """(n_sites, 118) log-likelihoods read one element column at a time, on first use.

    What the packed default library hands to :class:`TemplateLibrary`: ranking
    an element set reads only its k columns (``[:, columns]``); anything else
    (``numpy.asarray``, other indexing, arithmetic) reads every column once and
    keeps the whole array. Columns are cached; safe to share between threads.

    Parameters
    ----------
    n_sites : int
    read : callable
        ``read(z) -> ndarray of shape (n_sites,)``: the column of atomic number z.
    dtype : numpy dtype
        What ``read`` returns.
    """

    def __init__(
        self, n_sites: int, read: Callable[[int], np.ndarray], dtype: Any = np.float32
    ) -> None:
        self.shape: tuple[int, int] = (int(n_sites), schema.N_ELEMENTS)
        self.dtype = np.dtype(dtype)
        self.ndim = 2
        self._read = read
        self._columns: dict[int, np.ndarray] = {}
        self._full: np.ndarray | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self) -> dict[str, Any]:
        # picklable (Dask process workers) when ``read`` is: everything but the lock
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def columns(self, index: np.ndarray) -> np.ndarray:
        """(n_sites, len(index)) the columns ``index`` (0-based, ``Z - 1``)."""
        idx = np.asarray(index, dtype=np.int64).reshape(-1)
        if self._full is not None:
            return self._full[:, idx]
        with self._lock:
            for c in np.unique(idx).tolist():
                if c not in self._columns:
                    col = np.asarray(self._read(c + 1), dtype=self.dtype)
                    if col.shape != (self.shape[0],):
                        raise AfpxError(
                            f"log-likelihood column of Z = {c + 1} has shape {col.shape}, "
                            f"expected ({self.shape[0]},)"
                        )
                    self._columns[c] = col
        out = np.empty((self.shape[0], idx.size), dtype=self.dtype)
        for j, c in enumerate(idx.tolist()):
            out[:, j] = self._columns[c]
        return out

    def __getitem__(self, key: Any) -> np.ndarray:
        if (
            isinstance(key, tuple)
            and len(key) == 2
            and isinstance(key[0], slice)
            and key[0] == slice(None)
        ):
            picked = np.arange(schema.N_ELEMENTS)[key[1]]
            if np.ndim(picked) == 0:
                return self.columns(np.asarray([picked]))[:, 0]
            return self.columns(picked)
        return np.asarray(self)[key]

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        if self._full is None:
            full = self.columns(np.arange(schema.N_ELEMENTS))
            with self._lock:
                self._full = full
                self._columns.clear()
        return self._full if dtype is None else self._full.astype(dtype)

    def astype(self, dtype: Any, **kwargs: Any) -> np.ndarray:
        return np.asarray(self).astype(dtype, **kwargs)

    def __sub__(self, other: Any) -> np.ndarray:
        return np.asarray(self) - other

    def __rsub__(self, other: Any) -> np.ndarray:
        return other - np.asarray(self)

    def __repr__(self) -> str:
        return (
            f"LazyLogLikelihood(shape={self.shape}, dtype={self.dtype}, "
            f"columns read={len(self._columns) if self._full is None else self.shape[1]})"
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
    log_likelihood : ndarray of shape (n_sites, 118), float32 (or float16)
        Log of the site likelihood of elements Z = 1..118 (column ``Z - 1``),
        likelihoods clipped to at least :data:`LIKELIHOOD_FLOOR`. The packed
        default library keeps its float16 values as stored; the engine reads
        the columns of an element set into float64 either way.
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
    def plan_cache(self) -> dict[tuple[Any, ...], Any]:
        # enumeration plans by (k, selected templates), which depend on multiplicities
        # only, and the last element set's log-likelihood columns
        return {}

    @functools.cached_property
    def reduced_multiplicities(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
            "likelihood_attrs": jsonable(dict(ds[var].attrs)),
        }
        for key in ("fingerprint", "filters", "draws", "afpx_version", "sources"):
            if key in ds.attrs:
                attrs[key] = jsonable(ds.attrs[key])
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
        rows = index_ranges(self.site_start[idx], n)

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
        zs = check_elements(elements)
        counts = own_counts(self, zs)
        red = reduce_rows(counts[(counts > 0).all(axis=1)])
        if red.size == 0:
            return red.reshape(0, zs.size)
        return np.unique(red, axis=0)


def own_counts(library: TemplateLibrary, zs: np.ndarray) -> np.ndarray:
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


def _log_likelihood(likelihood: np.ndarray) -> np.ndarray:
    lik = np.clip(np.asarray(likelihood, dtype=np.float32), LIKELIHOOD_FLOOR, 1.0)
    return np.log(lik).astype(np.float32)
