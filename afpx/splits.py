"""Train / holdout / test split of structures, grouped by reduced composition.

The paper's test set shares no composition with the training set: every
structure of one reduced formula lands in the same split. Formulas are put in
a seeded random order and assigned greedily, so that the number of
*structures* per split approaches the requested fractions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from afpx import AfpxError
from afpx.schema import SPLITS


@dataclass(frozen=True)
class SplitParams:
    """How structures are split (paper: 60/20/20, no composition shared).

    Parameters
    ----------
    seed : int
        Seed of the random order of the formulas.
    fractions : tuple of float
        Target fractions of structures in ``train``, ``holdout`` and ``test``;
        must be non-negative and sum to 1.
    """

    seed: int = 0
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)

    def __post_init__(self) -> None:
        f = tuple(float(x) for x in self.fractions)
        if len(f) != len(SPLITS) or any(x < 0 for x in f) or abs(sum(f) - 1.0) > 1e-9:
            raise AfpxError(
                f"split fractions {self.fractions} must be {len(SPLITS)} non-negative "
                f"numbers ({', '.join(SPLITS)}) summing to 1"
            )
        if self.seed < 0:
            raise AfpxError(f"split seed must be >= 0, got {self.seed}")
        object.__setattr__(self, "fractions", f)

    def to_attrs(self) -> dict[str, Any]:
        """JSON-able record (zarr attributes)."""
        out = dataclasses.asdict(self)
        out["fractions"] = dict(zip(SPLITS, self.fractions, strict=True))
        out["grouped_by"] = "reduced formula"
        out["method"] = (
            "unique formulas sorted, shuffled by numpy default_rng(seed), assigned in that "
            "order to the first split whose cumulative structure count is below its target"
        )
        return out


def assign_splits(
    formulas: Sequence[str] | np.ndarray, *, params: SplitParams = SplitParams()
) -> np.ndarray:
    """Split label of every structure, grouped by reduced formula.

    Parameters
    ----------
    formulas : sequence of str, length n_structures
        Reduced formula of each structure.
    params : SplitParams, optional
        Defaults to ``SplitParams()`` (seed 0, 60/20/20).

    Returns
    -------
    ndarray of shape (n_structures,), object (str)
        ``"train"``, ``"holdout"`` or ``"test"``. Depends only on the multiset
        of formulas and the seed, not on the order of the structures.

    Examples
    --------
    >>> labels = assign_splits(["NaCl", "NaCl", "KCl", "MnO"] * 10)
    >>> sorted(set(labels[0::4])) == sorted(set(labels[1::4]))
    True
    """
    params = params if params is not None else SplitParams()
    formulas = np.asarray(formulas, dtype=object)
    out = np.empty(len(formulas), dtype=object)
    if len(formulas) == 0:
        return out
    unique, inverse, counts = np.unique(
        formulas.astype(str), return_inverse=True, return_counts=True
    )
    order = np.random.default_rng(params.seed).permutation(len(unique))
    targets = np.cumsum(params.fractions) * len(formulas)
    label = np.empty(len(unique), dtype=np.int64)
    done = 0
    for g in order:
        # first split whose cumulative target is not yet reached (the last takes the rest)
        k = int(np.searchsorted(targets, done, side="right"))
        label[g] = min(k, len(SPLITS) - 1)
        done += int(counts[g])
    out[:] = np.asarray(SPLITS, dtype=object)[label[inverse]]
    return out
