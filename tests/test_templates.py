"""Templates and exact candidate enumeration (afpx.templates)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from _rank_helpers import (
    GE,
    LI,
    MN,
    OX,
    candidate_dict,
    cube_with_likelihood,
    library_from_sites,
    naive_candidates,
    random_library,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from afpx import AfpxError, schema
from afpx.templates import (
    TemplateGeometry,
    TemplateLibrary,
    best_assignments,
    best_candidates,
    maxplus,
    plan,
    reduce_compositions,
    reduced_formulas,
)
from afpx.templates.util import check_elements


# -----------------------------------------------------------------------------
# a hand-made library with scores worked out by hand
# -----------------------------------------------------------------------------
@pytest.fixture
def hand() -> TemplateLibrary:
    return library_from_sites(
        [
            # t0: two sites, multiplicities 2 and 4
            [(2, MN, {MN: 0.9, GE: 0.1}), (4, GE, {MN: 0.2, GE: 0.8})],
            # t1: three sites 1, 1, 2
            [(1, MN, {MN: 0.5, GE: 0.5}), (1, GE, {MN: 0.4, GE: 0.6}), (2, GE, {MN: 0.3})],
            # t2: a single site can never host two elements
            [(4, MN, {MN: 1.0})],
        ],
        formulas=["MnGe2", "MnGe3", "Mn"],
    )


def test_hand_scores_counts_and_formulas(hand: TemplateLibrary) -> None:
    ds = best_candidates(hand, [MN, GE])
    got = {
        (int(t), tuple(c.tolist())): (f, s, a[: hand.n_unique_sites[t]].tolist())
        for t, c, f, s, a in zip(
            ds.template.values,
            ds.counts.values,
            ds.formula.values,
            ds.log_score.values,
            ds.assignment.values,
            strict=True,
        )
    }
    d = 1e-3  # likelihood of an unnamed element
    expected = {
        # t0: Mn on the 2-fold site, Ge on the 4-fold: Mn2Ge4 -> MnGe2
        (0, (2, 4)): ("MnGe2", 0.9 * 0.8, [0, 1]),
        (0, (4, 2)): ("Mn2Ge", 0.1 * 0.2, [1, 0]),
        # t1 (1, 1, 2): every assignment using both elements
        (1, (1, 3)): ("MnGe3", max(0.5 * 0.6 * d, 0.5 * 0.4 * d * 0 + 0.5 * 0.6 * d), [0, 1, 1]),
        (1, (2, 2)): ("MnGe", max(0.5 * 0.4 * d, 0.5 * 0.6 * 0.3), [1, 1, 0]),
        (1, (3, 1)): ("Mn3Ge", 0.5 * 0.6 * 0.3, [1, 0, 0]),
    }
    # (1, (1, 3)): Mn on site 0 (0.5*0.6*d) or site 1 (0.5*0.4*d): the first
    # (2, 2): Mn,Mn,Ge (0.5*0.4*d) vs Ge,Ge,Mn (0.5*0.6*0.3): the second
    # (3, 1): Mn,Ge,Mn (0.5*0.6*0.3) vs Ge,Mn,Mn (0.5*0.4*0.3): the first... of
    # the multiplicity-1 sites, Ge goes where it is likelier
    expected[(1, (3, 1))] = ("Mn3Ge", 0.5 * 0.6 * 0.3, [0, 1, 0])
    assert set(got) == set(expected)
    for key, (formula, score, assign) in expected.items():
        f, s, a = got[key]
        assert f == formula
        assert s == pytest.approx(math.log(score), abs=1e-6)
        assert a == assign
    # reduced compositions: Mn2Ge4 -> MnGe2
    row = int(np.flatnonzero((ds.template.values == 0) & (ds.counts.values[:, 0] == 2))[0])
    assert ds.reduced_counts.values[row].tolist() == [1, 2]


def test_candidates_never_omit_an_element(hand: TemplateLibrary) -> None:
    ds = best_candidates(hand, [MN, GE])
    assert (ds.counts.values > 0).all()
    assert 2 not in ds.template.values  # the one-site template hosts one element only
    for a, t in zip(ds.assignment.values, ds.template.values, strict=True):
        used = set(a[: hand.n_unique_sites[t]].tolist())
        assert used == {0, 1}


def test_element_order_only_permutes_columns(hand: TemplateLibrary) -> None:
    a = candidate_dict(best_candidates(hand, [MN, GE]))
    b = candidate_dict(best_candidates(hand, [GE, MN]))
    assert {(t, c[::-1]): s for (t, c), s in b.items()} == a


def test_gcd_reduction_keeps_counts_in_cell_units() -> None:
    lib = library_from_sites([[(4, MN, {MN: 0.5}), (8, GE, {GE: 0.5})]])
    ds = best_candidates(lib, [MN, GE])
    assert sorted(map(tuple, ds.counts.values.tolist())) == [(4, 8), (8, 4)]
    assert sorted(ds.formula.values.tolist()) == ["Mn2Ge", "MnGe2"]


# -----------------------------------------------------------------------------
# exactness: DP and brute force against plain enumeration
# -----------------------------------------------------------------------------
def _check_against_naive(lib: TemplateLibrary, zs: list[int], **kw: float) -> None:
    ds = best_candidates(lib, zs, **kw)  # type: ignore[arg-type]
    ref = naive_candidates(lib, zs, **kw)
    got = candidate_dict(ds)
    assert set(got) == set(ref)
    for key, score in ref.items():
        assert got[key] == pytest.approx(score, abs=1e-9, rel=0)
    # the assignment reproduces score and counts
    L = lib.log_likelihood[:, np.asarray(zs) - 1].astype(np.float64)
    for t, counts, score, a in zip(
        ds.template.values, ds.counts.values, ds.log_score.values, ds.assignment.values, strict=True
    ):
        lo, hi = int(lib.site_start[t]), int(lib.site_start[t + 1])
        a = a[: hi - lo].astype(int)
        assert (a >= 0).all()
        assert L[np.arange(lo, hi), a].sum() == pytest.approx(score, abs=1e-9, rel=0)
        c = np.bincount(a, weights=lib.multiplicity[lo:hi], minlength=len(zs))
        assert c.astype(int).tolist() == counts.tolist()


_FIXTURE = [HealthCheck.function_scoped_fixture]


@pytest.fixture(params=["auto", "dp", "bruteforce"])
def method(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "dp":
        monkeypatch.setattr(plan, "BF_MAX_ASSIGNMENTS", 0)
    elif request.param == "bruteforce":
        monkeypatch.setattr(plan, "BF_ADVANTAGE", math.inf)
    return str(request.param)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(1, 4), ties=st.booleans())
def test_exact_against_enumeration(method: str, seed: int, k: int, ties: bool) -> None:
    rng = np.random.default_rng(seed)
    lib = random_library(rng, 12, max_sites=6 if k < 4 else 5, ties=ties)
    zs = rng.choice(np.arange(1, 119), k, replace=False).tolist()
    _check_against_naive(lib, zs)
    ds = best_candidates(lib, zs)
    if method == "dp":
        assert ds.attrs["n_candidates_bruteforce"] == 0
    if method == "bruteforce":
        assert ds.attrs["n_dp_updates"] == 0


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), cut=st.sampled_from([0.05, 0.2, 0.5]))
def test_min_site_likelihood_is_exact(seed: int, cut: float) -> None:
    rng = np.random.default_rng(seed)
    lib = random_library(rng, 10, max_sites=5)
    zs = rng.choice(np.arange(1, 119), 3, replace=False).tolist()
    _check_against_naive(lib, zs, min_site_likelihood=cut)


@pytest.mark.slow
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(2, 4), ties=st.booleans())
def test_exact_against_enumeration_sweep(method: str, seed: int, k: int, ties: bool) -> None:
    rng = np.random.default_rng(seed)
    lib = random_library(rng, 40, max_sites=8 if k == 2 else 6, ties=ties)
    zs = rng.choice(np.arange(1, 119), k, replace=False).tolist()
    _check_against_naive(lib, zs)


def _dp_equals_bruteforce_on_small_templates(
    lib: TemplateLibrary, zs: list[int], monkeypatch: pytest.MonkeyPatch
) -> int:
    """Every template small enough to enumerate: forced DP == forced brute force."""
    k = len(zs)
    small = np.flatnonzero(
        (lib.n_unique_sites >= k) & (lib.n_unique_sites * math.log(k) <= math.log(4096))
    )
    sub = lib.subset(small)
    with monkeypatch.context() as m:
        m.setattr(plan, "BF_MAX_ASSIGNMENTS", 0)
        dp = candidate_dict(best_candidates(sub, zs, assignments=False))
    with monkeypatch.context() as m:
        m.setattr(plan, "BF_ADVANTAGE", math.inf)
        bf = candidate_dict(best_candidates(TemplateLibrary(**_fields(sub)), zs, assignments=False))
    assert set(dp) == set(bf)
    assert all(dp[key] == pytest.approx(bf[key], abs=1e-9, rel=0) for key in bf)
    return int(small.size)


def _fields(lib: TemplateLibrary) -> dict[str, object]:
    # a fresh library object: the enumeration plan is cached per object
    return {f: getattr(lib, f) for f in lib.__dataclass_fields__}


def test_dp_equals_bruteforce_on_every_small_template(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(7)
    lib = random_library(rng, 300, max_sites=9, multiplicities=(1, 2, 3, 4, 6, 8, 12, 16, 24))
    assert _dp_equals_bruteforce_on_small_templates(lib, [MN, GE], monkeypatch) > 100
    assert _dp_equals_bruteforce_on_small_templates(lib, [LI, MN, GE], monkeypatch) > 100


@pytest.mark.slow
def test_dp_equals_bruteforce_on_every_small_template_sweep(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = np.random.default_rng(11)
    lib = random_library(rng, 3000, max_sites=12, multiplicities=(1, 2, 3, 4, 6, 8, 12, 16, 24, 48))
    for zs in ([MN, GE], [LI, MN, GE], [LI, OX, MN, GE]):
        _dp_equals_bruteforce_on_small_templates(lib, zs, monkeypatch)


def test_large_template_dp_is_exact_where_enumeration_is_out_of_reach() -> None:
    # 30 sites of multiplicity 1 plus a few heavier ones: 2^34 assignments.
    rng = np.random.default_rng(3)
    m = [1] * 30 + [2, 3, 4, 6]
    lik = {i: rng.random(118).astype(np.float32) * 0.9 + 0.05 for i in range(len(m))}
    lib = library_from_sites(
        [
            [
                (mm, MN, {MN: float(lik[i][MN - 1]), GE: float(lik[i][GE - 1])})
                for i, mm in enumerate(m)
            ]
        ]
    )
    ds = best_candidates(lib, [MN, GE])
    assert ds.attrs["n_dp_updates"] > 0
    lm = lib.log_likelihood[:, MN - 1].astype(np.float64)
    lg = lib.log_likelihood[:, GE - 1].astype(np.float64)
    # oracle for two elements: for each choice of which heavy sites are Mn, the
    # multiplicity-1 sites are filled greedily by the largest lm - lg
    ones = np.argsort(-(lm[:30] - lg[:30]))
    best: dict[int, float] = {}
    for heavy in range(16):
        hm = [(heavy >> j) & 1 for j in range(4)]
        base = sum(lm[30 + j] if hm[j] else lg[30 + j] for j in range(4))
        mn_heavy = sum(m[30 + j] for j in range(4) if hm[j])
        gain = np.concatenate([[0.0], np.cumsum((lm[:30] - lg[:30])[ones])])
        for j in range(31):
            c = mn_heavy + j
            s = base + lg[:30].sum() + gain[j]
            if 0 < c < sum(m) and s > best.get(c, -np.inf):
                best[c] = s
    got = {int(c[0]): s for (_, c), s in candidate_dict(ds).items()}
    assert set(got) == set(best)
    assert all(got[c] == pytest.approx(best[c], abs=1e-9) for c in best)


def test_identical_templates_tie_exactly_across_methods(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(5)
    lib = random_library(rng, 1, max_sites=6)
    twice = TemplateLibrary(
        site_template=np.concatenate([lib.site_template, lib.site_template + 1]),
        multiplicity=np.tile(lib.multiplicity, 2),
        z=np.tile(lib.z, 2),
        log_likelihood=np.tile(lib.log_likelihood, (2, 1)),
        structure_id=np.asarray(["a", "b"], dtype=object),
        formula=np.asarray(["X", "X"], dtype=object),
        spacegroup=np.ones(2, dtype=np.int64),
        source=np.asarray(["s", "s"], dtype=object),
    )
    got = candidate_dict(best_candidates(twice, [MN, GE]))
    for (t, c), s in got.items():
        if t == 0:
            assert got[(1, c)] == s  # bitwise equal


# -----------------------------------------------------------------------------
# options
# -----------------------------------------------------------------------------
def test_options_filter_templates_and_candidates(hand: TemplateLibrary) -> None:
    all_ = candidate_dict(best_candidates(hand, [MN, GE]))
    assert {t for t, _ in candidate_dict(best_candidates(hand, [MN, GE], max_unique_sites=2))} == {
        0
    }
    assert not candidate_dict(best_candidates(hand, [MN, GE], sources=["elsewhere"]))
    assert candidate_dict(best_candidates(hand, [MN, GE], sources=["hand"])) == all_
    no_t0 = candidate_dict(best_candidates(hand, [MN, GE], exclude_formulas=["Mn2Ge4"]))
    assert {t for t, _ in no_t0} == {1}  # "Mn2Ge4" reduces to t0's MnGe2
    strong = candidate_dict(best_candidates(hand, [MN, GE], min_likelihood=0.05))
    assert strong == {k: s for k, s in all_.items() if s >= math.log(0.05)}


def test_exclude_own_formula_drops_the_known_structure(hand: TemplateLibrary) -> None:
    own = candidate_dict(best_candidates(hand, [MN, GE], exclude_own_formula=True))
    # t0 is Mn2Ge4 itself, t1 is MnGe3 (Mn 1, Ge 1 + 2)
    assert (0, (2, 4)) not in own
    assert (1, (1, 3)) not in own
    assert (0, (4, 2)) in own
    assert best_candidates(hand, [MN, GE], exclude_own_formula=True).attrs["options"][
        "exclude_own_formula"
    ]


def test_option_errors(hand: TemplateLibrary) -> None:
    with pytest.raises(AfpxError, match="min_likelihood must be positive"):
        best_candidates(hand, [MN, GE], min_likelihood=0.0)
    with pytest.raises(AfpxError, match="min_site_likelihood"):
        best_candidates(hand, [MN, GE], min_site_likelihood=1.5)
    with pytest.raises(AfpxError, match="cannot read formula"):
        best_candidates(hand, [MN, GE], exclude_formulas=["(("])


@pytest.mark.parametrize(
    ("elements", "match"),
    [
        ([], "at least one element"),
        ([MN, MN], "repeated element"),
        ([0, MN], "1..118"),
        ([MN, 119], "1..118"),
        (["Mn", "Ge"], "atomic numbers"),
        (list(range(1, 119)) + list(range(1, 11)), "repeated"),
    ],
)
def test_element_errors(hand: TemplateLibrary, elements: list[object], match: str) -> None:
    with pytest.raises(AfpxError, match=match):
        best_candidates(hand, elements)  # type: ignore[arg-type]


def test_too_many_elements_for_127(hand: TemplateLibrary, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(schema, "N_ELEMENTS", 200)
    with pytest.raises(AfpxError, match="at most 127"):
        check_elements(list(range(1, 129)))


def test_state_table_guards(monkeypatch: pytest.MonkeyPatch) -> None:
    lib = library_from_sites([[(1, MN, {}) for _ in range(14)]])
    monkeypatch.setattr(maxplus, "MAX_TABLE_BYTES", 1000)
    with pytest.raises(AfpxError, match="max_unique_sites"):
        best_candidates(lib, [LI, MN, GE])
    # scores fit, but keeping every step's table for backtracking does not
    monkeypatch.setattr(maxplus, "MAX_TABLE_BYTES", 8000)  # 3 tables: 5400 B, all 15: 9912 B
    fresh = library_from_sites([[(1, MN, {}) for _ in range(14)]])
    assert best_candidates(fresh, [LI, MN, GE], assignments=False).sizes["candidate"] == 78
    with pytest.raises(AfpxError, match="assignments=False"):
        best_candidates(fresh, [LI, MN, GE])


def test_best_assignments(hand: TemplateLibrary) -> None:
    a, s = best_assignments(hand, [MN, GE], [1, 0], np.array([[2, 2], [2, 4]]))
    assert a[0, :3].tolist() == [1, 1, 0]
    assert a[1, :2].tolist() == [0, 1] and a[1, 2] == -1
    assert s[1] == pytest.approx(math.log(0.72), abs=1e-6)
    with pytest.raises(AfpxError, match="no candidate with counts"):
        best_assignments(hand, [MN, GE], [0], np.array([[3, 3]]))
    with pytest.raises(AfpxError, match="uses every element"):
        best_assignments(hand, [MN, GE], [2], np.array([[4, 0]]))


# -----------------------------------------------------------------------------
# formulas and compositions
# -----------------------------------------------------------------------------
_POOL = ["Li", "Na", "K", "H", "Cs", "Rb", "O", "N", "F", "Cl", "He", "Ar", "Mn", "Ge", "S", "P"]


@settings(max_examples=60, deadline=None)
@given(
    symbols=st.lists(st.sampled_from(_POOL), min_size=1, max_size=4, unique=True),
    rows=st.lists(st.lists(st.integers(0, 12), min_size=4, max_size=4), min_size=1, max_size=8),
)
def test_formulas_match_pymatgen(symbols: list[str], rows: list[list[int]]) -> None:
    from pymatgen.core import Composition

    counts = np.asarray(rows)[:, : len(symbols)]
    counts = counts[counts.sum(axis=1) > 0]
    got = reduced_formulas(counts, symbols)
    for row, formula in zip(counts, got, strict=True):
        comp = Composition({s: int(c) for s, c in zip(symbols, row, strict=True) if c})
        assert formula == comp.reduced_formula


def test_formula_polyanion_and_special_cases() -> None:
    assert reduced_formulas(np.array([[1, 1, 4], [2, 2, 8]]), ["Li", "P", "O"]).tolist() == [
        "LiPO4",
        "LiPO4",
    ]
    assert reduced_formulas(np.array([[1, 1]]), ["Li", "O"]).tolist() == ["Li2O2"]
    assert reduced_formulas(np.array([[2, 4]]), ["Mn", "Ge"]).tolist() == ["MnGe2"]


def test_reduce_compositions_groups_equal_ratios() -> None:
    inv, uniq = reduce_compositions(np.array([[2, 4], [1, 2], [3, 3], [5, 10]]))
    assert uniq.tolist() == [[1, 1], [1, 2]]
    assert inv.tolist() == [1, 1, 0, 1]
    big = np.array([[10**6, 1], [2 * 10**6, 2], [3, 1]])  # past the dense table
    huge = np.array([[2**40, 1, 1], [2**41, 2, 2], [3, 1, 1]])  # past int64 keys
    inv, uniq = reduce_compositions(huge)
    assert inv[0] == inv[1] != inv[2]
    inv, uniq = reduce_compositions(big)
    assert inv[0] == inv[1] != inv[2]


# -----------------------------------------------------------------------------
# the library object
# -----------------------------------------------------------------------------
def test_library_validation(hand: TemplateLibrary) -> None:
    good = _fields(hand)
    bad_cases = {
        "multiplicity must have shape": {"multiplicity": hand.multiplicity[:-1]},
        "log_likelihood has shape": {"log_likelihood": hand.log_likelihood[:, :5]},
        "formula must have shape": {"formula": hand.formula[:-1]},
        "split must have shape": {"split": np.asarray(["train"], dtype=object)},
        "wyckoff must have shape": {"wyckoff": np.asarray(["a"], dtype=object)},
        "non-decreasing": {"site_template": hand.site_template[::-1].copy()},
        "at least 1": {"multiplicity": np.zeros_like(hand.multiplicity)},
        "geometry must cover": {
            "geometry": TemplateGeometry(
                np.zeros((1, 3, 3)), np.zeros(2, np.int64), np.zeros((0, 3)), np.zeros(0, np.int16)
            )
        },
    }
    for match, change in bad_cases.items():
        with pytest.raises(AfpxError, match=match):
            TemplateLibrary(**{**good, **change})  # type: ignore[arg-type]


def test_geometry_validation() -> None:
    with pytest.raises(AfpxError, match=r"expected \(n, 3, 3\)"):
        TemplateGeometry(np.zeros((1, 3)), np.zeros(2, np.int64), np.zeros((0, 3)), np.zeros(0))
    with pytest.raises(AfpxError, match="non-decreasing"):
        TemplateGeometry(np.zeros((1, 3, 3)), np.array([2, 0]), np.zeros((0, 3)), np.zeros(0))
    with pytest.raises(AfpxError, match="atom_start says"):
        TemplateGeometry(np.zeros((1, 3, 3)), np.array([0, 2]), np.zeros((1, 3)), np.zeros(1))


def test_with_likelihood_and_subset(hand: TemplateLibrary) -> None:
    const = hand.with_likelihood(np.full((hand.n_sites, 118), 0.5))
    ds = best_candidates(const, [MN, GE])
    assert np.allclose(ds.log_score.values, hand.n_unique_sites[ds.template.values] * np.log(0.5))
    with pytest.raises(AfpxError, match="expected"):
        hand.with_likelihood(np.ones((2, 118)))
    with pytest.raises(AfpxError, match="within"):
        hand.with_likelihood(np.full((hand.n_sites, 118), 2.0))
    sub = hand.subset([1])
    assert sub.n_templates == 1 and sub.n_sites == 3
    assert candidate_dict(best_candidates(sub, [MN, GE])) == {
        (0, c): s for (t, c), s in candidate_dict(best_candidates(hand, [MN, GE])).items() if t == 1
    }
    assert hand.subset(np.array([True, False, True])).n_templates == 2
    with pytest.raises(AfpxError, match="out of range"):
        hand.subset([5])
    with pytest.raises(AfpxError, match="mask must have shape"):
        hand.subset(np.array([True]))


def test_known_compositions(hand: TemplateLibrary) -> None:
    assert hand.known_compositions([MN, GE]).tolist() == [[1, 2], [1, 3]]
    assert hand.known_compositions([MN]).tolist() == [[1]]
    assert hand.known_compositions([LI, OX]).shape == (0, 2)


def test_from_cube_uses_draw_zero_and_the_mean(tmp_path: Path) -> None:
    import xarray as xr

    path = cube_with_likelihood(tmp_path / "c.zarr", draws=3, mean=True)
    ds = xr.open_zarr(path, consolidated=False)
    lib = TemplateLibrary.from_cube(ds)
    draw0 = np.flatnonzero(ds.draw.values == 0)
    assert lib.n_sites == draw0.size
    assert lib.n_templates == ds.sizes["structure"]
    mean = ds.likelihood_mean.values[draw0]
    assert np.allclose(lib.log_likelihood, np.log(mean), atol=1e-6)
    assert lib.attrs["likelihood_variable"] == "likelihood_mean"
    assert np.array_equal(lib.z, ds.z.values[draw0])
    assert lib.split is not None and set(lib.split) <= {"train", "holdout", "test"}
    # without the mean, the plain likelihood
    lib1 = TemplateLibrary.from_cube(ds.drop_vars("likelihood_mean"))
    assert np.allclose(lib1.log_likelihood, np.log(ds.likelihood.values[draw0]), atol=1e-6)
    # the element coordinate decides the columns
    rev = ds.drop_vars("likelihood_mean").isel(element=slice(None, None, -1))
    assert np.allclose(TemplateLibrary.from_cube(rev).log_likelihood, lib1.log_likelihood)


def test_from_cube_errors(tmp_path: Path) -> None:
    import xarray as xr

    path = cube_with_likelihood(tmp_path / "c.zarr", likelihood=False)
    with pytest.raises(AfpxError, match=r"afpx likelihood CUBE --model MODEL"):
        TemplateLibrary.from_cube(xr.open_zarr(path, consolidated=False))
    path = cube_with_likelihood(tmp_path / "d.zarr")
    ds = xr.open_zarr(path, consolidated=False).load()
    ds["likelihood"][0, 0] = np.nan
    with pytest.raises(AfpxError, match="non-finite"):
        TemplateLibrary.from_cube(ds)
    ds = xr.open_zarr(path, consolidated=False).load().isel(element=slice(0, 50))
    with pytest.raises(AfpxError, match="50 elements"):
        TemplateLibrary.from_cube(ds)


def test_from_structures_with_geometry(data_dir: Path) -> None:
    from afpx.structures import read_structures

    result = read_structures([data_dir / "cod" / "1011211.cif"])
    lib = TemplateLibrary.from_structures(result.structures)
    assert lib.geometry is not None and lib.geometry.has(0)
    assert lib.multiplicity.tolist() == [1, 1, 3]
    with pytest.raises(AfpxError, match="likelihood has shape"):
        TemplateLibrary.from_structures(result.structures, likelihood=np.ones((1, 118)))
    assert lib.subset([0]).geometry is not None


def test_from_cube_element_coordinate_must_cover_every_z(tmp_path: Path) -> None:
    import xarray as xr

    path = cube_with_likelihood(tmp_path / "c.zarr")
    ds = xr.open_zarr(path, consolidated=False).load()
    z = ds.element.values.copy()
    z[1] = z[0]
    with pytest.raises(AfpxError, match="once each"):
        TemplateLibrary.from_cube(ds.assign_coords(element=z))


@settings(max_examples=8, deadline=None, suppress_health_check=_FIXTURE)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(3, 4))
def test_banded_steps_are_exact(monkeypatch: pytest.MonkeyPatch, seed: int, k: int) -> None:
    with monkeypatch.context() as m:
        m.setattr(plan, "BF_MAX_ASSIGNMENTS", 0)
        m.setattr(maxplus, "BAND_MIN_DIMS", 2)
        m.setattr(maxplus, "BAND_MIN_CELLS", 0)
        rng = np.random.default_rng(seed)
        lib = random_library(rng, 10, max_sites=6 if k == 3 else 5)
        zs = rng.choice(np.arange(1, 119), k, replace=False).tolist()
        _check_against_naive(lib, zs)


def test_element_tables_equal_pymatgen() -> None:
    """The copied symbols, electronegativities and special formulas are pymatgen's."""
    import warnings

    from pymatgen.core.composition import Composition
    from pymatgen.core.periodic_table import Element

    from afpx.templates.elements import ELECTRONEGATIVITY, SPECIAL_FORMULAS, SYMBOLS

    assert list(SYMBOLS) == schema.element_symbols()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymatgen warns for elements without X
        xs = [float(Element(s).X) for s in SYMBOLS]
    np.testing.assert_array_equal(np.asarray(ELECTRONEGATIVITY), np.asarray(xs))
    assert dict(Composition.special_formulas) == SPECIAL_FORMULAS


