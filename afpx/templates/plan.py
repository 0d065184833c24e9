"""The enumeration plan: what depends on the templates and k only, computed once and cached.

A plan splits the selected templates between brute force (small templates,
grouped by number of sites) and the max-plus programme (stacked blocks). It
does not depend on which elements are placed nor on the likelihoods, so every
element set of the same size over the same templates — every model, every
baseline, every Test 2 set — shares one plan; per-set work is a gather of the
set's log-likelihood columns and one pass over the plan.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import numpy as np

from afpx import AfpxError
from afpx.templates.bruteforce import BruteForceGroup, bruteforce_group
from afpx.templates.maxplus import DPBlock, dp_block, dp_blocks, dp_cost

if TYPE_CHECKING:
    from afpx.templates.library import TemplateLibrary

__all__ = [
    "BF_ADVANTAGE",
    "BF_MAX_ASSIGNMENTS",
    "CACHE_LOCK",
    "Plan",
    "plan_for",
    "site_log_likelihood",
]

#: Guards every access to a library's ``plan_cache`` (plans, censuses, log-likelihoods).
CACHE_LOCK: Final = threading.RLock()

#: Brute force is used when it costs at most this many times the programme's
#: cell updates (a brute-force candidate is cheaper than a gathered DP update).
BF_ADVANTAGE: Final = 2.0
#: Brute force never enumerates more assignments per template than this.
BF_MAX_ASSIGNMENTS: Final = 4096


@dataclass(frozen=True, eq=False)
class Plan:
    """Brute-force groups and programme blocks of one (k, templates)."""

    bruteforce: tuple[BruteForceGroup, ...]
    dp: tuple[DPBlock, ...]


def plan_for(
    library: TemplateLibrary, k: int, templates: np.ndarray, *, cache: bool = True
) -> Plan:
    """The plan of (k, templates), from the library's cache or built (and cached if ``cache``).

    The cache is shared by threads (Dask tasks ranking several element sets
    over one library): every access holds :data:`CACHE_LOCK`; a plan is built
    outside the lock, so two threads may both build one, and one keeps it.
    """
    key = (k, templates.size, hash(templates.tobytes()))
    store = library.plan_cache
    with CACHE_LOCK:
        plan = store.get(key)
    if plan is None:
        plan = _make_plan(library, k, templates)
        if not cache or templates.size < 256:  # cheap to rebuild; keep the big plans
            return plan
        with CACHE_LOCK:
            plans = [c for c in store if isinstance(c[0], int)]
            if len(plans) >= 8:
                del store[plans[0]]
            store[key] = plan
    return plan


def _make_plan(library: TemplateLibrary, k: int, templates: np.ndarray) -> Plan:
    _, mr, total = library.reduced_multiplicities
    n = library.n_unique_sites
    start = library.site_start
    templates = templates[n[templates] >= k]  # fewer sites than elements: no candidate
    nt = n[templates]
    # cost model per template: brute-force assignments vs. DP state updates
    small = nt * math.log(k) <= math.log(max(BF_MAX_ASSIGNMENTS, 1)) + 1e-9
    small &= BF_MAX_ASSIGNMENTS > 0
    bf_cost = np.where(small, float(k) ** np.where(small, nt, 0), np.inf)
    use_bf = small & (bf_cost * nt <= BF_ADVANTAGE * dp_cost(mr, start, templates, k))
    bf_t = templates[use_bf]
    groups = tuple(
        bruteforce_group(mr, start, total, bf_t[n[bf_t] == nsite], int(nsite), k)
        for nsite in np.unique(n[bf_t]).tolist()
    )
    blocks = tuple(
        dp_block(mr, start, total, blk, k, library.n_sites)
        for blk in dp_blocks(templates[~use_bf], n, total, k)
    )
    return Plan(groups, blocks)


def site_log_likelihood(
    library: TemplateLibrary, zs: np.ndarray, min_site_likelihood: float | None
) -> np.ndarray:
    """(n_sites + 1, k) float64 log-likelihoods of the elements, a zero row for padding.

    The last one is cached on the library (ranking re-enumerates the top
    templates with the same elements to recover their assignments).
    """
    if min_site_likelihood is not None and not 0 < min_site_likelihood <= 1:
        raise AfpxError(f"min_site_likelihood must lie in (0, 1], got {min_site_likelihood}")
    key = (tuple(zs.tolist()), min_site_likelihood)
    cache = library.plan_cache
    with CACHE_LOCK:
        hit = cache.get(("logl", key))
    if hit is not None:
        return hit
    logl = np.empty((library.n_sites + 1, zs.size))
    logl[:-1] = library.log_likelihood[:, zs - 1]
    logl[-1] = 0.0
    if min_site_likelihood is not None:
        body = logl[:-1]
        body[body < math.log(min_site_likelihood)] = -np.inf
    with CACHE_LOCK:
        for old in [c for c in cache if c[0] == "logl"]:
            del cache[old]
        cache[("logl", key)] = logl
    return logl
