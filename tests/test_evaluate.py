from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from _cube_helpers import make_cube_with_likelihoods, mark_complete
from _rank_helpers import random_library
from hypothesis import given, settings
from hypothesis import strategies as st

from afpx import AfpxError, AfpxWarning, schema
from afpx.evaluate import (
    EvaluateParams,
    confusion_counts,
    error_rate,
    first_known_metrics,
    known_positions,
    likelihood_histogram,
    optimality_score,
    true_candidate_rank,
)
from afpx.evaluate.test2 import optimality_of_set, set_context
from afpx.templates import reduce_rows, tie_ranks
from afpx.templates.compositions import match_rows, rank_candidates
from afpx.templates.counting import (
    CompositionTable,
    TemplateIndex,
    TemplateSites,
    candidates_above,
    count_assignments,
    small_template_counts,
)

# -- the optimality score ------------------------------------------------------


def test_os_all_known_on_top_is_one() -> None:
    for n, q in [(10, 1), (10, 3), (57, 20), (2, 1)]:
        assert optimality_score(np.arange(1, q + 1), n) == pytest.approx(1.0)


def test_os_all_known_at_bottom_is_minus_one() -> None:
    for n, q in [(10, 1), (10, 3), (57, 20), (2, 1)]:
        assert optimality_score(np.arange(n - q + 1, n + 1), n) == pytest.approx(-1.0)


def test_os_exact_value_of_a_hand_made_list() -> None:
    # N = 5, known at 1 and 4: (5*2 + 2 - 2*5) / (5*2 - 4) = 2 / 6
    assert optimality_score(np.array([1, 4]), 5) == pytest.approx(1 / 3)
    # N = 4, known at 2: (4 + 1 - 4) / (4 - 1) = 1/3
    assert optimality_score(np.array([2]), 4) == pytest.approx(1 / 3)


def test_os_undefined_when_nothing_or_everything_known() -> None:
    with np.errstate(all="raise"):  # no division by zero anywhere
        assert math.isnan(optimality_score(np.array([1, 2, 3]), 3))
        assert math.isnan(optimality_score(np.array([]), 7))
        assert math.isnan(optimality_score(np.array([1.0]), 1))


def test_os_rejects_positions_outside_the_list() -> None:
    with pytest.raises(AfpxError, match="positions must lie"):
        optimality_score(np.array([0, 2]), 5)
    with pytest.raises(AfpxError, match="positions must lie"):
        optimality_score(np.array([6]), 5)


def test_os_mean_is_zero_on_random_rankings() -> None:
    rng = np.random.default_rng(42)
    values = []
    for _ in range(4000):
        n = int(rng.integers(2, 60))
        q = int(rng.integers(1, n))
        positions = rng.choice(np.arange(1, n + 1), size=q, replace=False)
        values.append(optimality_score(positions, n))
    values = np.asarray(values)
    assert values.min() >= -1 - 1e-12 and values.max() <= 1 + 1e-12
    # standard error of the mean is about 0.6 / sqrt(4000) ~ 0.01
    assert abs(values.mean()) < 0.04


def test_os_with_ties_is_zero_when_everything_ties() -> None:
    scores = np.zeros(8)
    mid, _, _, _ = tie_ranks(scores)
    assert optimality_score(mid[[0, 3, 5]], 8) == pytest.approx(0.0)


def test_os_with_partial_ties() -> None:
    # known items tie with one unknown item at the top: mid-rank 2 for all three
    scores = np.array([5.0, 5.0, 5.0, 1.0, 0.0])
    mid, opt, pes, _ = tie_ranks(scores)
    np.testing.assert_array_equal(mid, [2, 2, 2, 4, 5])
    np.testing.assert_array_equal(opt, [1, 1, 1, 4, 5])
    np.testing.assert_array_equal(pes, [3, 3, 3, 4, 5])
    # N = 5, Q = 2, sum = 4: (10 + 2 - 8) / (10 - 4) = 2/3
    assert optimality_score(mid[:2], 5) == pytest.approx(2 / 3)
    q_mid, q_opt, q_pes = known_positions(scores, np.array([True, True, False, False, False]))
    np.testing.assert_array_equal(q_mid, [2, 2])
    assert sorted(q_opt) == [1, 2] and sorted(q_pes) == [2, 3]
    assert optimality_score(q_opt, 5) == pytest.approx(1.0)
    assert optimality_score(q_pes, 5) == pytest.approx(1 / 3)
    # the score of the mid-ranks is the mean of the two
    assert optimality_score(q_mid, 5) == pytest.approx(0.5 * (1 + 1 / 3))


# -- ranks with ties -------------------------------------------------------------


def test_tie_ranks_do_not_depend_on_input_order() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=30).astype(float)
    mid, opt, pes, _ = tie_ranks(scores)
    perm = rng.permutation(30)
    mid2, opt2, pes2, _ = tie_ranks(scores[perm])
    np.testing.assert_array_equal(mid[perm], mid2)
    np.testing.assert_array_equal(opt[perm], opt2)
    np.testing.assert_array_equal(pes[perm], pes2)
    # the definition: 1 + better + tied others / 2
    for i, s in enumerate(scores):
        better = (scores > s).sum()
        tied = (scores == s).sum() - 1
        assert mid[i] == 1 + better + tied / 2
        assert opt[i] == 1 + better and pes[i] == 1 + better + tied
    # mid-ranks always sum to n (n + 1) / 2
    assert mid.sum() == pytest.approx(30 * 31 / 2)


def test_tie_ranks_tolerance_and_infinities() -> None:
    mid, _, _, _ = tie_ranks(np.array([1.0, 1.0 + 1e-12, 0.5, -np.inf, -np.inf]))
    np.testing.assert_array_equal(mid, [1.5, 1.5, 3, 4.5, 4.5])
    mid, _, _, _ = tie_ranks(np.array([1.0, 1.0 + 1e-3]), tolerance=1e-9)
    np.testing.assert_array_equal(mid, [2, 1])


def test_known_positions_match_brute_force() -> None:
    rng = np.random.default_rng(5)
    for _ in range(50):
        scores = rng.integers(0, 5, size=20).astype(float)
        known = rng.random(20) < 0.4
        mid, opt, pes = known_positions(scores, known)
        # optimistic: sort by (-score, unknown-last); pessimistic: (-score, known-last)
        pos_opt = np.empty(20, int)
        pos_opt[np.lexsort((~known, -scores))] = np.arange(1, 21)
        pos_pes = np.empty(20, int)
        pos_pes[np.lexsort((known, -scores))] = np.arange(1, 21)
        np.testing.assert_array_equal(opt, pos_opt[known])
        np.testing.assert_array_equal(pes, pos_pes[known])
        assert mid.sum() == pytest.approx(0.5 * (opt.sum() + pes.sum()))
    with pytest.raises(AfpxError, match="known has shape"):
        known_positions(np.zeros(3), np.zeros(2, dtype=bool))


