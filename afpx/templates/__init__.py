"""The one enumeration engine of afpx: templates, candidates, compositions, ties.

A *template* is a known structure stripped of its elements: its unique sites,
their multiplicities, and for every site the likelihood of each of the 118
elements. A *candidate* puts one element of a requested set on every unique
site, using every element at least once; its log score is the sum of its
sites' log likelihoods, its composition the multiplicity sum per element,
reduced by the greatest common divisor.

Modules, each one thing:

* :mod:`~afpx.templates.library` — :class:`TemplateLibrary` (and geometry);
* :mod:`~afpx.templates.compositions` — gcd reduction, grouping of count rows,
  reduced formulas, best candidate per composition;
* :mod:`~afpx.templates.bruteforce` — surjections and vectorised brute force;
* :mod:`~afpx.templates.maxplus` — the max-plus programme over counts;
* :mod:`~afpx.templates.plan` — which template goes to which method, cached
  per (k, templates) and shared by every element set, model and baseline;
* :mod:`~afpx.templates.candidates` — :func:`best_candidates`,
  :func:`best_assignments` (what ``afpx rank`` calls), per-template
  :func:`upper_bounds`;
* :mod:`~afpx.templates.census` — which compositions each template can take,
  whatever the scores (:func:`census`);
* :mod:`~afpx.templates.pruning` — :func:`top_candidates`: only the templates
  that can reach the rows asked for, exactly;
* :mod:`~afpx.templates.counting` — thresholded and counting variants
  (what ``afpx evaluate`` calls for Test 1 and Test 2);
* :mod:`~afpx.templates.ties` — the one tie rule, :func:`tie_ranks`.

Nothing here imports xarray, dask or torch at import time.
"""

from __future__ import annotations

from afpx.templates.candidates import (
    ASSIGNMENT,
    CANDIDATE,
    COUNTS,
    LIBRARY_TEMPLATE,
    LOG_SCORE,
    METHOD,
    REDUCED_COUNTS,
    TEMPLATE,
    TEMPLATE_FORMULA,
    TEMPLATE_N_SITES,
    TEMPLATE_SITE,
    TEMPLATE_SOURCE,
    TEMPLATE_SPACEGROUP,
    TEMPLATE_STRUCTURE_ID,
    CandidateOptions,
    best_assignments,
    best_candidates,
    candidates,
    enumerate_candidates,
    select_templates,
    upper_bounds,
)
from afpx.templates.census import Census, census
from afpx.templates.compositions import (
    RowFilter,
    composition_index,
    reduce_compositions,
    reduce_rows,
    reduced_formulas,
)
from afpx.templates.library import (
    LIKELIHOOD_FLOOR,
    LazyLogLikelihood,
    TemplateGeometry,
    TemplateLibrary,
)
from afpx.templates.pruning import TopCandidates, top_candidates
from afpx.templates.result import CandidateResult
from afpx.templates.ties import DEFAULT_TIE_TOLERANCE, TIE_RULE, TieRanks, tie_ranks, tie_width
from afpx.templates.util import check_elements, element_symbol, element_symbols

__all__ = [
    "ASSIGNMENT",
    "CANDIDATE",
    "COUNTS",
    "DEFAULT_TIE_TOLERANCE",
    "LIBRARY_TEMPLATE",
    "LIKELIHOOD_FLOOR",
    "LOG_SCORE",
    "METHOD",
    "REDUCED_COUNTS",
    "TEMPLATE",
    "TEMPLATE_FORMULA",
    "TEMPLATE_N_SITES",
    "TEMPLATE_SITE",
    "TEMPLATE_SOURCE",
    "TEMPLATE_SPACEGROUP",
    "TEMPLATE_STRUCTURE_ID",
    "TIE_RULE",
    "CandidateOptions",
    "CandidateResult",
    "Census",
    "LazyLogLikelihood",
    "RowFilter",
    "TemplateGeometry",
    "TemplateLibrary",
    "TieRanks",
    "TopCandidates",
    "best_assignments",
    "best_candidates",
    "candidates",
    "census",
    "check_elements",
    "composition_index",
    "element_symbol",
    "element_symbols",
    "enumerate_candidates",
    "reduce_compositions",
    "reduce_rows",
    "reduced_formulas",
    "select_templates",
    "tie_ranks",
    "tie_width",
    "top_candidates",
    "upper_bounds",
]
