"""The case study (the paper's Table 1): the ranked compositions of a few element sets.

Ranked exactly as ``afpx rank`` ranks them (:func:`afpx.rank.rank_rows`, the
one tie rule of :mod:`afpx.templates.ties`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from afpx.evaluate.params import EvaluateParams
from afpx.rank import rank_rows
from afpx.templates.candidates import CandidateOptions, candidates
from afpx.templates.compositions import match_rows, reduce_compositions
from afpx.templates.library import TemplateLibrary
from afpx.templates.util import check_elements, element_symbol, element_symbols

__all__ = ["case_study"]


def _formula(elements: Sequence[int], counts: Sequence[int]) -> str:
    from pymatgen.core import Composition

    symbols = element_symbols()
    comp = {symbols[z - 1]: int(c) for z, c in zip(elements, counts, strict=True) if c}
    return str(Composition(comp).reduced_formula) if comp else ""


def case_study(
    elements: tuple[int, ...],
    lib: TemplateLibrary,
    known: np.ndarray,
    params: EvaluateParams,
) -> dict[str, Any]:
    """The ranked compositions of one element set, as ``afpx rank`` lists them.

    Parameters
    ----------
    elements : tuple of int
        Sorted atomic numbers.
    lib : TemplateLibrary
        Templates with the likelihoods being evaluated.
    known : ndarray of shape (Q, k), int
        The set's known reduced compositions.
    params : EvaluateParams
        ``case_top`` rows are listed; ``tie_tolerance`` as everywhere.

    Returns
    -------
    dict
        ``n_compositions``, ``top`` (the first ``case_top`` rows) and
        ``known`` (every known composition with its rank; ``rank`` None when
        no candidate yields it).
    """
    zs = check_elements(list(elements))
    res, _ = candidates(lib, zs, CandidateOptions(), assignments=False)
    inverse, unique = reduce_compositions(res.counts)
    symbols = [element_symbol(int(z)) for z in zs]
    rows = rank_rows(
        res.template,
        inverse,
        unique,
        res.log_score,
        symbols,
        top=None,
        tie_tolerance=params.tie_tolerance,
    )
    kidx = match_rows(rows["counts"], np.asarray(known, dtype=np.int64).reshape(-1, zs.size))
    is_known = np.zeros(rows["counts"].shape[0], dtype=bool)
    is_known[kidx[kidx >= 0]] = True

    def row(i: int) -> dict[str, Any]:
        t = int(rows["template"][i])
        return {
            "formula": str(rows["formula"][i]),
            "rank": float(rows["rank"][i]),
            "rank_optimistic": int(rows["rank_optimistic"][i]),
            "rank_pessimistic": int(rows["rank_pessimistic"][i]),
            "log_score": float(rows["log_score"][i]),
            "known": bool(is_known[i]),
            "template": str(lib.structure_id[t]),
            "template_formula": str(lib.formula[t]),
            "template_spacegroup": int(lib.spacegroup[t]),
        }

    known_rows = []
    for j, comp in enumerate(np.asarray(known).tolist()):
        i = int(kidx[j])
        known_rows.append(row(i) if i >= 0 else {"formula": _formula(elements, comp), "rank": None})
    known_rows.sort(key=lambda r: (r["rank"] is None, r["rank"] or 0.0))
    return {
        "n_compositions": int(rows["n_compositions"]),
        "top": [row(i) for i in range(min(params.case_top, rows["counts"].shape[0]))],
        "known": known_rows,
    }