def test_tie_ranks_errors() -> None:
    with pytest.raises(AfpxError, match="NaN"):
        tie_ranks(np.array([1.0, np.nan]))
    with pytest.raises(AfpxError, match="one-dimensional"):
        tie_ranks(np.zeros((2, 2)))


def test_first_known_metrics() -> None:
    m = first_known_metrics(np.array([4.5, 12.0]), (1, 10))
    assert m == {"first_rank": 4.5, "reciprocal_rank": 1 / 4.5, "hit@1": 0.0, "hit@10": 1.0}
    m = first_known_metrics(np.array([]), (1,))
    assert math.isnan(m["first_rank"]) and m["reciprocal_rank"] == 0.0 and m["hit@1"] == 0.0


def test_params_are_checked() -> None:
    with pytest.raises(AfpxError, match="unknown split"):
        EvaluateParams(split="validation")
    with pytest.raises(AfpxError, match="at least 10"):
        EvaluateParams(test1_cap=5)
    with pytest.raises(AfpxError, match="positive"):
        EvaluateParams(set_sizes=(0,))
    attrs = EvaluateParams().to_attrs()
    assert attrs["case_study"] == [["Mn", "Ge"], ["Li", "Mn", "Ge"]]


# -- exact counting of the assignments that beat a score ---------------------------


def _brute_count(logl: np.ndarray, mult: np.ndarray, target: np.ndarray, thr: float):
    n, k = logl.shape
    better = tied = total = 0
    best = -math.inf
    for a in itertools.product(range(k), repeat=n):
        a = np.asarray(a)
        counts = np.bincount(a, weights=mult, minlength=k)
        if (counts != target).any():
            continue
        total += 1
        s = logl[np.arange(n), a].sum()
        best = max(best, s)
        if s > thr + 1e-9:
            better += 1
        elif s >= thr - 1e-9:
            tied += 1
    return better, tied, total, best


def test_count_assignments_equals_brute_force() -> None:
    rng = np.random.default_rng(7)
    for trial in range(150):
        n, k = int(rng.integers(1, 7)), int(rng.integers(1, 4))
        logl = np.log(rng.random((n, k)))
        if trial % 2:
            logl = np.round(logl, 1)  # many ties
        mult = rng.choice([1, 2, 3, 4], size=n)
        a = rng.integers(0, k, size=n)
        target = np.bincount(a, weights=mult, minlength=k).astype(int)
        thr = float(logl[np.arange(n), a].sum())
        got = count_assignments(logl, mult, target, thr)
        better, tied, total, best = _brute_count(logl, mult, target, thr)
        assert (got.better, got.tied, got.total) == (better, tied, total)
        assert got.best == pytest.approx(best)
        assert not got.truncated
        only_better = count_assignments(logl, mult, target, thr, strict=True)
        assert (only_better.better, only_better.tied) == (better, 0)


def test_count_assignments_cap_and_unreachable_target() -> None:
    logl = np.zeros((6, 2))  # every assignment ties
    mult = np.ones(6, dtype=int)
    got = count_assignments(logl, mult, np.array([3, 3]), 0.0)
    assert (got.better, got.tied, got.total) == (0, 20, 20.0)
    got = count_assignments(logl, mult, np.array([3, 3]), 0.0, cap=5)
    assert got.tied == 5 and got.truncated
    got = count_assignments(logl, mult, np.array([4, 3]), 0.0)  # counts do not add up
    assert got.total == 0 and got.best == -math.inf
    got = count_assignments(np.zeros((2, 2)), np.array([2, 2]), np.array([1, 3]), 0.0)
    assert got.total == 0  # reachable in sum, not in parts
    with pytest.raises(AfpxError, match="shapes disagree"):
        count_assignments(np.zeros((2, 2)), np.array([1]), np.array([1, 1]), 0.0)


# -- confusion matrix, error rate, histograms -------------------------------------


def test_confusion_sums_to_sites_and_error_rate_is_one_minus_trace() -> None:
    rng = np.random.default_rng(1)
    true = rng.choice([3, 8, 25, 32], size=500)
    pred = np.where(rng.random(500) < 0.7, true, rng.choice([3, 8, 25, 32], size=500))
    counts = confusion_counts(true, pred)
    assert counts.shape == (schema.N_ELEMENTS, schema.N_ELEMENTS)
    assert counts.sum() == 500
    assert error_rate(counts) == pytest.approx(1 - np.trace(counts) / 500)
    assert error_rate(counts) == pytest.approx(np.mean(true != pred))
    assert counts[7, 7] == np.sum((true == 8) & (pred == 8))
    assert math.isnan(error_rate(np.zeros((3, 3))))


def test_confusion_errors() -> None:
    with pytest.raises(AfpxError, match="differ in shape"):
        confusion_counts(np.array([1, 2]), np.array([1]))
    with pytest.raises(AfpxError, match="predicted atomic numbers"):
        confusion_counts(np.array([1]), np.array([0]))


def test_likelihood_histogram_true_and_other() -> None:
    lk = np.full((3, schema.N_ELEMENTS), 0.01)
    z = np.array([1, 8, 8])
    lk[np.arange(3), z - 1] = [0.99, 0.5, 1.0]
    true, other = likelihood_histogram(lk, z, bins=10)
    assert true.sum() == 3 and other.sum() == 3 * (schema.N_ELEMENTS - 1)
    assert true[9] == 2 and true[5] == 1 and other[0] == 3 * 117
    with pytest.raises(AfpxError, match="does not match"):
        likelihood_histogram(lk, np.array([1]))


# -- Test 1 for one structure ----------------------------------------------------------