def test_rank_path_imports_no_xarray_pandas_dask_pymatgen_or_torch() -> None:
    import subprocess
    import sys

    script = (
        "import sys\n"
        "import numpy as np\n"
        "from afpx.commands.rank import render\n"
        "from afpx.rank import rank_table\n"
        "from afpx.templates import TemplateLibrary\n"
        "rng = np.random.default_rng(0)\n"
        "n = 30\n"
        "st = np.repeat(np.arange(n), 3)\n"
        "lib = TemplateLibrary(site_template=st, multiplicity=np.ones(st.size, np.int32),\n"
        "    z=np.full(st.size, 25, np.int16),\n"
        "    log_likelihood=np.log(rng.random((st.size, 118), dtype=np.float32) + 0.01),\n"
        "    structure_id=np.asarray([f't{i}' for i in range(n)], dtype=object),\n"
        "    formula=np.asarray(['X'] * n, dtype=object), spacegroup=np.ones(n, np.int64),\n"
        "    source=np.asarray(['x'] * n, dtype=object))\n"
        "for fmt in ('table', 'csv', 'json'):\n"
        "    render(rank_table('Mn,Ge', library=lib, known=True), fmt)\n"
        "heavy = sorted(m for m in ('xarray', 'pandas', 'dask', 'pymatgen', 'torch')\n"
        "    if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == ""


# -----------------------------------------------------------------------------
# census and upper bounds (what pruning relies on)
# -----------------------------------------------------------------------------
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(1, 4))
def test_census_equals_enumeration(seed: int, k: int) -> None:
    from afpx.templates import reduce_compositions
    from afpx.templates.census import census

    rng = np.random.default_rng(seed)
    lib = random_library(rng, 15, max_sites=6 if k < 4 else 5)
    zs = rng.choice(np.arange(1, 119), k, replace=False).tolist()
    ds = best_candidates(lib, zs, assignments=False)
    cen = census(lib, k)
    assert cen is not None and census(lib, k) is cen  # cached
    templates = rng.permutation(lib.n_templates)[: rng.integers(1, lib.n_templates + 1)]
    keep = np.isin(ds.template.values, templates)
    counts = ds.counts.values[keep]
    inverse, unique = reduce_compositions(counts)
    assert cen.n_compositions(templates) == unique.shape[0]
    assert cen.n_candidates(templates) == counts.shape[0]
    per = np.bincount(inverse, minlength=unique.shape[0])
    assert cen.n_templates(templates, unique).tolist() == per.tolist()
    # a composition no template takes (too many atoms) counts zero templates
    if k > 1:
        absent = np.asarray([[10**6] + [1] * (k - 1)])
        assert cen.n_templates(templates, absent).tolist() == [0]


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(1, 4))
def test_upper_bounds_bound_every_candidate(seed: int, k: int) -> None:
    from afpx.templates import CandidateOptions
    from afpx.templates.candidates import upper_bounds
    from afpx.templates.plan import site_log_likelihood

    rng = np.random.default_rng(seed)
    lib = random_library(rng, 15, max_sites=6 if k < 4 else 5, ties=bool(seed % 2))
    zs = rng.choice(np.arange(1, 119), k, replace=False)
    ds = best_candidates(lib, zs.tolist(), assignments=False)
    logl = site_log_likelihood(lib, zs, CandidateOptions().min_site_likelihood)
    ub = upper_bounds(logl, lib, np.arange(lib.n_templates))
    best = np.full(lib.n_templates, -np.inf)
    np.maximum.at(best, ds.template.values, ds.log_score.values)
    has = np.isfinite(best)
    assert (best[has] <= ub[has]).all()
    # the bound is reached when every element is best on a site of its own
    assert upper_bounds(logl, lib, np.zeros(0, dtype=np.int64)).size == 0


