"""The max-plus dynamic programme over multiplicity counts, for stacked templates.

The state after the first ``s`` sites is the count vector of the first
``k - 1`` elements (the last count is the rest), and

.. math:: V_s(c) = \\max_e \\; V_{s-1}(c - m_s \\delta_e) + \\log p_{s,e}

with :math:`\\delta_{k-1} = 0`. Sites are taken in increasing multiplicity so
the reachable count region grows slowly; templates of similar size are
stacked into one :class:`DPBlock` and advanced together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Final

import numpy as np

from afpx import AfpxError
from afpx.templates.compositions import RowFilter
from afpx.templates.result import CandidateResult
from afpx.templates.util import index_ranges

__all__ = [
    "BAND_MIN_CELLS",
    "BAND_MIN_DIMS",
    "MAX_TABLE_BYTES",
    "DPBlock",
    "KeptTables",
    "dp_block",
    "dp_blocks",
    "dp_cost",
    "kept_table_bytes",
    "maxplus_best",
    "maxplus_forward",
]

LIKELIHOOD_FLOOR: Final = 1e-30

#: Tables with at least this many count axes (k - 1) and cells (states x
#: templates) are updated in bands that skip the unreachable corner; for
#: three elements the saving did not pay for the extra work (measured).
BAND_MIN_DIMS: Final = 3
#: Blocks of fewer templates repeat each step's likelihoods along the last count
#: axis (see :func:`_step`).
_SPREAD_BELOW: Final = 32
BAND_MIN_CELLS: Final = 1 << 14
_BANDS: Final = 4
#: Bytes of one stacked block's final table: small enough to stay in a core's
#: cache across the passes of a step, large enough to amortise Python overhead.
_BLOCK_BYTES: Final = 2**20
#: A template whose state table alone would need more than this is refused.
MAX_TABLE_BYTES: Final = 2 * 2**30

#: Templates stacked in one block of the programme differ in sites and in
#: reduced atoms by at most these ratios (padding against Python overhead).
_BUCKET_SITES: Final = 2.0
_BUCKET_TOTAL: Final = 1.5


@dataclass(frozen=True, eq=False)
class DPBlock:
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


def dp_cost(mr: np.ndarray, start: np.ndarray, templates: np.ndarray, k: int) -> np.ndarray:
    """State updates of the programme per template (sites in increasing multiplicity)."""
    if templates.size == 0:
        return np.zeros(0)
    n = start[templates + 1] - start[templates]
    rows = index_ranges(start[templates], n)
    owner = np.repeat(np.arange(templates.size), n)
    m = mr[rows]
    order = np.lexsort((m, owner))
    prefix = np.cumsum(m[order])
    first = np.concatenate([[0], np.cumsum(n)[:-1]])
    base = np.repeat(prefix[first] - m[order][first], n)
    p = (prefix - base).astype(np.float64)
    cells = (p + 1.0) ** (k - 1) * k
    return np.add.reduceat(cells, first)


def dp_blocks(templates: np.ndarray, n: np.ndarray, total: np.ndarray, k: int) -> list[np.ndarray]:
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
        if per_template > MAX_TABLE_BYTES:
            big = tt[np.argmax(total[tt])]
            raise AfpxError(
                f"a set of {k} elements on template {int(big)} ({nmax} unique sites, "
                f"{mmax} atoms after reduction) needs more than "
                f"{MAX_TABLE_BYTES / 2**30:g} GiB of states; restrict templates with "
                "max_unique_sites (--max-sites) or use fewer elements"
            )
        # stacked final tables small enough to stay in cache between passes
        size = max(1, int(_BLOCK_BYTES // (8.0 * (mmax + 1) ** (k - 1))))
        for lo in range(0, tt.size, size):
            blocks.append(tt[lo : lo + size])
    return blocks


def dp_block(
    mr: np.ndarray, start: np.ndarray, total: np.ndarray, templates: np.ndarray, k: int, pad: int
) -> DPBlock:
    T = templates.size
    n_t = start[templates + 1] - start[templates]
    npad = int(n_t.max())
    # padding sites (multiplicity 0, log-likelihood 0) first, then each template's
    # sites in increasing multiplicity, so that the reachable counts grow slowly
    slot = np.full((T, npad), pad, dtype=np.int64)
    for_t = np.repeat(np.arange(T), n_t)
    rows = index_ranges(start[templates], n_t)
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
    return DPBlock(templates, slot, real, m, bound, tuple(shifts), total[templates])


def maxplus_best(
    logl: np.ndarray,
    blk: DPBlock,
    k: int,
    *,
    assignments: bool,
    only: RowFilter | None = None,
) -> CandidateResult:
    """Max-plus programme over count vectors for a block of templates.

    Tables are state-major, shape ``(p + 1, ..., p + 1, T)`` (``k - 1`` count
    axes, then templates), ``p`` the largest count reachable so far: the shift
    of a table by a site's multiplicity ``u`` along a count axis is then a
    slice whose inner loop runs over all templates. Templates whose site at
    this step has another multiplicity take part with a log-likelihood of
    -inf, so one slice serves every template with that ``u``. Tables live in
    two reused buffers (or fresh arrays when kept for backtracking).

    ``only`` (library templates, counts in reduced units) keeps just those
    candidates (the others are dropped before backtracking, which then costs
    only what the rows asked for).
    """
    result, kept = maxplus_forward(logl, blk, k, keep_tables=assignments, only=only)
    if kept is not None:
        result.assignment = kept.assignments(np.arange(result.template.size))
    return result


@dataclass(frozen=True, eq=False)
class KeptTables:
    """The tables of one block's forward pass, kept to backtrack chosen candidates later.

    Row ``i`` is candidate ``i`` of the :class:`CandidateResult` the pass
    returned (block-local template ``tl[i]``, counts ``counts[i]``).
    """

    blk: DPBlock
    L: np.ndarray  # (npad, k, T) log-likelihoods of each step
    tables: list[np.ndarray]  # the table before each step, and the last one
    tl: np.ndarray  # (n,) block-local template of each candidate
    counts: np.ndarray  # (n, k) counts of each candidate
    score: np.ndarray  # (n,) its score

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tables)

    def assignments(self, rows: np.ndarray) -> np.ndarray:
        """Assignments of candidates ``rows``: (len(rows), most sites) int8, library site order."""
        blk, k = self.blk, self.counts.shape[1]
        tl = self.tl[rows]
        padded = _backtrack(
            self.tables, self.L, blk.m, tl, self.counts[rows, : k - 1], self.score[rows], k
        )
        # from padded, multiplicity-sorted slots back to library site order
        n_t = blk.real.sum(axis=1)
        lib_assign = np.full((tl.size, int(n_t.max())), -1, dtype=np.int8)
        first_row = np.where(blk.real, blk.slot, np.iinfo(np.int64).max).min(axis=1)
        r, cpos = np.nonzero(blk.real[tl])
        lib_assign[r, blk.slot[tl[r], cpos] - first_row[tl[r]]] = padded[r, cpos]
        return lib_assign


def kept_table_bytes(blk: DPBlock, k: int) -> float:
    """Bytes of the tables a forward pass over ``blk`` keeps for backtracking."""
    return 8.0 * blk.slot.shape[0] * float(((blk.bound.astype(np.float64) + 1) ** (k - 1)).sum())


def maxplus_forward(
    logl: np.ndarray,
    blk: DPBlock,
    k: int,
    *,
    keep_tables: bool,
    only: RowFilter | None = None,
) -> tuple[CandidateResult, KeptTables | None]:
    """The forward pass of :func:`maxplus_best`: candidates, and its tables if ``keep_tables``.

    With the tables kept, any of the candidates can be backtracked later
    (:meth:`KeptTables.assignments`), once it is known which are wanted.
    """
    d = k - 1
    T, npad = blk.slot.shape
    # (npad, k, T): each step's likelihoods contiguous along templates
    L = np.ascontiguousarray(logl[blk.slot.T].transpose(0, 2, 1))
    p_last = int(blk.bound[-1])
    size = T * (p_last + 1) ** d
    if keep_tables:
        kept = kept_table_bytes(blk, k)
        if kept > MAX_TABLE_BYTES:
            raise AfpxError(
                f"backtracking the assignments of {T} template(s) with {npad} unique sites "
                f"and {k} elements needs {kept / 2**30:.1f} GiB of tables; ask for scores "
                "only (assignments=False) or use fewer elements"
            )
    bufs = (np.empty(size), np.empty(size)) if not keep_tables else ()
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
        if d >= BAND_MIN_DIMS and n_out >= BAND_MIN_CELLS:
            _step_banded(V, out, L[s], blk.shifts[s], tmp, pp, p, d)
        else:
            _step(V, out, L[s], blk.shifts[s], tmp, pp, p, d)
        updates += n_out * k
        V = out
        if keep_tables:
            tables.append(V)

    # candidates: every count positive, the implied last count positive
    flat, tl, counts = _dp_states(blk, k, V.shape)
    score = V.reshape(-1)[flat]
    ok = np.isfinite(score)
    if only is not None:
        ok &= only.contains(blk.templates[tl], counts)
    if not ok.all():
        tl, counts, score = tl[ok], counts[ok], score[ok]
    result = CandidateResult(
        template=blk.templates[tl],
        counts=counts,
        log_score=score,
        method=np.ones(tl.size, dtype=np.int8),
        assignment=None,
        n_dp_updates=updates,
    )
    return result, KeptTables(blk, L, tables, tl, counts, score) if keep_tables else None


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
    blk: DPBlock, k: int, shape: tuple[int, ...]
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
    Predecessors are looked up by flat index, one count column at a time.
    """
    d = k - 1
    N = tl.size
    npad = m.shape[1]
    out = np.full((N, npad), -1, dtype=np.int8)
    c = cc.copy()
    val = score.copy()
    for s in range(npad - 1, -1, -1):
        prev = tables[s]
        flat_prev = prev.reshape(-1)
        p_prev = prev.shape[0] - 1 if d else 0
        T = prev.shape[-1]
        stride = [T * (p_prev + 1) ** (d - 1 - j) for j in range(d)]
        ms = m[tl, s]
        fits = [c[:, j] <= p_prev for j in range(d)]
        flat = tl.copy()
        for j in range(d):
            flat += c[:, j] * stride[j]
        chosen = np.full(N, -1, dtype=np.int64)
        best_val = np.full(N, np.nan)
        # the forward pass's order: last element first
        for e in [d, *range(d)]:
            inside = np.ones(N, dtype=bool) if e < d else chosen < 0
            for j in range(d):
                if j != e:
                    inside &= fits[j]
            if e < d:
                col = c[:, e] - ms
                inside &= (chosen < 0) & (col >= 0) & (col <= p_prev)
            todo = np.flatnonzero(inside)
            if todo.size == 0:
                continue
            at = flat[todo] if e == d else flat[todo] - ms[todo] * stride[e]
            before = flat_prev[at]
            ok = before + L[s, e, tl[todo]] == val[todo]
            hit = todo[ok]
            chosen[hit] = e
            best_val[hit] = before[ok]
        if np.any(chosen < 0):  # pragma: no cover - would be a bug in the forward pass
            raise AssertionError("backtracking found no optimal predecessor")
        move = np.flatnonzero(chosen < d)
        if d:
            c[move, chosen[move]] -= ms[move]
        val = best_val
        out[:, s] = chosen
    return out