class _Templates:
    """Hand-made templates: per template (log-likelihood (n, k), multiplicities)."""

    def __init__(self, templates: list[tuple[np.ndarray, np.ndarray]], composition: np.ndarray):
        self.templates = templates
        self.composition = np.asarray(composition)

    def target(self, t: int) -> np.ndarray:
        m = self.templates[t][1]
        return self.composition * (int(m.sum()) // int(self.composition.sum()))

    def __call__(self, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        logl, mult = self.templates[t]
        return logl, mult, self.target(t)

    def all_scores(self) -> list[tuple[int, tuple[int, ...], float]]:
        out = []
        for t, (logl, mult) in enumerate(self.templates):
            if int(mult.sum()) % int(self.composition.sum()):
                continue
            target = self.target(t)
            n, k = logl.shape
            for a in itertools.product(range(k), repeat=n):
                counts = np.bincount(np.asarray(a), weights=mult, minlength=k)
                if (counts == target).all():
                    out.append((t, a, float(logl[np.arange(n), list(a)].sum())))
        return out

    def best(self) -> tuple[np.ndarray, np.ndarray]:
        best: dict[int, float] = {}
        for t, _, s in self.all_scores():
            best[t] = max(best.get(t, -math.inf), s)
        ts = np.asarray(sorted(best))
        return ts, np.asarray([best[t] for t in ts])


def _test1(tpl: _Templates, true_assignment: tuple[int, ...], **kw: int):
    logl0 = tpl.templates[0][0]
    true_score = 0.0
    for j, e in enumerate(true_assignment):  # in site order, as the counting sums
        true_score += float(logl0[j, e])
    ts, _ = tpl.best()
    bound = np.asarray([tpl.templates[t][0].max(axis=1).sum() for t in ts.tolist()])
    kw.setdefault("cap", 1000)
    return true_candidate_rank(0, true_score, ts, bound, tpl, n_templates=float(ts.size), **kw)


def _lg(*rows: tuple[float, ...]) -> np.ndarray:
    return np.log(np.asarray(rows, dtype=float))


# two elements A (0) and B (1), composition AB; template 0 is the structure's own
ONE = np.array([1, 1])


def test_test1_true_assignment_best() -> None:
    tpl = _Templates(
        [(_lg((0.9, 0.1), (0.2, 0.8)), ONE), (_lg((0.5, 0.5), (0.5, 0.4)), ONE)], np.array([1, 1])
    )
    r = _test1(tpl, (0, 1))
    assert (r.rank, r.rank_optimistic, r.rank_pessimistic) == (1.0, 1.0, 1.0)
    assert r.template_rank == 1.0 and not r.censored and r.n_templates == 2


def test_test1_true_assignment_worst() -> None:
    # site 0 wants B and site 1 wants A: the true AB is the worst of the 4 candidates
    tpl = _Templates(
        [(_lg((0.1, 0.9), (0.8, 0.2)), ONE), (_lg((0.5, 0.5), (0.5, 0.4)), ONE)], np.array([1, 1])
    )
    r = _test1(tpl, (0, 1))
    assert (r.rank, r.rank_optimistic, r.rank_pessimistic) == (4.0, 4.0, 4.0)
    # at template level only template 1's best competes (own alternatives are ignored)
    assert r.template_rank == 2.0


def test_test1_true_assignment_tied() -> None:
    # own template is symmetric (rock-salt like): AB and BA tie; a third template ties too
    tpl = _Templates(
        [(_lg((0.7, 0.7), (0.7, 0.7)), ONE), (_lg((0.7, 0.7), (0.7, 0.7)), ONE)], np.array([1, 1])
    )
    r = _test1(tpl, (0, 1))
    # 3 other candidates tie: mid-rank 1 + 3/2
    assert (r.rank, r.rank_optimistic, r.rank_pessimistic) == (2.5, 1.0, 4.0)
    assert (r.template_rank, r.template_rank_optimistic, r.template_rank_pessimistic) == (1.5, 1, 2)


def test_test1_censored_at_the_cap() -> None:
    # 40 identical templates beat the true assignment
    good = (_lg((0.9, 0.1), (0.1, 0.9)), ONE)
    tpl = _Templates([(_lg((0.5, 0.5), (0.5, 0.5)), ONE)] + [good] * 40, np.array([1, 1]))
    r = _test1(tpl, (0, 1), cap=20)
    assert r.censored and math.isnan(r.rank) and math.isnan(r.rank_optimistic)
    # ties only: the optimistic rank stays exact
    tpl = _Templates([(_lg((0.5, 0.5), (0.5, 0.5)), ONE)] * 30, np.array([1, 1]))
    r = _test1(tpl, (0, 1), cap=20)
    assert r.censored and r.rank_optimistic == 1.0 and math.isnan(r.rank_pessimistic)


def test_test1_equals_brute_force_on_random_templates() -> None:
    rng = np.random.default_rng(11)
    for _ in range(40):
        k = int(rng.integers(2, 4))
        templates = []
        for _t in range(int(rng.integers(1, 6))):
            n = int(rng.integers(k, 6))
            logl = np.log(np.round(rng.random((n, k)), 1) + 0.05)  # rounded: ties happen
            templates.append((logl, rng.choice([1, 2, 4], size=n)))
        a = np.arange(len(templates[0][1])) % k  # every element used
        counts = np.bincount(a, weights=templates[0][1], minlength=k).astype(int)
        tpl = _Templates(templates, counts // np.gcd.reduce(counts))
        r = _test1(tpl, tuple(a.tolist()))
        true_score = sum(float(templates[0][0][j, e]) for j, e in enumerate(a.tolist()))
        scores = np.asarray(
            [s for t, ass, s in tpl.all_scores() if not (t == 0 and ass == tuple(a))]
        )
        better = int((scores > true_score + 1e-9).sum())
        tied = int((np.abs(scores - true_score) <= 1e-9).sum())
        assert r.rank_optimistic == 1 + better and r.rank_pessimistic == 1 + better + tied
        assert r.rank == 1 + better + tied / 2


def test_test1_rejects_candidates_without_own_template() -> None:
    with pytest.raises(AfpxError, match="missing from the candidates"):
        true_candidate_rank(0, 0.0, np.array([1]), np.array([0.0]), lambda t: (None, None, None))


# -- the whole run on hand-made cubes --------------------------------------------------

NA, CL, MG, OX = 11, 17, 12, 8


def _handmade_cube(true_site_likelihood: tuple[tuple[float, float], tuple[float, float]]):
    """NaCl (test) and MgO (train), two sites of multiplicity 4 each.

    ``true_site_likelihood[i] = (L(Na), L(Cl))`` on site i of NaCl, whose
    true assignment is Na on site 0 and Cl on site 1. MgO's sites give 0.5 to
    Na and Cl, so its NaCl candidates score 0.25 either way.
    """
    import xarray as xr

    z = np.array([NA, CL, MG, OX], dtype=np.int16)
    lk = np.full((4, schema.N_ELEMENTS), 0.01, dtype=np.float32)
    for i in range(2):
        lk[i, NA - 1], lk[i, CL - 1] = true_site_likelihood[i]
    lk[2:, NA - 1] = lk[2:, CL - 1] = 0.5
    lk[2, MG - 1] = lk[3, OX - 1] = 0.9
    site = schema.SITE
    st = schema.STRUCTURE
    return xr.Dataset(
        {
            schema.Z: ((site,), z),
            schema.MULTIPLICITY: ((site,), np.array([4, 4, 4, 4], dtype=np.int32)),
            schema.STRUCTURE_INDEX: ((site,), np.array([0, 0, 1, 1], dtype=np.int64)),
            schema.DRAW: ((site,), np.zeros(4, dtype=np.int16)),
            schema.COORDINATION: ((site,), np.full(4, 6, dtype=np.int16)),
            schema.LIKELIHOOD: ((site, schema.ELEMENT), lk),
            schema.SOFTMAX_PRED: ((site,), np.array([NA, NA, MG, OX], dtype=np.int16)),
            schema.STRUCTURE_ID: ((st,), np.array(["nacl", "mgo"], dtype=object)),
            schema.FORMULA: ((st,), np.array(["NaCl", "MgO"], dtype=object)),
            schema.SOURCE: ((st,), np.array(["hand", "hand"], dtype=object)),
            schema.SPACEGROUP: ((st,), np.array([225, 225], dtype=np.int16)),
            schema.SPLIT: ((st,), np.array(["test", "train"], dtype=object)),
        }
    )


FAST = EvaluateParams(baselines=("constant", "frequency"), case_study=(("Na", "Cl"),))


@pytest.mark.parametrize(
    ("site_likelihood", "ranks"),
    [
        (((0.9, 0.1), (0.1, 0.9)), (1.0, 1.0, 1.0)),  # true assignment best
        (((0.1, 0.9), (0.9, 0.1)), (4.0, 4.0, 4.0)),  # worst of NaCl/ClNa x 2 templates
        (((0.5, 0.5), (0.5, 0.5)), (2.5, 1.0, 4.0)),  # all four candidates tie
    ],
)
def test_evaluate_test1_best_worst_tied(site_likelihood, ranks) -> None:
    from afpx.evaluate import evaluate

    report = evaluate(_handmade_cube(site_likelihood), params=FAST)
    a = report.arrays.sel(model="model")
    got = tuple(
        float(a[f"test1_{v}"].item()) for v in ("rank", "rank_optimistic", "rank_pessimistic")
    )
    assert got == ranks
    assert float(report.arrays["test1_n_candidates"].item()) == 4.0  # 2 templates x 2 assignments
    m = report.metrics
    assert m["test1"]["model"]["n_structures"] == 1
    assert m["test1"]["model"]["top1"] == float(ranks[0] <= 1)
    assert m["test1"]["model"]["candidates_per_structure"]["total"] == 4.0
    # the constant baseline ties everything: mid-rank 2.5
    assert float(report.arrays.sel(model="constant")["test1_rank"].item()) == 2.5


def test_evaluate_test2_and_case_study_on_handmade_cube() -> None:
    from afpx.evaluate import evaluate

    report = evaluate(_handmade_cube(((0.9, 0.1), (0.1, 0.9))), params=FAST)
    m = report.metrics
    binary = m["test2"]["all_templates"]["model"]["binary"]
    # Na-Cl generates only NaCl: Q = N = 1, so the OS is undefined, the first rank is 1
    assert binary["n_sets"] == 1 and binary["n_os_undefined"] == 1 and binary["hit@1"] == 1.0
    # without the own formula, only MgO's template yields NaCl (best of its two assignments)
    leak = m["test2"]["no_own_formula"]["model"]["binary"]
    assert leak["n_known_missing"] == 0 and leak["n_candidates_scored"] == 1
    assert leak["hit@1"] == 1.0
    top = m["case_study"]["Na-Cl"]["model"]["top"]
    assert top[0]["formula"] == "NaCl" and top[0]["known"] and top[0]["template"] == "nacl"
    assert m["softmax"]["test"]["n_sites"] == 2
    assert m["softmax"]["test"]["error_rate"] == pytest.approx(0.5)  # Cl predicted as Na
    assert m["softmax"]["train"]["error_rate"] == 0.0
    assert int(report.arrays["confusion"].sel(split="test").sum()) == 2
    assert "verdict" in m and "model" in report.table()


def _same_report(one, two) -> None:
    import xarray as xr

    for key in ("test1", "test2", "case_study", "softmax", "candidate_space"):
        assert one.metrics[key] == two.metrics[key], key
    xr.testing.assert_identical(one.arrays, two.arrays)


@pytest.fixture(scope="module")
def synthetic_cube(tmp_path_factory):
    import xarray as xr

    path = make_cube_with_likelihoods(tmp_path_factory.mktemp("eval") / "cube.zarr")
    return xr.open_zarr(path, consolidated=False).load()


def test_evaluate_is_the_same_on_every_scheduler(synthetic_cube) -> None:
    # threads, synchronous and a 2-process distributed cluster, one set per task or
    # many: bit-identical Test 1, Test 2, case study (and arrays)
    distributed = pytest.importorskip("distributed")
    from afpx.evaluate import evaluate
    from afpx.evaluate.metrics import as_str_array

    params = EvaluateParams(baselines=("constant", "random", "frequency"))
    threads = evaluate(synthetic_cube, params=params, scheduler="threads", workers=2)
    assert threads.metrics["test1"]["model"]["n_structures"] > 0
    # by default Test 2 covers every binary and ternary set of the test split
    ds = synthetic_cube
    structure = ds[schema.STRUCTURE_INDEX].values
    is_test = as_str_array(ds[schema.SPLIT].values)[structure] == "test"
    z = ds[schema.Z].values
    test_sets = {tuple(sorted(set(z[structure == s]))) for s in np.unique(structure[is_test])}
    n_sets = sum(len(S) in (2, 3) for S in test_sets)
    assert n_sets > 0
    assert threads.metrics["test2"]["all_templates"]["model"]["all"]["n_sets"] == n_sets
    sync = evaluate(synthetic_cube, params=params, scheduler="synchronous", sets_per_task=1)
    _same_report(threads, sync)
    procs = evaluate(synthetic_cube, params=params, scheduler="processes", workers=2)
    _same_report(threads, procs)
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
        distributed.get_task_stream(client) as stream,
    ):
        # the active client is respected: the sets run on its workers
        on_cluster = evaluate(synthetic_cube, params=params, sets_per_task=2)
    _same_report(threads, on_cluster)
    keys = {str(t["key"]) for t in stream.data}
    assert any("afpx-evaluate-sets" in k for k in keys)
    assert len({t["worker"] for t in stream.data}) >= 1


def test_evaluate_checks_its_scheduler_options(synthetic_cube) -> None:
    from afpx.evaluate import evaluate

    params = EvaluateParams(baselines=())
    with pytest.raises(AfpxError, match="workers must be at least 1"):
        evaluate(synthetic_cube, params=params, workers=0)
    with pytest.raises(AfpxError, match="sets_per_task must be at least 1"):
        evaluate(synthetic_cube, params=params, sets_per_task=0)
    with pytest.raises(AfpxError, match="unknown scheduler 'fast'"):
        evaluate(synthetic_cube, params=params, scheduler="fast")


def test_evaluation_graph_batches_sets_in_order() -> None:
    from afpx.evaluate.graph import EvaluationState, evaluation_graph, set_batches

    sets = [(1, 2), (1, 3), (2, 3), (1, 2, 3), (1, 2, 4)]
    assert set_batches(sets, 2) == [[(1, 2), (1, 3)], [(2, 3), (1, 2, 3)], [(1, 2, 4)]]
    assert set_batches(sets, 16) == [sets]
    with pytest.raises(AfpxError, match="sets per task must be at least 1"):
        set_batches(sets, 0)
    # the state is one key that every task reads
    state = EvaluationState(
        index=None,
        tables={},
        columns={},
        params=EvaluateParams(baselines=()),
        by_set={},
        test1_by_set={},
        test2_sets=frozenset(),
    )
    graph = evaluation_graph(state, sets, sets_per_task=2)
    assert len(graph) == 3
    deps = [set(dict(d.dask)) - {d.key} for d in graph]
    assert all(len(x) == 1 for x in deps) and deps[0] == deps[1] == deps[2]


def test_true_scores_of_a_set_equal_the_full_arrays() -> None:
    from afpx.evaluate.test1 import true_scores_of_set

    lib = random_library(np.random.default_rng(4), n_templates=40)
    index = TemplateIndex.from_arrays(lib.site_template, lib.z, lib.multiplicity)
    tc = index.compositions
    sets = [s for s in set(tc.element_set) if len(s) >= 2]
    S = max(sets, key=lambda s: (sum(e == s for e in tc.element_set), s))
    own = np.asarray([t for t, es in enumerate(tc.element_set) if es == S])
    logl = np.asarray(lib.log_likelihood[:, np.asarray(S) - 1], dtype=np.float64)
    got = true_scores_of_set(index, logl, own)
    np.testing.assert_array_equal(got, index.true_scores(lib.log_likelihood, own))
    with pytest.raises(AfpxError, match="exactly their element set"):
        true_scores_of_set(index, logl[:, :1], own)


def test_evaluate_refuses_cubes_without_likelihoods_or_splits() -> None:
    from afpx.evaluate import evaluate

    ds = _handmade_cube(((0.9, 0.1), (0.1, 0.9)))
    with pytest.raises(AfpxError, match="afpx likelihood"):
        evaluate(ds.drop_vars(schema.LIKELIHOOD), params=FAST)
    with pytest.raises(AfpxError, match="split"):
        evaluate(ds.drop_vars(schema.SPLIT), params=FAST)
    ds[schema.LIKELIHOOD].attrs["complete"] = False
    with pytest.raises(AfpxError, match="not completely written"):
        evaluate(ds, params=FAST)
    ds[schema.LIKELIHOOD].attrs["complete"] = True
    with pytest.raises(AfpxError, match="no structure of the cube is in the 'holdout'"):
        evaluate(ds, params=EvaluateParams(split="holdout", baselines=()))
    with pytest.raises(AfpxError, match="unknown element symbol"):
        evaluate(ds, params=EvaluateParams(case_study=(("Xx",),), baselines=()))
    with pytest.raises(AfpxError, match="coordination baseline needs"):
        evaluate(
            ds.drop_vars(schema.COORDINATION), params=EvaluateParams(baselines=("coordination",))
        )


def test_verdict_reports_a_model_that_does_not_beat_every_baseline() -> None:
    from afpx.evaluate import verdict

    metrics = {
        "models": ["model", "constant", "random"],
        "test1": {
            "model": {"top1": 0.3, "top10": 0.5},
            "constant": {"top1": 0.1, "top10": 0.5},
            "random": {"top1": 0.4, "top10": 0.2},
        },
        "test2": {},
    }
    v = verdict(metrics)
    assert not v["beats_every_baseline"]
    assert v["not_beaten"] == ["Test 1 top-1", "Test 1 top-10"]
    assert v["tied_with_a_baseline"] == ["Test 1 top-10"]
    assert v["per_metric"]["Test 1 top-1"]["best_baseline"] == "random"
    metrics["test1"]["model"] = {"top1": 0.9, "top10": 0.9}
    assert verdict(metrics)["beats_every_baseline"]


# -- the command line ------------------------------------------------------------------


def test_cli_evaluate_writes_report(tmp_path) -> None:
    import json

    import xarray as xr
    from click.testing import CliRunner

    from afpx.cli import main

    cube = make_cube_with_likelihoods(tmp_path / "cube.zarr")
    out = tmp_path / "report"
    res = CliRunner().invoke(
        main,
        [
            "evaluate",
            str(cube),
            "-o",
            str(out),
            "--baselines",
            "constant,random",
            "--no-progress",
            "--scheduler",
            "synchronous",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "Test 1 top-1" in res.output and "constant" in res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["models"] == ["model", "constant", "random"]
    assert metrics["softmax"]["test"]["error_rate"] == 0.0
    arrays = xr.open_zarr(out / "arrays.zarr", consolidated=False)
    assert int(arrays["confusion"].sum()) == sum(
        metrics["softmax"][s]["n_sites"] for s in schema.SPLITS
    )


def test_cli_evaluate_fails_clearly_without_likelihoods(tmp_path) -> None:
    from _cube_helpers import make_synthetic_cube
    from click.testing import CliRunner

    from afpx.cli import main

    cube = make_synthetic_cube(tmp_path / "bare.zarr", n_structures=6)
    mark_complete(cube)
    res = CliRunner().invoke(main, ["evaluate", str(cube), "-o", str(tmp_path / "r")])
    assert res.exit_code == 2
    assert "afpx likelihood" in res.output
    res = CliRunner().invoke(
        main, ["evaluate", str(cube), "--case", ",", "-o", str(tmp_path / "r")]
    )
    assert res.exit_code == 2 and "--case expects" in res.output
    res = CliRunner().invoke(
        main, ["evaluate", str(cube), "--scheduler", "quick", "-o", str(tmp_path / "r")]
    )
    assert res.exit_code == 2 and "unknown scheduler 'quick'" in res.output


# -- the engine: candidates above a score, composition tables ---------------------------


def _random_library(seed: int = 1, n_templates: int = 60, max_sites: int = 16):
    from afpx.templates import TemplateLibrary

    rng = np.random.default_rng(seed)
    n = rng.integers(1, max_sites, size=n_templates)
    n[:3] = max_sites  # a few templates beyond brute force (2**14 > 8192)
    st = np.repeat(np.arange(n_templates), n)
    m = rng.choice([1, 2, 3, 4, 6, 8], size=st.size)
    z = rng.choice([3, 8, 25, 32], size=st.size)
    lik = rng.random((st.size, schema.N_ELEMENTS), dtype=np.float32) * 0.98 + 0.01
    T = n_templates
    lib = TemplateLibrary(
        site_template=st,
        multiplicity=m.astype(np.int32),
        z=z.astype(np.int16),
        log_likelihood=np.log(lik).astype(np.float32),
        structure_id=np.asarray([f"t{i}" for i in range(T)], dtype=object),
        formula=np.asarray(["X"] * T, dtype=object),
        spacegroup=np.ones(T, dtype=np.int64),
        source=np.asarray(["x"] * T, dtype=object),
    )
    return lib


@pytest.mark.parametrize("elements", [[25], [25, 32], [3, 8, 32]])
def test_candidates_above_equals_best_candidates(elements) -> None:
    from afpx.templates import best_candidates

    lib = _random_library()
    index = TemplateIndex.from_arrays(lib.site_template, lib.z, lib.multiplicity)
    c = best_candidates(lib, elements, assignments=False)
    full = rank_candidates(
        c["template"].values, reduce_rows(c["counts"].values), c["log_score"].values
    )
    logl = lib.log_likelihood[:, np.asarray(elements) - 1]
    for thr in (-np.inf, -4.0, -1.5):
        mine = rank_candidates(*candidates_above(index, logl, thr))
        keep = full.log_score >= thr
        assert mine.counts.shape[0] == keep.sum()
        j = match_rows(mine.counts, full.counts[keep])
        np.testing.assert_allclose(mine.log_score[j], full.log_score[keep], rtol=0, atol=1e-9)
    table = CompositionTable.build(index, len(elements))
    assert table.n_compositions == full.counts.shape[0]
    pairs = {
        (int(t), tuple(r))
        for t, r in zip(c["template"].values, reduce_rows(c["counts"].values).tolist(), strict=True)
    }
    assert table.row_template.size == len(pairs)


@pytest.mark.parametrize("elements", [[25, 32], [3, 8, 32]])
def test_uniform_templates_come_from_the_table_as_enumerated(elements) -> None:
    from afpx.evaluate.graph import set_columns, uniform_templates

    lib = _random_library()
    index = TemplateIndex.from_arrays(lib.site_template, lib.z, lib.multiplicity)
    assert uniform_templates(index, set_columns(lib.log_likelihood)) is None
    # every other template: each site one likelihood for every element (differing by site)
    logl_all = lib.log_likelihood.astype(np.float64)
    flat = np.zeros(index.n_templates, dtype=bool)
    flat[::2] = True
    sites = np.repeat(flat, index.n_sites)
    logl_all[sites] = logl_all[sites, :1]
    uniform = uniform_templates(index, set_columns(logl_all))
    assert uniform is not None and np.array_equal(uniform, flat & (index.n_sites > 0))
    logl = logl_all[:, np.asarray(elements) - 1]
    table = CompositionTable.build(index, len(elements))
    for thr in (-np.inf, -6.0, -2.5):
        plain = candidates_above(index, logl, thr)
        fast = candidates_above(index, logl, thr, uniform=uniform, table=table)
        key = lambda r: sorted(  # noqa: E731
            zip(r[0].tolist(), map(tuple, r[1].tolist()), r[2].round(9).tolist(), strict=True)
        )
        assert key(fast) == key(plain)
    with pytest.raises(AfpxError, match="composition table of 2 elements for 3"):
        candidates_above(
            index,
            logl_all[:, [2, 7, 31]],
            -np.inf,
            uniform=uniform,
            table=CompositionTable.build(index, 2),
        )


def test_composition_table_counts_assignments() -> None:

    # one template, sites of multiplicity 1, 1, 2 and two elements:
    # AAB/ABA -> (2, 2)=(1,1) twice... enumerate: counts (A, B) over 6 surjective assignments
    index = TemplateIndex.from_arrays(np.zeros(3, int), np.array([8, 8, 26]), np.array([1, 1, 2]))
    table = CompositionTable.build(index, 2)
    got = {
        tuple(c): w
        for c, w in zip(table.compositions.tolist(), table.row_assignments.tolist(), strict=True)
    }
    # A on {0}: (1,3); {1}: (1,3); {2}: (2,2)=(1,1); {0,1}: (2,2)=(1,1); {0,2}: (3,1); {1,2}: (3,1)
    assert got == {(1, 3): 2.0, (1, 1): 2.0, (3, 1): 2.0}
    assert table.find(np.array([[3, 1], [5, 1]])).tolist() == [2, -1]


def test_set_positions_with_missing_known_compositions() -> None:
    from afpx.evaluate import set_positions

    # found list: scores of 4 compositions; N = 10; known: rows 0 and 2, plus one missing
    out = set_positions(np.array([5.0, 4.0, 3.0, 2.0]), np.array([0, 2, -1]), 10)
    # positions 1, 3 and 10 (the missing one at the bottom)
    assert out["os"] == pytest.approx(optimality_score(np.array([1, 3, 10]), 10))
    assert out["first_rank"] == 1.0 and out["n_known_missing"] == 1.0
    out = set_positions(np.array([5.0]), np.array([-1, -1]), 4)
    # both missing share the bottom two places: mid-rank 3.5 each -> OS -1
    assert out["os"] == pytest.approx(-1.0) and out["first_rank"] == 3.5
    assert out["first_rank_optimistic"] == 3.0
    with pytest.raises(AfpxError, match="N = 2"):
        set_positions(np.array([5.0, 4.0]), np.array([0, -1]), 2)


def test_test2_pruned_equals_full_ranking() -> None:
    """The pruned Test 2 gives the numbers of the full ranked list of best_candidates."""
    from afpx.templates import best_candidates

    lib = _random_library(seed=4, n_templates=80, max_sites=9)
    index = TemplateIndex.from_arrays(lib.site_template, lib.z, lib.multiplicity)
    for S in [(8, 25), (3, 8, 32)]:
        table = CompositionTable.build(index, len(S))
        ctx = set_context(index, S, table)
        if ctx.known.shape[0] == 0:
            continue
        known = ctx.known
        logl = np.asarray(lib.log_likelihood[:, np.asarray(S) - 1], dtype=np.float64)
        both = optimality_of_set(
            index, table, logl, index.upper_bound(logl), ctx, hit_k=(1, 10), tolerance=1e-9
        )
        got = both["all_templates"]
        c = best_candidates(lib, list(S), assignments=False)
        full = rank_candidates(
            c["template"].values, reduce_rows(c["counts"].values), c["log_score"].values
        )
        mid, _, _, _ = tie_ranks(full.log_score)
        q = mid[match_rows(full.counts, known)]
        assert got["os"] == pytest.approx(optimality_score(q, full.counts.shape[0]), nan_ok=True)
        assert got["first_rank"] == q.min()
        # without the own formula: drop those candidates from the full list and rank again
        c2 = best_candidates(lib, list(S), assignments=False, exclude_own_formula=True)
        red2 = reduce_rows(c2["counts"].values)
        full2 = rank_candidates(c2["template"].values, red2, c2["log_score"].values)
        idx2 = match_rows(full2.counts, known)
        mid2, _, _, _ = tie_ranks(full2.log_score)
        n_missing = int((idx2 < 0).sum())
        q2 = np.concatenate([mid2[idx2[idx2 >= 0]], np.full(n_missing, 0.0)])
        q2[q2.size - n_missing :] = full.counts.shape[0] - (n_missing - 1) / 2
        got2 = both["no_own_formula"]
        assert got2["n_known_missing"] == n_missing
        assert got2["os"] == pytest.approx(optimality_score(q2, full.counts.shape[0]), nan_ok=True)


def test_small_template_counts_equal_the_counting_dp() -> None:

    lib = _random_library(seed=7, n_templates=40, max_sites=9)
    index = TemplateIndex.from_arrays(lib.site_template, lib.z, lib.multiplicity)
    S = np.array([3, 8, 32])
    logl = np.round(np.asarray(lib.log_likelihood[:, S - 1], dtype=np.float64), 1)  # ties
    for comp in (np.array([1, 1, 1]), np.array([1, 2, 3]), np.array([2, 1, 1])):
        ts = np.arange(index.n_templates)
        for thr in (-3.0, -6.0):
            got = small_template_counts(index, logl, ts, comp, thr)
            sites = TemplateSites(index, logl, comp)
            assert got.templates.size > 0
            for i, t in enumerate(got.templates.tolist()):
                c = count_assignments(*sites(t), thr)
                assert (got.better[i], got.tied[i], got.total[i]) == (c.better, c.tied, c.total)
                if c.total:
                    assert got.best[i] == pytest.approx(c.best)


def test_pair_counts_equal_small_template_counts_and_the_counting_dp() -> None:
    """Shared (template, assignment) pairs count exactly what per-model enumeration counts."""
    from afpx.templates.counting import PairCache, composition_pairs, pair_counts

    lib = _random_library(seed=11, n_templates=50, max_sites=9)
    index = TemplateIndex.from_arrays(lib.site_template, lib.z, lib.multiplicity)
    S = np.array([3, 8, 32])
    logl = np.round(np.asarray(lib.log_likelihood[:, S - 1], dtype=np.float64), 1)  # ties
    cache = PairCache(max_bytes=1)  # keeps only the newest entry
    for comp in (np.array([1, 1, 1]), np.array([1, 2, 3]), np.array([2, 1, 1])):
        ts = np.arange(index.n_templates)
        cache[tuple(comp.tolist())] = composition_pairs(index, ts, comp)
        pairs = cache[tuple(comp.tolist())]
        assert len(cache) == 1
        for thr in (-3.0, -6.0):
            want = small_template_counts(index, logl, ts, comp, thr)
            got = pair_counts(pairs, logl, thr)
            order = np.argsort(want.templates)
            np.testing.assert_array_equal(got.templates, want.templates[order])
            for name in ("better", "tied", "total"):
                np.testing.assert_array_equal(getattr(got, name), getattr(want, name)[order])
            np.testing.assert_allclose(got.best, want.best[order], rtol=0, atol=1e-9)
            sites = TemplateSites(index, logl, comp)
            for i, t in enumerate(got.templates.tolist()[:10]):
                c = count_assignments(*sites(t), thr)
                assert (got.better[i], got.tied[i], got.total[i]) == (c.better, c.tied, c.total)
            # restricted to some templates: the others report no assignment
            keep = np.arange(got.templates.size) % 2 == 0
            part = pair_counts(pairs, logl, thr, keep=keep)
            np.testing.assert_array_equal(part.total[keep], got.total[keep])
            assert (part.total[~keep] == 0).all()


def test_cli_evaluate_with_a_model_scores_in_memory(tmp_path) -> None:
    import json

    import xarray as xr
    from _cube_helpers import make_synthetic_cube
    from _model_helpers import train_tiny_model
    from click.testing import CliRunner

    from afpx.cli import main

    cube = make_synthetic_cube(tmp_path / "cube.zarr", n_structures=30, seed=2)
    mark_complete(cube)
    model = train_tiny_model(cube, tmp_path / "model", epochs=2)
    out = tmp_path / "report"
    args = ["evaluate", str(cube), "--model", str(model), "-o", str(out), "--baselines", ""]
    res = CliRunner().invoke(main, [*args, "--no-progress"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["models"] == ["model"]
    assert metrics["likelihood"]["scored_in_memory"] is True
    assert metrics["softmax"]["softmax_available"]
    # the store itself was not written
    assert schema.LIKELIHOOD not in xr.open_zarr(cube, consolidated=False).variables


def test_sample_sets_is_seeded_per_size_and_order_free() -> None:
    from afpx.evaluate import sample_sets

    sets = [(1, 2), (1, 3), (2, 3), (4, 5), (1, 2, 3), (1, 2, 4), (2, 3, 4)]
    a = sample_sets(sets, 2, seed=0)
    assert a == sample_sets(list(reversed(sets)), 2, seed=0)
    assert sum(len(s) == 2 for s in a) == 2 and sum(len(s) == 3 for s in a) == 2
    assert set(a) <= set(sets)
    assert sample_sets(sets, 10) == sorted(sets, key=lambda s: (len(s), s))


def test_test2_max_sets_must_be_positive() -> None:
    from afpx.evaluate import EvaluateParams

    with pytest.raises(AfpxError, match="test2_max_sets must be positive"):
        EvaluateParams(test2_max_sets=0)


# -- one engine, one tie rule: afpx rank and afpx evaluate agree ----------------------


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(2, 3), ties=st.booleans())
def test_rank_and_evaluate_agree_on_every_composition(seed: int, k: int, ties: bool) -> None:
    """Every composition's score and rank (ties included): afpx rank == Test 2 == case study."""
    from afpx.evaluate.case_study import case_study
    from afpx.rank import rank

    rng = np.random.default_rng(seed)
    lib = random_library(rng, 30, max_sites=7, ties=ties)
    zs = sorted(rng.choice(np.arange(1, 119), k, replace=False).tolist())
    import warnings

    with warnings.catch_warnings():
        # random libraries leave some elements without training sites: rank warns, rightly
        warnings.simplefilter("ignore", AfpxWarning)
        ranked = rank(zs, library=lib, top=None)
    by_rank = {
        tuple(c): (s, r, lo, hi)
        for c, s, r, lo, hi in zip(
            ranked["counts"].values.tolist(),
            ranked["log_score"].values.tolist(),
            ranked["rank"].values.tolist(),
            ranked["rank_optimistic"].values.tolist(),
            ranked["rank_pessimistic"].values.tolist(),
            strict=True,
        )
    }
    # Test 2's path: the thresholded engine, best per composition, the tie rule
    index = TemplateIndex.from_arrays(lib.site_template, lib.z, lib.multiplicity)
    logl = lib.log_likelihood[:, np.asarray(zs) - 1].astype(np.float64)
    ranking = rank_candidates(*candidates_above(index, logl, -np.inf))
    ties_ = tie_ranks(ranking.log_score)
    by_test2 = {
        tuple(c): (s, r, lo, hi)
        for c, s, r, lo, hi in zip(
            ranking.counts.tolist(),
            ranking.log_score.tolist(),
            ties_.rank.tolist(),
            ties_.optimistic.tolist(),
            ties_.pessimistic.tolist(),
            strict=True,
        )
    }
    assert set(by_rank) == set(by_test2)
    for comp, (s, r, lo, hi) in by_rank.items():
        s2, r2, lo2, hi2 = by_test2[comp]
        assert s2 == pytest.approx(s, abs=1e-9, rel=0)
        assert (r2, lo2, hi2) == (r, lo, hi)
    # Test 2's positions of "known" compositions are their ranks in that list
    known = np.asarray(sorted(by_rank)[: max(1, len(by_rank) // 3)], dtype=np.int64)
    idx = match_rows(ranking.counts, known)
    is_known = np.zeros(ranking.counts.shape[0], dtype=bool)
    is_known[idx] = True
    mid, _, _ = known_positions(ranking.log_score, is_known)
    assert sorted(mid.tolist()) == sorted(by_rank[tuple(c)][1] for c in known.tolist())
    # the case study lists the same rows, in the order afpx rank shows them
    cs = case_study(tuple(zs), lib, known, EvaluateParams(case_top=len(by_rank)))
    assert cs["n_compositions"] == len(by_rank)
    assert [row["formula"] for row in cs["top"]] == ranked["formula"].values.tolist()
    assert [row["rank"] for row in cs["top"]] == ranked["rank"].values.tolist()
    assert len(cs["known"]) == known.shape[0]
    assert all(row["known"] for row in cs["known"])


def test_relative_tie_rule_is_the_same_everywhere() -> None:
    """log scores -10 and -10 - 5e-9 tie (5e-9 < 1e-9 x 10) in rank, Test 2 and tie_ranks."""
    from afpx.rank import rank_rows

    scores = np.array([-10.0, -10.0 - 5e-9, -11.0])
    assert tie_ranks(scores).rank.tolist() == [1.5, 1.5, 3.0]
    mid, opt, pes = known_positions(scores, np.array([True, True, False]))
    assert mid.tolist() == [1.5, 1.5]
    assert (opt.tolist(), pes.tolist()) == ([1, 2], [1, 2])
    rows = rank_rows(
        np.arange(3),
        np.arange(3),
        np.array([[1, 1], [1, 2], [2, 1]]),
        scores,
        ["Mn", "Ge"],
        top=None,
        tie_tolerance=1e-9,
    )
    assert sorted(rows["rank"].tolist()) == [1.5, 1.5, 3.0]
    # a plain absolute 1e-9 would not tie them; a gap above the width does not tie
    assert tie_ranks(np.array([-10.0, -10.0 - 2e-8])).rank.tolist() == [1.0, 2.0]


def test_scored_libraries_refuses_sites_that_are_not_the_librarys() -> None:
    from afpx.baselines import BaselineParams
    from afpx.evaluate import scored_libraries

    lib = _random_library(seed=2, n_templates=5, max_sites=4)
    n = lib.z.size
    sites = {
        "z": lib.z.astype(np.int64) % 7 + 1,  # other elements than the library's
        "draw": np.zeros(n, dtype=np.int64),
        "structure": lib.site_template.astype(np.int64),
        "split": np.asarray(["train"] * lib.n_templates, dtype=object),
    }
    with pytest.raises(AfpxError, match="not the cube's draw-0 sites"):
        scored_libraries(lib, sites, ("constant",), BaselineParams())
    sites["z"] = lib.z.astype(np.int64)
    got = scored_libraries(lib, sites, ("constant", "frequency"), BaselineParams())
    assert list(got) == ["model", "constant", "frequency"]
    assert got["model"] is lib


def test_evaluate_scores_the_fingerprint_baselines_and_the_likelihood_metrics(tmp_path) -> None:
    import xarray as xr

    from afpx.baselines import BaselineParams
    from afpx.evaluate import evaluate

    path = make_cube_with_likelihoods(tmp_path / "cube.zarr")
    ds = xr.open_zarr(path, consolidated=False)
    report = evaluate(
        ds,
        params=EvaluateParams(baselines=("knn", "mlp"), case_study=()),
        baseline_params=BaselineParams(knn_k=3, mlp_epochs=2, mlp_hidden=16, mlp_layers=1),
    )
    assert report.metrics["models"] == ["model", "knn", "mlp"]
    test = report.metrics["softmax"]["test"]
    # the handmade likelihood puts the true element first on every site (0.9 vs < 0.3)
    assert test["likelihood_top1_error"] == 0.0 and test["likelihood_top5_error"] == 0.0
    assert test["likelihood_mean_rank"] == 1.0
    # always right with confidence 0.9: the ECE is exactly 0.1
    assert test["likelihood_ece"] == pytest.approx(0.1, abs=1e-6)
    assert sum(test["likelihood_reliability"]["count"]) == test["n_sites"]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_surjective_upper_bound_bounds_every_candidate(k: int) -> None:
    from afpx.evaluate.graph import set_columns, surjective_upper_bound
    from afpx.templates.bruteforce import surjections

    rng = np.random.default_rng(k)
    lib = random_library(rng, n_templates=30, max_sites=5)
    index = TemplateIndex.from_arrays(lib.site_template, lib.z, lib.multiplicity)
    S = np.sort(rng.choice(np.arange(1, 119), k, replace=False))
    columns = set_columns(lib.log_likelihood)[S - 1]
    logl = np.ascontiguousarray(columns.T, dtype=np.float64)
    bound = surjective_upper_bound(index, columns)
    plain = index.upper_bound(logl)
    assert np.all(bound <= plain)
    tight = 0
    for t in range(index.n_templates):
        a, b = index.site_start[t], index.site_start[t + 1]
        if b - a < k:
            continue
        A = surjections(k, int(b - a))
        best = logl[np.arange(a, b)[None, :], A].sum(axis=1).max()
        assert best <= bound[t]
        tight += bound[t] < plain[t]
    if k > 1:
        assert tight > 0  # it does prune more than the plain bound
    else:
        np.testing.assert_array_equal(bound, plain)
