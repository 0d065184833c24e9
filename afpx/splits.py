"""Train / holdout / test split of structures, grouped by reduced composition.

The paper's test set shares no composition with the training set: every
structure of one reduced formula lands in the same split. Each formula's split
follows from a seeded hash of the formula alone, so that adding structures
(``afpx build-cube --append``) never moves a structure already assigned: the
fractions hold for *formulas* in expectation (~60/20/20), and for structures
as far as formulas have similar numbers of structures.
"""

from __future__ import annotations

import dataclasses
import hashlib
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
        Seed of the formula hash.
    fractions : tuple of float
        Expected fractions of formulas in ``train``, ``holdout`` and ``test``;
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
            "u = first 8 bytes of sha256(f'{seed}:{formula}') / 2**64 (big-endian), "
            "split = first whose cumulative fraction exceeds u"
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
        ``"train"``, ``"holdout"`` or ``"test"``. Each label depends only on
        the structure's formula and the seed: not on the other structures,
        their number or their order.

    Notes
    -----
    A formula's label is the first split whose cumulative fraction exceeds
    ``u``, the first 8 bytes of ``sha256(f"{seed}:{formula}")`` read as a
    big-endian integer over 2**64. (Earlier versions assigned formulas
    greedily towards structure-count targets, which moved structures already
    assigned whenever structures were added.)

    Examples
    --------
    >>> labels = assign_splits(["NaCl", "NaCl", "KCl", "MnO"] * 10)
    >>> sorted(set(labels[0::4])) == sorted(set(labels[1::4]))
    True
    """
    params = params if params is not None else SplitParams()
    formulas = np.asarray(formulas)
    if formulas.dtype.kind not in "UT":  # objects: as text (a StringDType array as it is)
        formulas = np.asarray(formulas, dtype=object).astype(str)
    out = np.empty(len(formulas), dtype=object)
    if len(formulas) == 0:
        return out
    # distinct formulas from the array itself: no Python string per structure
    unique, inverse = np.unique(formulas, return_inverse=True)
    u = np.array([formula_hash(f, params.seed) for f in unique], dtype=np.float64)
    label = np.searchsorted(np.cumsum(params.fractions), u, side="right")
    label = np.minimum(label, len(SPLITS) - 1)
    out[:] = np.asarray(SPLITS, dtype=object)[label[inverse]]
    return out


def formula_hash(formula: str, seed: int) -> float:
    """A number in [0, 1) fixed by a formula and a seed (the split's random draw).

    Examples
    --------
    >>> 0.0 <= formula_hash("NaCl", 0) < 1.0
    True
    """
    digest = hashlib.sha256(f"{seed}:{formula}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def random_site_split(
    structure: np.ndarray,
    site_index: np.ndarray,
    *,
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
) -> np.ndarray:
    """The paper's protocol: unique sites split at random, whatever their structure.

    "AFPs were partitioned" 60/20/20 in the paper, which reads as a random
    split of sites: sites of one structure (and compositions) are shared
    between training and test. All draws of one unique site go together.

    Parameters
    ----------
    structure, site_index : ndarray of shape (n,)
        Structure index and unique-site index of each row of the cube.
    seed : int
    fractions : tuple of float
        Fractions of unique sites in ``train``, ``holdout``, ``test``.

    Returns
    -------
    ndarray of shape (n,) object
        ``train``, ``holdout`` or ``test`` per row.
    """
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-9:
        raise AfpxError(
            f"split fractions must be three non-negative numbers summing to 1, got {fractions}"
        )
    structure = np.asarray(structure, dtype=np.int64)
    site_index = np.asarray(site_index, dtype=np.int64)
    if structure.shape != site_index.shape:
        raise AfpxError("structure and site_index differ in length")
    key = np.unique(np.stack([structure, site_index], 1), axis=0, return_inverse=True)[1]
    key = np.asarray(key).reshape(-1)
    u = np.random.default_rng([seed, 4243]).random(int(key.max()) + 1 if key.size else 0)[key]
    edges = np.cumsum(fractions)
    return np.asarray(SPLITS, dtype=object)[np.minimum(np.searchsorted(edges, u, side="right"), 2)]
