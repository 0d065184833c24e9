"""Compositions: gcd reduction, grouping of count rows, row codes, reduced formulas.

Count rows are ``(N, k)`` int arrays aligned with an element set. Everything
here is likelihood-free and shared by ranking and evaluation.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

from afpx import AfpxError, schema
from afpx.templates.elements import ELECTRONEGATIVITY, SPECIAL_FORMULAS, SYMBOLS

__all__ = [
    "CompositionRanking",
    "TemplateCompositions",
    "composition_index",
    "decode_rows",
    "match_rows",
    "rank_candidates",
    "reduce_compositions",
    "reduce_rows",
    "reduced_formulas",
    "row_codes",
    "row_gcd",
    "scale_rows",
    "template_compositions",
]


# (N, k) arrays with a small k: numpy pays a per-row overhead when it broadcasts
# or reduces along the short axis, so the helpers below work column by column.
def scale_rows(counts: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """Each row of ``counts`` (N, k) times ``factor`` (N,)."""
    out = np.empty(counts.shape, dtype=np.int64)
    for e in range(counts.shape[1]):
        np.multiply(counts[:, e], factor, out=out[:, e])
    return out


def row_gcd(counts: np.ndarray) -> np.ndarray:
    """Greatest common divisor of each row of ``counts`` (N, k)."""
    g = np.zeros(counts.shape[0], dtype=np.int64)
    for e in range(counts.shape[1]):
        g = np.gcd(g, counts[:, e])
    return g


def reduce_rows(counts: np.ndarray) -> np.ndarray:
    """Divide each row of a (N, k) int array by its gcd (rows of zeros stay zero)."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.size == 0:
        return counts.reshape(counts.shape[0], counts.shape[-1] if counts.ndim == 2 else 0)
    g = row_gcd(counts)
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
    inv_red, unique = composition_index(reduce_rows(raw))
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


_X_OF: Final[dict[str, float]] = dict(zip(SYMBOLS, ELECTRONEGATIVITY, strict=True))