def test_row_filter() -> None:
    from afpx.templates.compositions import RowFilter

    keep = RowFilter.of(np.asarray([0, 2, 2]), np.asarray([[1, 2], [3, 1], [3, 1]]))
    t = np.asarray([0, 2, 2, 1, 9])
    c = np.asarray([[1, 2], [3, 1], [1, 3], [1, 2], [1, 2]])
    assert keep.contains(t, c).tolist() == [True, True, False, False, False]
    empty = RowFilter.of(np.zeros(0, dtype=np.int64), np.zeros((0, 2), dtype=np.int64))
    assert not empty.contains(t, c).any()
    # counts too large for one int64 code: a set of rows, the same answers
    big = RowFilter.of(np.asarray([0, 5]), np.asarray([[2**40, 1], [1, 2]]))
    assert big.rows is not None
    t = np.asarray([0, 5, 0])
    c = np.asarray([[2**40, 1], [1, 2], [1, 2]])
    assert big.contains(t, c).tolist() == [True, True, False]


@pytest.mark.filterwarnings("ignore::afpx.AfpxWarning")
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(2, 4))
def test_kept_tables_give_the_assignments_of_a_full_backtrack(seed: int, k: int) -> None:
    """Assignments worked out later from kept tables equal those of ``assignments=True``."""
    from afpx.templates import CandidateOptions, candidates, enumerate_candidates, select_templates

    rng = np.random.default_rng(seed)
    lib = random_library(rng, 30, max_sites=12 if k == 2 else 9)  # brute force and programme
    zs = check_elements(rng.choice(np.arange(1, 119), k, replace=False).tolist())
    opts = CandidateOptions()
    sel = select_templates(lib, k, opts)
    full = enumerate_candidates(lib, zs, sel, opts, assignments=True)
    kept = enumerate_candidates(lib, zs, sel, opts, assignments=False, keep_tables=True)
    assert full.assignment is not None and kept.deferred is not None
    assert kept.assignment is None
    np.testing.assert_array_equal(kept.template, full.template)
    np.testing.assert_array_equal(kept.counts, full.counts)
    np.testing.assert_array_equal(kept.log_score, full.log_score)
    rows = rng.permutation(full.template.size)[: max(1, full.template.size // 3)]
    width = full.assignment.shape[1]
    np.testing.assert_array_equal(kept.deferred(rows, width), full.assignment[rows])
    # filtered by the candidate options: rows of the result map back to the enumeration
    opts = CandidateOptions(exclude_own_formula=True, min_likelihood=1e-6)
    a, _ = candidates(lib, zs, opts, assignments=True)
    b, _ = candidates(lib, zs, opts, assignments=False, keep_tables=True)
    assert a.assignment is not None and b.deferred is not None
    np.testing.assert_array_equal(b.template, a.template)
    if a.template.size:
        got = b.deferred(np.arange(a.template.size), a.assignment.shape[1])
        np.testing.assert_array_equal(got, a.assignment)


def test_tables_beyond_the_budget_are_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    from afpx.templates import CandidateOptions, candidates

    # the module, not the function of the same name that afpx.templates exports
    candidates_module = importlib.import_module("afpx.templates.candidates")

    rng = np.random.default_rng(1)
    lib = random_library(rng, 30, max_sites=9)
    zs = check_elements([MN, GE, 3])
    kept, _ = candidates(lib, zs, CandidateOptions(), assignments=False, keep_tables=True)
    assert kept.deferred is not None
    monkeypatch.setattr(candidates_module, "KEEP_TABLE_BYTES", 0)
    plain, _ = candidates(lib, zs, CandidateOptions(), assignments=False, keep_tables=True)
    assert plain.deferred is None and plain.assignment is None
    np.testing.assert_array_equal(plain.log_score, kept.log_score)
