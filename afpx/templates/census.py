"""Composition census: which reduced compositions each template can take, whatever the scores.

A template's candidates for k elements are the ways of splitting its reduced
multiplicities into k non-empty groups; which count vectors arise depends on
the multiset of multiplicities only (31 124 templates of the default library
share 843 multisets), and the set of vectors is closed under permuting the
elements. The census lists, per multiset, the *sorted* count vectors
(``c_1 <= ... <= c_k``), once with and once without the gcd reduction. From it
follow, independent of any likelihood:

* the number of distinct reduced compositions of an element set over a set
  of templates (each sorted vector stands for its distinct permutations);
* the number of candidates, one per (template, cell counts);
* for any composition, how many templates can take it.

Ranking uses it to stay exact while enumerating only the templates that can
reach the rows asked for (:mod:`afpx.templates.pruning`).

The census is built by one programme over all multisets at once: the state
is a sorted tuple of k group sums; a site of multiplicity ``u`` adds ``u`` to
each of the k groups in turn, and duplicate states are merged. Cached on the
library per k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import numpy as np

from afpx.templates.compositions import decode_rows, reduce_rows, row_codes
from afpx.templates.plan import CACHE_LOCK

if TYPE_CHECKING:
    from afpx.templates.library import TemplateLibrary

__all__ = ["Census", "census", "multiset_ids", "sorted_codes"]

#: Sorted count vectors are coded as one int64; beyond this the census is not built.
_MAX_CODE: Final = 1 << 62


@dataclass(frozen=True, eq=False)
class Census:
    """Sorted, reduced count vectors of every multiplicity multiset of a library, for k elements.

    Attributes
    ----------
    k : int
    base : int
        Codes are ``sum_i c_i * base**(k - 1 - i)`` of the sorted vector.
    multiset : ndarray of shape (n_templates,), int64
        Multiset id of every template of the library.
    pair_code : ndarray of shape (P,), int64
        Code of a sorted reduced composition, one row per (multiset, composition)
        pair, sorted by code.
    pair_multiset : ndarray of shape (P,), int64
    pair_perms : ndarray of shape (P,), int64
        Distinct permutations of the pair's composition (compositions it stands for).
    n_cell : ndarray of shape (n_multisets,), int64
        Candidates of one template of the multiset: distinct ordered cell-count vectors.
    """

    k: int
    base: int
    multiset: np.ndarray
    pair_code: np.ndarray
    pair_multiset: np.ndarray
    pair_perms: np.ndarray
    n_cell: np.ndarray

    def weights(self, templates: np.ndarray) -> np.ndarray:
        """(n_multisets,) number of ``templates`` with each multiset."""
        return np.bincount(self.multiset[templates], minlength=self.n_cell.size)

    def n_compositions(self, templates: np.ndarray) -> int:
        """Distinct reduced compositions (ordered by element) over ``templates``."""
        used = self.weights(templates)[self.pair_multiset] > 0
        code, perms = self.pair_code[used], self.pair_perms[used]
        if code.size == 0:
            return 0
        first = np.r_[True, code[1:] != code[:-1]]  # pair_code is sorted
        return int(perms[first].sum())

    def n_candidates(self, templates: np.ndarray) -> int:
        """Candidates, one per (template, cell counts), over ``templates``."""
        return int(self.n_cell[self.multiset[templates]].sum())

    def n_templates(self, templates: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """(n,) how many of ``templates`` can take each composition of ``counts`` (n, k)."""
        w = self.weights(templates)[self.pair_multiset]
        codes = sorted_codes(np.asarray(counts, dtype=np.int64), self.base)
        if self.pair_code.size == 0:
            return np.zeros(codes.size, dtype=np.int64)
        csum = np.concatenate([[0], np.cumsum(w)])
        lo = np.searchsorted(self.pair_code, codes, side="left")
        hi = np.searchsorted(self.pair_code, codes, side="right")
        return (csum[hi] - csum[lo]).astype(np.int64)


def sorted_codes(counts: np.ndarray, base: int) -> np.ndarray:
    """Code of each row of ``counts`` (n, k) once reduced by its gcd and sorted."""
    red = np.sort(reduce_rows(counts), axis=1)
    if red.size and int(red.max()) >= base:
        return np.full(red.shape[0], -1, dtype=np.int64)  # no template reaches it
    return row_codes(red, base)


def multiset_ids(library: TemplateLibrary) -> tuple[np.ndarray, np.ndarray]:
    """Multiset id of every template and one representative template per multiset.

    Two templates share an id when their reduced multiplicities are the same
    multiset (site order and the gcd do not matter).
    """
    cache = library.plan_cache
    with CACHE_LOCK:
        hit = cache.get(("multisets",))
    if hit is not None:
        return hit
    _, mr, _ = library.reduced_multiplicities
    start, n = library.site_start, library.n_unique_sites
    T = library.n_templates
    width = int(n.max()) if T else 0
    # each template's sorted multiplicities, padded with zeros at the front
    small = int(mr.max(initial=0)) < 1 << 16
    pad = np.zeros((T, max(width, 1)), dtype=np.uint16 if small else np.int64)
    owner = np.repeat(np.arange(T), n)
    order = np.lexsort((mr, owner))
    within = np.arange(owner.size) - np.repeat(start[:-1], n)
    pad[owner, width - np.repeat(n, n) + within] = mr[order]
    # one opaque bytes value per row: a 1-D unique, much faster than unique rows
    rows = np.ascontiguousarray(pad).view(np.dtype((np.void, pad.itemsize * pad.shape[1])))[:, 0]
    _, first, inverse = np.unique(rows, return_index=True, return_inverse=True)
    out = (inverse.reshape(-1).astype(np.int64), first.astype(np.int64))
    with CACHE_LOCK:
        cache[("multisets",)] = out
    return out


def census(library: TemplateLibrary, k: int) -> Census | None:
    """The census of ``library`` for k elements (cached); None when codes would overflow."""
    cache = library.plan_cache
    key = ("census", k)
    with CACHE_LOCK:
        hit = cache.get(key)
    if hit is not None:
        return hit
    ms, rep = multiset_ids(library)
    _, mr, total = library.reduced_multiplicities
    base = int(total.max(initial=0)) + 1
    if k < 1 or k * math.log2(max(base, 2)) >= 61 or math.log2(max(base, 2)) * (k + 1) >= 61:
        return None
    start, n = library.site_start, library.n_unique_sites
    M = rep.size
    width = int(n[rep].max()) if M else 0
    mpad = np.zeros((M, width), dtype=np.int64)
    for j, t in enumerate(rep.tolist()):
        m = np.sort(mr[start[t] : start[t + 1]])
        mpad[j, width - m.size :] = m
    states, owner = _sorted_states(mpad, k, base)
    # surjective: every group non-empty
    keep = states[:, 0] >= 1 if k else np.ones(owner.size, dtype=bool)
    states, owner = states[keep], owner[keep]
    n_cell = np.bincount(owner, weights=_permutations(states), minlength=M).astype(np.int64)
    red = np.sort(reduce_rows(states), axis=1)
    code = row_codes(red, base)
    both = owner * (base**k) + code
    uniq = np.unique(both)
    p_owner, p_code = uniq // (base**k), uniq % (base**k)
    order = np.argsort(p_code, kind="stable")
    p_code, p_owner = p_code[order], p_owner[order]
    perms = _permutations(decode_rows(p_code, base, k))
    out = Census(k, base, ms, p_code, p_owner, perms.astype(np.int64), n_cell)
    with CACHE_LOCK:
        cache[key] = out
    return out


def _permutations(sorted_rows: np.ndarray) -> np.ndarray:
    """Distinct permutations of each sorted row: k! / prod(run length!)."""
    n, k = sorted_rows.shape
    denom = np.ones(n, dtype=np.int64)
    run = np.zeros(n, dtype=np.int64)
    for i in range(1, k):
        run = np.where(sorted_rows[:, i] == sorted_rows[:, i - 1], run + 1, 0)
        denom *= run + 1
    return math.factorial(k) // denom


def _sorted_states(mpad: np.ndarray, k: int, base: int) -> tuple[np.ndarray, np.ndarray]:
    """Every sorted tuple of k group sums of every multiset (rows of ``mpad``).

    Returns the states (N, k), ascending within a row, and their multiset.
    """
    M, width = mpad.shape
    states = np.zeros((M, k), dtype=np.int64)
    owner = np.arange(M, dtype=np.int64)
    shift = base**k
    weights = base ** np.arange(k - 1, -1, -1, dtype=np.int64)
    for s in range(width):
        u = mpad[owner, s]
        act = u > 0
        if not act.any():
            continue
        idle_s, idle_o = states[~act], owner[~act]
        a, ao, au = states[act], owner[act], u[act]
        codes = []
        for e in range(k):
            # adding to one of several equal groups gives one state: add to the last of them
            rows = np.flatnonzero(a[:, e] != a[:, e + 1]) if e < k - 1 else None
            g = a.copy() if rows is None else a[rows]
            g[:, e] += au if rows is None else au[rows]
            # the grown group moves right to keep the row sorted (one bubble pass)
            for j in range(e, k - 1):
                lo = np.minimum(g[:, j], g[:, j + 1])
                np.maximum(g[:, j], g[:, j + 1], out=g[:, j + 1])
                g[:, j] = lo
            own = ao if rows is None else ao[rows]
            codes.append(own * shift + g @ weights)
        allc = np.concatenate(codes)
        allc.sort()
        allc = allc[np.r_[True, allc[1:] != allc[:-1]]]
        states = np.concatenate([idle_s, decode_rows(allc % shift, base, k)])
        owner = np.concatenate([idle_o, allc // shift])
    return states, owner
