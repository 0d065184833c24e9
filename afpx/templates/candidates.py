"""Best candidates: for an element set, the best candidate of every (template, composition).

Exact: every assignment of the elements to the unique sites of every
template is considered (brute force for small templates, the max-plus
programme for the others, following a cached :class:`~afpx.templates.plan.Plan`),
and every element is used at least once. Each template's multiplicities are
divided by their gcd first; the reduced composition of every candidate is
unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from afpx import AfpxError, schema
from afpx.templates.bruteforce import bruteforce_best
from afpx.templates.compositions import (
    RowFilter,
    match_rows,
    reduce_compositions,
    reduced_formulas,
)
from afpx.templates.library import TemplateLibrary, own_counts
from afpx.templates.maxplus import KeptTables, kept_table_bytes, maxplus_best, maxplus_forward
from afpx.templates.plan import plan_for, site_log_likelihood
from afpx.templates.result import CandidateResult, DeferredAssignments
from afpx.templates.util import check_elements, element_symbol, index_ranges, jsonable

if TYPE_CHECKING:
    import xarray as xr

__all__ = [
    "KEEP_TABLE_BYTES",
    "CandidateOptions",
    "best_assignments",
    "best_candidates",
    "candidates",
    "enumerate_candidates",
    "select_templates",
    "upper_bounds",
]

#: Tables of the programme that :func:`enumerate_candidates` keeps for a later
#: backtrack at most (beyond, a caller re-runs the templates it needs).
KEEP_TABLE_BYTES: Final = 256 * 2**20

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

    zs = check_elements(elements)
    opts = CandidateOptions(
        exclude_formulas=tuple(exclude_formulas),
        exclude_own_formula=exclude_own_formula,
        max_unique_sites=max_unique_sites,
        sources=None if sources is None else tuple(sources),
        min_likelihood=min_likelihood,
        min_site_likelihood=min_site_likelihood,
    )
    result, selected = candidates(library, zs, opts, assignments=assignments)
    inverse, unique = reduce_compositions(result.counts)
    symbols = [element_symbol(z) for z in zs.tolist()]
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
            "likelihood": jsonable(library.attrs.get("likelihood_attrs", {})),
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
    zs = check_elements(elements)
    t = np.asarray(templates, dtype=np.int64).reshape(-1)
    c = np.asarray(counts, dtype=np.int64).reshape(t.size, zs.size)
    uniq = np.unique(t)
    opts = CandidateOptions(min_site_likelihood=min_site_likelihood)
    g = library.reduced_multiplicities[0][t]
    if c.size and np.any(c % g[:, None]):
        bad = int(np.flatnonzero((c % g[:, None]).any(axis=1))[0])
        raise AfpxError(
            f"template {int(t[bad])} has no candidate with counts {c[bad].tolist()} "
            "that uses every element"
        )
    # backtrack only the rows asked for, in bulk
    only = RowFilter.of(t, c // g[:, None])
    res = enumerate_candidates(library, zs, uniq, opts, assignments=True, cache=False, only=only)
    width = int(library.n_unique_sites[uniq].max()) if uniq.size else 0
    out = np.full((t.size, width), -1, dtype=np.int8)
    score = np.full(t.size, np.nan)
    if res.template.size == 0:
        if t.size:
            raise AfpxError("no candidate of the requested templates uses every element")
        return out, score
    assert res.assignment is not None
    # match (template, counts) rows: one int64 code per row and a binary search
    key_res = np.concatenate([res.template[:, None], res.cell_counts(library)], axis=1)
    found = match_rows(key_res, np.concatenate([t[:, None], c], axis=1))
    if np.any(found < 0):
        bad = int(np.flatnonzero(found < 0)[0])
        raise AfpxError(
            f"template {int(t[bad])} has no candidate with counts {c[bad].tolist()} "
            "that uses every element"
        )
    out[:] = res.assignment[found, :width]
    score[:] = res.log_score[found]
    return out, score


def candidates(
    library: TemplateLibrary,
    zs: np.ndarray,
    opts: CandidateOptions,
    *,
    assignments: bool,
    keep_tables: bool = False,
) -> tuple[CandidateResult, np.ndarray]:
    """Enumerate, then apply the candidate-level options; also return the templates used.

    ``keep_tables``: see :func:`enumerate_candidates`.
    """
    selected = select_templates(library, zs.size, opts)
    result = enumerate_candidates(
        library, zs, selected, opts, assignments=assignments, keep_tables=keep_tables
    )
    if opts.exclude_own_formula and result.template.size:
        own = own_counts(library, zs)[result.template]
        keep = ~(own == result.cell_counts(library)).all(axis=1)
        result = result.take(np.flatnonzero(keep))
    if opts.min_likelihood is not None:
        if not opts.min_likelihood > 0:
            raise AfpxError(f"min_likelihood must be positive, got {opts.min_likelihood}")
        keep = result.log_score >= math.log(opts.min_likelihood)
        result = result.take(np.flatnonzero(keep))
    return result, selected


def select_templates(library: TemplateLibrary, k: int, opts: CandidateOptions) -> np.ndarray:
    """Library indices (ascending) of the templates that ``opts`` lets a set of k elements use."""
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


def upper_bounds(logl: np.ndarray, library: TemplateLibrary, templates: np.ndarray) -> np.ndarray:
    """An upper bound on the log score of every candidate of each template.

    Every site taking its best element gives ``sum_s max_e log p_{s,e}``; every
    element must also sit on a site of its own, which costs at least
    ``min_s (max_e' log p_{s,e'} - log p_{s,e})`` per element (the sites are
    distinct, the losses add up). The bound is that sum less those costs.

    Parameters
    ----------
    logl : ndarray of shape (n_sites + 1, k)
        From :func:`~afpx.templates.plan.site_log_likelihood` (every entry finite).
    library : TemplateLibrary
    templates : ndarray of shape (T,), int

    Returns
    -------
    ndarray of shape (T,), float64
        Raised by a relative 1e-9 so that the rounding of a candidate's sum
        (taken in another order) never crosses it.
    """
    start, n = library.site_start, library.n_unique_sites
    if templates.size == 0:
        return np.zeros(0)
    nt = n[templates]
    rows = index_ranges(start[templates], nt)
    sub = logl[rows]
    best = sub.max(axis=1)
    first = np.concatenate([[0], np.cumsum(nt)[:-1]])
    loss = np.minimum.reduceat(best[:, None] - sub, first, axis=0)
    ub = np.add.reduceat(best, first) - loss.sum(axis=1)
    return ub + 1e-9 * np.maximum(1.0, np.abs(ub))


def enumerate_candidates(
    library: TemplateLibrary,
    zs: np.ndarray,
    templates: np.ndarray,
    opts: CandidateOptions,
    *,
    assignments: bool,
    cache: bool = True,
    only: RowFilter | None = None,
    keep_tables: bool = False,
) -> CandidateResult:
    """Best candidate of every (template, counts) of ``templates`` (no candidate-level options).

    ``cache=False`` builds the plan without keeping it (for one-off subsets of
    templates); ``only`` (templates, counts in units of the template's
    multiplicity gcd) keeps just those candidates, so that backtracking their
    assignments costs only what was asked for.

    ``keep_tables`` (with ``assignments=False``) keeps the programme's tables
    when they take at most :data:`KEEP_TABLE_BYTES`, so that the
    ``deferred`` of the result gives the assignment of any candidate later
    without a second pass (a full ranking list: 170 MB for three elements over
    the default library); ``deferred`` is None when they would take more.
    """
    k = zs.size
    plan = plan_for(library, k, templates, cache=cache)
    logl = site_log_likelihood(library, zs, opts.min_site_likelihood)
    width = int(library.n_unique_sites[templates].max()) if templates.size else 0
    keep = keep_tables and not assignments
    keep = keep and sum(kept_table_bytes(blk, k) for blk in plan.dp) <= KEEP_TABLE_BYTES

    parts = [
        bruteforce_best(logl, grp, k, assignments=assignments or keep, only=only)
        for grp in plan.bruteforce
    ]
    kept: list[KeptTables] = []
    for blk in plan.dp:
        if keep:
            part, tables = maxplus_forward(logl, blk, k, keep_tables=True, only=only)
            assert tables is not None
            parts.append(part)
            kept.append(tables)
        else:
            parts.append(maxplus_best(logl, blk, k, assignments=assignments, only=only))
    if keep and parts:
        known: list[np.ndarray] = []
        for p in parts[: len(plan.bruteforce)]:
            assert p.assignment is not None  # brute force keeps them all
            known.append(p.assignment)
        starts = np.cumsum([0, *(p.template.size for p in parts)])
        deferred = DeferredAssignments(starts, (*known, *kept))
        result = CandidateResult.concat(parts, k)
        result.assignment = None
        result.deferred = deferred
        return result
    if not parts:
        return CandidateResult(
            np.zeros(0, np.int64),
            np.zeros((0, k), np.int64),
            np.zeros(0),
            np.zeros(0, np.int8),
            np.zeros((0, width), np.int8) if assignments else None,
        )
    result = CandidateResult.concat(parts, k)
    if assignments and result.assignment is not None and result.assignment.shape[1] < width:
        # pad to the widest template asked for, as an empty result is
        pad = np.full((result.assignment.shape[0], width), -1, dtype=np.int8)
        pad[:, : result.assignment.shape[1]] = result.assignment
        result.assignment = pad
    return result