def _electronegativity(symbol: str) -> float:
    return _X_OF.get(symbol, math.nan)


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
    r = reduce_rows(np.asarray(reduced, dtype=np.int64))
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
    special: Mapping[str, str] = SPECIAL_FORMULAS
    # rows grouped by which elements they hold
    patterns, pinv = _presence_patterns(r > 0)
    number = None
    for pi, pat in enumerate(patterns):
        rows = np.flatnonzero(pinv == pi) if len(patterns) > 1 else np.arange(U)
        syms = [i for i in order if pat[i]]
        sub = r[rows]
        text = np.full(rows.size, "", dtype=object)
        for i in syms:
            text = text + piece[i][sub[:, i]]
        if len(syms) >= 3 and xs[syms[-1]] - xs[syms[-2]] < 1.65:  # NaN compares False
            # pymatgen writes a polyanion of the last two elements as (AB)n
            a, b = syms[-2], syms[-1]
            f = np.gcd(sub[:, a], sub[:, b])
            poly = np.flatnonzero(f != 1)
            if poly.size:
                if number is None:
                    number = np.asarray([str(n) for n in range(top + 1)], dtype=object)
                sp, fp = sub[poly], f[poly]
                head = np.full(poly.size, "", dtype=object)
                for i in syms[:-2]:
                    head = head + piece[i][sp[:, i]]
                inner = piece[a][sp[:, a] // fp] + piece[b][sp[:, b] // fp]
                text[poly] = head + "(" + inner + ")" + number[fp]
        if len(syms) <= 2 and {symbols[i] for i in syms} <= _special_symbols(special):
            text = np.asarray([special.get(f, f) for f in text], dtype=object)
        out[rows] = text
    return out


def _presence_patterns(present: np.ndarray) -> tuple[list[list[bool]], np.ndarray]:
    """Distinct rows of a (U, k) bool array and the pattern of each row.

    One int64 code per row (a bit per element) when k allows, else a sort of the rows.
    """
    k = present.shape[1]
    if k > 62:
        patterns, inverse = np.unique(present, axis=0, return_inverse=True)
        return patterns.tolist(), inverse.reshape(-1)
    code = np.zeros(present.shape[0], dtype=np.int64)
    for i in range(k):
        code |= present[:, i].astype(np.int64) << i
    codes, inverse = np.unique(code, return_inverse=True)
    return [[bool(c >> i & 1) for i in range(k)] for c in codes.tolist()], inverse.reshape(-1)


@functools.lru_cache(maxsize=1)
def _special_symbols_cached(keys: tuple[str, ...]) -> frozenset[str]:
    # elements of pymatgen's special formulas (``LiO`` → ``Li2O2``, ``O`` → ``O2``, ...)
    import re

    return frozenset(re.findall(r"[A-Z][a-z]?", "".join(keys)))


def _special_symbols(special: Mapping[str, str]) -> frozenset[str]:
    return _special_symbols_cached(tuple(special))


@dataclass(frozen=True)
class TemplateCompositions:
    """Element set and reduced composition of every template of a library.

    Attributes
    ----------
    element_set : list of tuple of int
        Sorted atomic numbers of each template's true elements.
    counts : list of tuple of int
        Its reduced composition, aligned with ``element_set``.
    site_start : ndarray of shape (n_templates + 1,), int64
        Template t owns library sites ``site_start[t]:site_start[t + 1]``.
    """

    element_set: list[tuple[int, ...]]
    counts: list[tuple[int, ...]]
    site_start: np.ndarray

    def known(self) -> dict[tuple[int, ...], set[tuple[int, ...]]]:
        """The reduced compositions present among the templates, by element set."""
        out: dict[tuple[int, ...], set[tuple[int, ...]]] = {}
        for es, c in zip(self.element_set, self.counts, strict=True):
            out.setdefault(es, set()).add(c)
        return out


def template_compositions(
    site_template: np.ndarray, z: np.ndarray, multiplicity: np.ndarray
) -> TemplateCompositions:
    """Element sets and reduced compositions of templates from their sites.

    Parameters
    ----------
    site_template : ndarray of shape (n_sites,), int
        Template of each site, non-decreasing, covering 0..n_templates-1.
    z : ndarray of shape (n_sites,), int
        True atomic number of each site.
    multiplicity : ndarray of shape (n_sites,), int
        Multiplicity of each site.

    Returns
    -------
    TemplateCompositions
    """
    t = np.asarray(site_template).astype(np.int64)
    if t.size and (np.diff(t) < 0).any():
        raise AfpxError("site_template must be non-decreasing (sites grouped by template)")
    n_templates = int(t[-1]) + 1 if t.size else 0
    site_start = np.searchsorted(t, np.arange(n_templates + 1))
    key = t * (schema.N_ELEMENTS + 1) + np.asarray(z).astype(np.int64)
    uk, inv = np.unique(key, return_inverse=True)
    sums = np.bincount(inv, weights=np.asarray(multiplicity, dtype=np.float64)).astype(np.int64)
    tt, zz = np.divmod(uk, schema.N_ELEMENTS + 1)
    bounds = np.searchsorted(tt, np.arange(n_templates + 1))
    sets: list[tuple[int, ...]] = []
    counts: list[tuple[int, ...]] = []
    for i in range(n_templates):
        a, b = bounds[i], bounds[i + 1]
        c = sums[a:b]
        g = int(np.gcd.reduce(c)) if c.size else 1
        sets.append(tuple(int(v) for v in zz[a:b]))
        counts.append(tuple(int(v) // g for v in c))
    return TemplateCompositions(sets, counts, site_start)


def row_codes(rows: np.ndarray, base: int) -> np.ndarray:
    # one int64 per row of small non-negative ints (callers check base**k < 2**62)
    key = np.zeros(rows.shape[0], dtype=np.int64)
    for col in range(rows.shape[1]):
        key = key * base + rows[:, col]
    return key


def decode_rows(keys: np.ndarray, base: int, k: int) -> np.ndarray:
    # inverse of _row_keys
    out = np.empty((keys.size, k), dtype=np.int64)
    rest = np.asarray(keys, dtype=np.int64).copy()
    for col in range(k - 1, -1, -1):
        rest, out[:, col] = np.divmod(rest, base)
    return out


def match_rows(rows: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Index of each query row among ``rows`` (-1 where absent); rows are unique."""
    if rows.shape[0] == 0 or queries.shape[0] == 0:
        return np.full(queries.shape[0], -1, dtype=np.int64)
    k = rows.shape[1]
    base = int(max(rows.max(), queries.max())) + 1
    if k * math.log2(max(base, 2)) < 62:
        rk, qk = row_codes(rows, base), row_codes(queries, base)
        order = np.argsort(rk)
        pos = np.searchsorted(rk, qk, sorter=order)
        pos = np.clip(pos, 0, rk.size - 1)
        hit = rk[order[pos]] == qk
        return np.where(hit, order[pos], -1)
    lookup = {tuple(r): i for i, r in enumerate(rows.tolist())}
    return np.asarray([lookup.get(tuple(q), -1) for q in queries.tolist()], dtype=np.int64)


@dataclass(frozen=True)
class CompositionRanking:
    """Unique reduced compositions of an element set with their best candidate.

    Attributes
    ----------
    counts : ndarray of shape (N, k), int64
        Reduced composition (aligned with the element set).
    log_score : ndarray of shape (N,), float64
        Best log-score of any candidate yielding it.
    template : ndarray of shape (N,), int64
        Template of that best candidate (the lowest index among exact ties).
    row : ndarray of shape (N,), int64
        Its row in the candidate table.
    """

    counts: np.ndarray
    log_score: np.ndarray
    template: np.ndarray
    row: np.ndarray


def rank_candidates(
    template: np.ndarray,
    reduced: np.ndarray,
    log_score: np.ndarray,
    *,
    keep: np.ndarray | None = None,
) -> CompositionRanking:
    """Best candidate per unique reduced composition.

    Parameters
    ----------
    template : ndarray of shape (n_candidates,), int
        Template of each candidate.
    reduced : ndarray of shape (n_candidates, k), int
        Reduced composition of each candidate.
    log_score : ndarray of shape (n_candidates,), float
        Log-score of each candidate.
    keep : ndarray of shape (n_candidates,), bool, optional
        Candidates to consider (all by default).

    Returns
    -------
    CompositionRanking
        Compositions in the order of their first appearance in ``np.unique``
        (sorted rows), not ranked: rank them with :func:`tie_ranks`.
    """
    rows = np.arange(template.size) if keep is None else np.flatnonzero(keep)
    k = reduced.shape[1]
    if rows.size == 0:
        return CompositionRanking(
            np.zeros((0, k), np.int64), np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64)
        )
    red = np.asarray(reduced, dtype=np.int64)[rows]
    base = int(red.max(initial=0)) + 1
    if k * math.log2(max(base, 2)) < 62:
        key = row_codes(red, base)
    else:  # very large counts: let numpy number the rows
        key = np.unique(red, axis=0, return_inverse=True)[1].ravel()
    order = np.argsort(key, kind="stable")
    sk = key[order]
    starts = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
    s = np.asarray(log_score, dtype=np.float64)[rows][order]
    best = np.maximum.reduceat(s, starts)
    sizes = np.diff(np.r_[starts, sk.size])
    # the lowest template index among the rows reaching each composition's best score
    t = np.asarray(template, dtype=np.int64)[rows][order]
    big = np.iinfo(np.int64).max
    tie_t = np.where(s == np.repeat(best, sizes), t, big)
    best_t = np.minimum.reduceat(tie_t, starts)
    pos = np.where(tie_t == np.repeat(best_t, sizes))[0]
    group = np.repeat(np.arange(starts.size), sizes)[pos]
    first = pos[np.r_[True, group[1:] != group[:-1]]]
    return CompositionRanking(red[order[starts]], best, best_t, rows[order[first]])


@dataclass(frozen=True, eq=False)
class RowFilter:
    """A set of (template, counts) rows, to keep just those candidates of an enumeration.

    Build with :meth:`of`; :meth:`contains` tests many rows at once: one int64
    code per row (template, then counts in base ``max count + 1``) and a
    binary search, or a set of tuples when the codes would not fit 62 bits.
    """

    codes: np.ndarray  # sorted, unique
    base: int
    rows: frozenset[tuple[int, ...]] | None = None  # when codes do not fit

    @classmethod
    def of(cls, templates: np.ndarray, counts: np.ndarray) -> RowFilter:
        t = np.asarray(templates, dtype=np.int64)
        c = np.asarray(counts, dtype=np.int64)
        c = c.reshape(t.size, c.shape[-1])
        base = int(c.max(initial=0)) + 1
        top = int(t.max(initial=0)) + 1
        if math.log2(top) + c.shape[1] * math.log2(max(base, 2)) >= 62:
            rows = np.concatenate([t[:, None], c], axis=1)
            return cls(np.zeros(0, dtype=np.int64), base, frozenset(map(tuple, rows.tolist())))
        codes = t * base ** c.shape[1] + row_codes(c, base)
        return cls(np.unique(codes), base)

    def contains(self, templates: np.ndarray, counts: np.ndarray) -> np.ndarray:
        t = np.asarray(templates, dtype=np.int64)
        c = np.asarray(counts, dtype=np.int64)
        c = c.reshape(t.size, c.shape[-1])
        if self.rows is not None:
            rows = np.concatenate([t[:, None], c], axis=1).tolist()
            return np.asarray([tuple(r) in self.rows for r in rows], dtype=bool)
        if self.codes.size == 0:
            return np.zeros(t.size, dtype=bool)
        inside = np.asarray((c < self.base).all(axis=1))
        codes = t * self.base ** c.shape[1] + row_codes(np.where(inside[:, None], c, 0), self.base)
        pos = np.minimum(np.searchsorted(self.codes, codes), self.codes.size - 1)
        return inside & (self.codes[pos] == codes)
