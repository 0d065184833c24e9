"""Parameters of an evaluation run and the names of the report's dimensions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final

from afpx import AfpxError, schema
from afpx.templates.ties import DEFAULT_TIE_TOLERANCE
from afpx.templates.util import element_symbols

__all__ = ["VARIANTS", "EvaluateParams", "set_label", "size_label"]

# -- names of the report's dimensions and variables (report store, not the cube) --
# -- names of the report's dimensions and variables (report store, not the cube) --
TRUE_ELEMENT: Final = "true_element"
PREDICTED_ELEMENT: Final = "predicted_element"
MODEL: Final = "model"
KIND: Final = "kind"  # "true" / "other" element in the likelihood histograms
LIKELIHOOD_BIN: Final = "likelihood_bin"
TEST1_STRUCTURE: Final = "test1_structure"
TEST2_SET: Final = "test2_set"
VARIANT: Final = "variant"  # Test 2 with all templates / without the candidate's own formula

#: Test 2 variants: every template, or no template whose own reduced formula
#: equals the candidate's composition (no structure votes for its own composition).
VARIANTS: Final = ("all_templates", "no_own_formula")


@dataclass(frozen=True)
class EvaluateParams:
    """Parameters of an evaluation run (recorded in every report).

    Attributes
    ----------
    split : str
        The split whose structures (Test 1) and element sets (Test 2) are evaluated.
    set_sizes : tuple of int
        Sizes of the Test 2 element sets (the paper: binaries and ternaries).
    hit_k : tuple of int
        The k of hit@k.
    test1_cap : int
        Test 1 counts the candidates that beat or tie the true one exactly up
        to this many; beyond, the rank is reported as censored (at least
        ``test1_cap + 1``). Top-1 and top-10 rates are exact for any cap >= 10.
    test1_max_states : int
        Largest count grid (sites × remaining-count states) of the exact
        per-template counting DP; a template beyond it is skipped and flagged
        (``n_inexact_templates`` in the report).
    table_max_elements : int
        Element-set sizes up to this (and every Test 2 size) get a
        :class:`CompositionTable`: exact template and candidate counts for
        Test 1. Larger sets (Test 1 only) are ranked exactly too, but their
        numbers of candidates are not counted (NaN).
    tie_tolerance : float
        Relative tie tolerance: log-scores within ``tie_tolerance * max(1, |score|)``
        are tied (:func:`afpx.templates.tie_ranks`, the rule of ``afpx rank``).
    histogram_bins : int
        Bins of the likelihood histograms over [0, 1].
    baselines : tuple of str
        Baselines scored by the same code in the same run.
    case_study : tuple of tuple of str
        Element sets of the case study (the paper's Table 1).
    case_top : int
        Rows of each case-study ranking.
    test2_max_sets : int or None
        Evaluate Test 2 on at most this many element sets of each size: a
        seeded random sample (``test2_seed``) of the split's sets, drawn
        before anything is scored, so every model and baseline sees the same
        sets. None: every set. Test 1 always covers every structure.
    test2_seed : int
        Seed of that sample.
    """

    split: str = "test"
    set_sizes: tuple[int, ...] = (2, 3)
    hit_k: tuple[int, ...] = (1, 10)
    test1_cap: int = 100
    test1_max_states: int = 5_000_000
    table_max_elements: int = 4
    tie_tolerance: float = DEFAULT_TIE_TOLERANCE
    histogram_bins: int = 50
    baselines: tuple[str, ...] = ("constant", "random", "frequency", "coordination", "knn", "mlp")
    case_study: tuple[tuple[str, ...], ...] = (("Mn", "Ge"), ("Li", "Mn", "Ge"))
    case_top: int = 10
    test2_max_sets: int | None = None
    test2_seed: int = 0

    def __post_init__(self) -> None:
        if self.split not in schema.SPLITS:
            raise AfpxError(
                f"unknown split {self.split!r}; choose one of {', '.join(schema.SPLITS)}"
            )
        if self.test1_cap < 10:
            raise AfpxError(
                f"test1_cap must be at least 10 (top-10 must be exact), got {self.test1_cap}"
            )
        if any(s < 1 for s in self.set_sizes) or any(k < 1 for k in self.hit_k):
            raise AfpxError("set_sizes and hit_k must be positive")
        if self.test2_max_sets is not None and self.test2_max_sets < 1:
            raise AfpxError(f"test2_max_sets must be positive or None, got {self.test2_max_sets}")

    def to_attrs(self) -> dict[str, Any]:
        """The parameters as a JSON-able dict."""
        d = asdict(self)
        return {k: ([list(v) for v in val] if k == "case_study" else val) for k, val in d.items()}


def set_label(elements: Sequence[int]) -> str:
    """``"Li-Mn-Ge"`` for atomic numbers (3, 25, 32)."""
    symbols = element_symbols()
    return "-".join(symbols[z - 1] for z in elements)


def size_label(n: int) -> str:
    """``"binary"``, ``"ternary"``, ... for a set of n elements."""
    return {1: "unary", 2: "binary", 3: "ternary", 4: "quaternary"}.get(n, f"{n}-ary")
