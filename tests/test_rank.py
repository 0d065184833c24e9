"""Composition ranking, ``afpx rank`` and CIF export (afpx.rank)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _rank_helpers import (
    GE,
    LI,
    MN,
    OX,
    SR,
    ZR,
    cube_with_likelihood,
    hand_library,
    library_from_sites,
    random_library,
)
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from afpx import AfpxError, AfpxWarning
from afpx.cli import main
from afpx.rank import (
    DEFAULT_TIE_TOLERANCE,
    RankTable,
    candidate_structure,
    export_cifs,
    parse_elements,
    rank,
    rank_compositions,
    rank_table,
    tie_ranks,
    to_frame,
)
from afpx.templates import TemplateLibrary, best_candidates


@pytest.fixture
def hand() -> TemplateLibrary:
    # scores by hand (elements Mn, Ge; unnamed likelihood 1e-3):
    #   t0 (2, 4): Mn2Ge4 -> MnGe2 0.72, Mn4Ge2 -> Mn2Ge 0.02
    #   t1 (1, 1): MnGe 0.5 * 0.5 = 0.25 either way
    #   t2 (2, 4): same shape as t0, MnGe2 0.4 * 0.6 = 0.24, Mn2Ge 0.6 * 0.4 = 0.24
    #   t3 (1, 3): MnGe3 0.25, Mn3Ge 0.25 (every likelihood 0.5)
    return hand_library()


def test_tie_ranks_by_hand() -> None:
    r, lo, hi, g = tie_ranks(np.array([-1.0, 0.0, -1.0, -1.0, -5.0]))
    assert r.tolist() == [3.0, 1.0, 3.0, 3.0, 5.0]
    assert lo.tolist() == [2, 1, 2, 2, 5]
    assert hi.tolist() == [4, 1, 4, 4, 5]
    assert g.tolist() == [1, 0, 1, 1, 2]
    # within the tolerance: tied; chained in sorted order
    r, *_ = tie_ranks(np.array([0.0, -5e-10, -1.4e-9, -3e-9]))
    assert r.tolist() == [2.0, 2.0, 2.0, 4.0]
    with pytest.raises(AfpxError, match="NaN"):
        tie_ranks(np.array([0.0, math.nan]))
    assert tie_ranks(np.zeros(0))[0].size == 0


@settings(max_examples=30, deadline=None)
@given(values=st.lists(st.sampled_from([0.0, -1.0, -2.0, -3.5]), min_size=1, max_size=30))
def test_ties_never_depend_on_input_order(values: list[float]) -> None:
    s = np.asarray(values)
    rng = np.random.default_rng(len(values))
    perm = rng.permutation(s.size)
    r, lo, hi, _ = tie_ranks(s)
    rp, lop, hip, _ = tie_ranks(s[perm])
    assert np.array_equal(r[perm], rp)
    assert np.array_equal(lo[perm], lop) and np.array_equal(hi[perm], hip)
    # mid-rank = 1 + better + (tied others) / 2
    for i, v in enumerate(s):
        better, tied = int((s > v).sum()), int((s == v).sum())
        assert r[i] == 1 + better + (tied - 1) / 2
    assert r.sum() == pytest.approx(s.size * (s.size + 1) / 2)


def test_rank_compositions_by_hand(hand: TemplateLibrary) -> None:
    ranked = rank_compositions(best_candidates(hand, [MN, GE]))
    rows = {
        f: (s, r, lo, hi, t, nt, nb)
        for f, s, r, lo, hi, t, nt, nb in zip(
            ranked.formula.values,
            ranked.score.values,
            ranked["rank"].values,
            ranked.rank_optimistic.values,
            ranked.rank_pessimistic.values,
            ranked.template.values,
            ranked.n_templates.values,
            ranked.n_best_templates.values,
            strict=True,
        )
    }
    # MnGe2 0.72 (t0 beats t2's 0.24); then MnGe, MnGe3, Mn3Ge tie at 0.25;
    # Mn2Ge 0.24 (t2 beats t0's 0.02)
    assert list(ranked.formula.values) == ["MnGe2", "Mn3Ge", "MnGe", "MnGe3", "Mn2Ge"]
    assert rows["MnGe2"][:5] == pytest.approx((0.72, 1.0, 1, 1, 0))
    for f in ("MnGe", "MnGe3", "Mn3Ge"):
        assert rows[f][0] == pytest.approx(0.25)
        assert rows[f][1:4] == (3.0, 2, 4)
    assert rows["Mn2Ge"][:5] == pytest.approx((0.24, 5.0, 5, 5, 2))
    assert rows["MnGe2"][5:] == (2, 1)  # two templates make MnGe2, one is best
    assert ranked.attrs["n_compositions"] == 5
    assert ranked.counts.values[0].tolist() == [1, 2]
    assert ranked.candidate_counts.values[0].tolist() == [2, 4]
    assert ranked.assignment.values[0, :2].tolist() == [0, 1]
    top = rank_compositions(best_candidates(hand, [MN, GE]), top=2)
    assert list(top.formula.values) == ["MnGe2", "Mn3Ge"]
    assert top.attrs["n_compositions"] == 5
    assert top["rank"].values[1] == 3.0  # still counts the whole tie group


def test_best_template_ties_show_the_lowest_index() -> None:
    same = [(1, MN, {MN: 0.5, GE: 0.5}), (1, GE, {MN: 0.5, GE: 0.5})]
    lib = library_from_sites([same, same, same])
    ranked = rank_compositions(best_candidates(lib, [MN, GE]))
    assert ranked.template.values.tolist() == [0]
    assert ranked.n_best_templates.values.tolist() == [3]


def test_rank_api(hand: TemplateLibrary) -> None:
    ds = rank(["Mn", "Ge"], library=hand, top=None, known=True)
    assert list(ds.formula.values) == ["MnGe2", "Mn3Ge", "MnGe", "MnGe3", "Mn2Ge"]
    assert ds.known.values.tolist() == [True, False, True, True, False]
    assert ds.assignment_text.values[0] == "Mn site1×2, Ge site2×4"
    assert ds.attrs["n_candidates"] == 7 and ds.attrs["library"] == "library in memory"
    frame = rank("Mn,Ge", library=hand, top=3, as_frame=True)
    assert list(frame.formula) == ["MnGe2", "Mn3Ge", "MnGe"]
    assert {"rank", "rank_optimistic", "rank_pessimistic", "score", "structure_id"} <= set(frame)
    assert to_frame(ds).shape[0] == 5
    own = rank("Mn,Ge", library=hand, top=None, exclude_own_formula=True)
    # t0 and t2 are Mn2Ge4, t1 MnGe, t3 MnGe3: each loses its own composition
    assert list(own.formula.values) == ["Mn3Ge", "Mn2Ge"]
    assert own.template.values.tolist() == [3, 2]


def test_scores_are_likelihoods_and_all_elements_present(hand: TemplateLibrary) -> None:
    ds = rank("Mn,Ge", library=hand, top=None)
    assert ((ds.score.values > 0) & (ds.score.values <= 1)).all()
    assert (ds.counts.values > 0).all()


@pytest.mark.parametrize(
    ("elements", "match"),
    [
        ("Mn,Xx", "unknown element symbol 'Xx'"),
        ("Mn,Mn", "Mn is repeated"),
        ("Mn", "at least two elements"),
        (["Mn", 0], "atomic number 0"),
        ("Li,Mn,Ge", "at least 3 unique sites; the most any template has is 2"),
    ],
)
def test_rank_input_errors(hand: TemplateLibrary, elements: object, match: str) -> None:
    with pytest.raises(AfpxError, match=match):
        rank(elements, library=hand)  # type: ignore[arg-type]


def test_rank_option_errors(hand: TemplateLibrary) -> None:
    with pytest.raises(AfpxError, match="unknown ranking option"):
        rank("Mn,Ge", library=hand, colour="red")
    with pytest.raises(AfpxError, match="top must be at least 1"):
        rank("Mn,Ge", library=hand, top=0)
    with pytest.raises(AfpxError, match="no candidate uses every element"):
        rank("Mn,Ge", library=hand, sources=["nowhere"])


def test_parse_elements() -> None:
    assert parse_elements("Li, mn,GE") == [3, 25, 32]
    assert parse_elements([3, "O"]) == [3, 8]


# -----------------------------------------------------------------------------
# the command line
# -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cube(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cube_with_likelihood(tmp_path_factory.mktemp("rank") / "cube.zarr", n_structures=40)


def test_cli_table_csv_json(cube: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(main, ["rank", "--elements", "Mn,Ge", "--cube", str(cube), "--known"])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[0].split()[:3] == ["rank", "formula", "score"]
    assert "compositions of Mn-Ge" in res.output
    res = runner.invoke(
        main, ["rank", "-e", "Mn,Ge", "--cube", str(cube), "--format", "csv", "--top", "0"]
    )
    assert res.exit_code == 0, res.output
    header = res.output.splitlines()[0].split(",")
    assert header[:4] == ["rank", "rank_optimistic", "rank_pessimistic", "formula"]
    res = runner.invoke(main, ["rank", "-e", "Li,O,Mn", "--cube", str(cube), "--format", "json"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.output)
    assert payload["elements"] == ["Li", "O", "Mn"]
    assert 0 < len(payload["rows"]) <= 20
    for row in payload["rows"]:
        assert 0 < row["score"] <= 1
        assert row["structure_id"].startswith("syn-")


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["-e", "Mn,Qx"], "unknown element symbol 'Qx'"),
        (["-e", "Mn,Mn"], "repeated"),
        (["-e", "Mn"], "at least two elements"),
        (["-e", "H,Li,O,Na,Mn,Fe,Ge"], "unique sites"),
        (["-e", "Mn,Ge", "--top", "-1"], "--top"),
        (["-e", "Mn,Ge", "-f", "MnGe"], "either --elements"),
        ([], "either --elements"),
        (["-f", "Mn2Qx"], "cannot read formula 'Mn2Qx': unknown element symbol(s) Qx"),
        (["-f", "LiMnGeQ"], "unknown element symbol(s) Q;"),
        (["-f", "Mn(("], "cannot read formula"),
        (["-f", "Mn0.5Ge"], "whole, positive amounts"),
        (["-f", "Mn"], "at least two elements"),
        (["-f", "MnGe", "--known"], "--known"),
    ],
)
def test_cli_errors(cube: Path, args: list[str], match: str) -> None:
    res = CliRunner().invoke(main, ["rank", *args, "--cube", str(cube)])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ")
    assert match in lines[0]


def test_cli_cube_without_likelihoods(tmp_path: Path) -> None:
    path = cube_with_likelihood(tmp_path / "bare.zarr", likelihood=False)
    res = CliRunner().invoke(main, ["rank", "-e", "Mn,Ge", "--cube", str(path)])
    assert res.exit_code == 2
    assert f"afpx likelihood {path} --model MODEL" in res.output
    res = CliRunner().invoke(main, ["rank", "-e", "Mn,Ge", "--cube", str(tmp_path / "none")])
    assert res.exit_code == 2 and "no cube at" in res.output


def test_cli_without_default_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import afpx.default

    monkeypatch.setattr(afpx.default, "default_data_dir", lambda: tmp_path)
    res = CliRunner().invoke(main, ["rank", "--elements", "Li,Mn,Ge"])
    assert res.exit_code == 2
    assert "default template library is not installed" in res.output
    assert "--cube" in res.output


def test_cli_export_needs_geometry(cube: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(
        main, ["rank", "-e", "Mn,Ge", "--cube", str(cube), "--export-cif", str(tmp_path / "x")]
    )
    assert res.exit_code == 2 and "no template geometry" in res.output


def test_rank_path_does_not_import_torch(cube: Path) -> None:
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from afpx.cli import main\n"
        f"r = CliRunner().invoke(main, ['rank', '-e', 'Mn,Ge', '--cube', {str(cube)!r}])\n"
        "assert r.exit_code == 0, r.output\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


# -----------------------------------------------------------------------------
# CIF export
# -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cod_library(tmp_path_factory: pytest.TempPathFactory) -> TemplateLibrary:
    from afpx.structures import read_structures

    data = Path(__file__).parent / "data" / "cod"
    result = read_structures([data / "1011211.cif", data / "1000044.cif", data / "2204979.cif"])
    return TemplateLibrary.from_structures(result.structures)


def _parse(path: Path) -> tuple[str, int]:
    import warnings

    from pymatgen.io.cif import CifParser
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = CifParser(path).parse_structures(primitive=False)[0]
    return s.composition.reduced_formula, SpacegroupAnalyzer(
        s, symprec=0.01
    ).get_space_group_number()


# pymatgen's SpacegroupAnalyzer (the oracle) runs spglib in its deprecated error mode
_SPGLIB_MODE = pytest.mark.filterwarnings("ignore:Set OLD_ERROR_HANDLING:DeprecationWarning")


@_SPGLIB_MODE
def test_exported_cif_parses_back_to_template_symmetry(
    cod_library: TemplateLibrary, tmp_path: Path
) -> None:
    # the perovskite template CaTiO3 (Pm-3m) with Sr on Ca's site and Zr on Ti's
    t = int(np.flatnonzero(cod_library.formula == "CaTiO3")[0])
    with pytest.warns(AfpxWarning, match="Sr, Zr: no site of the library's training split"):
        ranked = rank("Sr,Zr,O", library=cod_library.subset([t]), top=None)
    row = int(np.flatnonzero(ranked.formula.values == "SrZrO3")[0])
    paths = export_cifs(ranked.isel(composition=[row]), cod_library.subset([t]), tmp_path)
    formula, sg = _parse(paths[0])
    assert formula == "SrZrO3"
    assert sg == int(cod_library.spacegroup[t]) == 221
    text = paths[0].read_text()
    assert "# template: " in text and "CaTiO3" in text and "scaled by rule" in text
    # every exported row has the composition it claims
    all_paths = export_cifs(ranked, cod_library.subset([t]), tmp_path / "all", scale="radii")
    assert len(all_paths) == ranked.sizes["composition"]
    for p, f in zip(all_paths, ranked.formula.values, strict=True):
        assert _parse(p)[0] == f


@_SPGLIB_MODE
def test_export_keeps_a_bijective_relabelling_of_each_template(
    cod_library: TemplateLibrary,
) -> None:
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    for t in range(cod_library.n_templates):
        a, b = cod_library.site_start[t], cod_library.site_start[t + 1]
        own = sorted(set(cod_library.z[a:b].tolist()))
        assign = np.asarray([own.index(int(z)) for z in cod_library.z[a:b]])
        others = [SR, ZR, OX, LI][: len(own)]
        s, info = candidate_structure(cod_library, t, others, assign, scale="none")
        assert info["scale_factor"] == 1.0
        sg = SpacegroupAnalyzer(s, symprec=0.01).get_space_group_number()
        assert sg == cod_library.spacegroup[t]


def test_scale_rules(cod_library: TemplateLibrary) -> None:
    t = int(np.flatnonzero(cod_library.formula == "CaO")[0])
    assign = np.array([0, 1])
    s, info = candidate_structure(cod_library, t, [MN, GE], assign, scale="radii")
    assert info["scale_rule"] == "radii"
    from pymatgen.core.periodic_table import Element

    d = min(n.nn_distance for n in s.get_neighbors(s[0], 4.0))
    assert d == pytest.approx(float(Element("Mn").atomic_radius + Element("Ge").atomic_radius))
    s2, info2 = candidate_structure(cod_library, t, [MN, GE], assign, scale="dls")
    assert info2["scale_rule"] in ("dls", "radii") and s2.volume > 0
    with pytest.raises(AfpxError, match="unknown scale rule"):
        candidate_structure(cod_library, t, [MN, GE], assign, scale="big")


def test_export_errors(hand: TemplateLibrary, cod_library: TemplateLibrary, tmp_path: Path) -> None:
    with pytest.raises(AfpxError, match="no template geometry"):
        candidate_structure(hand, 0, [MN, GE], np.array([0, 1]))
    ranked = rank_compositions(best_candidates(hand, [MN, GE], assignments=False))
    with pytest.raises(AfpxError, match="carries no assignment"):
        export_cifs(ranked, hand, tmp_path)
    from dataclasses import replace

    geo = cod_library.geometry
    assert geo is not None
    broken = replace(cod_library, site_index=np.zeros_like(cod_library.site_index))
    with pytest.raises(AfpxError, match="have no representative among"):
        candidate_structure(broken, 0, [SR, ZR, OX], np.array([0, 1, 2]))
    no_atoms = replace(
        cod_library,
        geometry=type(geo)(
            np.full_like(geo.lattice, np.nan), geo.atom_start, geo.frac_coords, geo.numbers
        ),
    )
    with pytest.raises(AfpxError, match="has no geometry"):
        candidate_structure(no_atoms, 0, [SR, ZR, OX], np.array([0, 1, 2]))


def test_afpx_rank_is_callable_whatever_was_imported(hand: TemplateLibrary) -> None:
    import afpx
    import afpx.rank  # binds the module to the attribute afpx.rank

    ds = afpx.rank("Mn,Ge", library=hand, top=1)  # type: ignore[operator]
    assert ds.formula.values.tolist() == ["MnGe2"]


def test_export_more_errors(cod_library: TemplateLibrary) -> None:
    from dataclasses import replace

    t = int(np.flatnonzero(cod_library.formula == "CaO")[0])
    # oganesson has no atomic radius in pymatgen: the radii rule cannot scale
    with pytest.raises(AfpxError, match="no atomic radius for Og"):
        candidate_structure(cod_library, t, [MN, 118], np.array([0, 1]), scale="radii")
    doubled = replace(cod_library, multiplicity=cod_library.multiplicity * 2)
    with pytest.raises(AfpxError, match="multiplicities found"):
        candidate_structure(doubled, t, [MN, GE], np.array([0, 1]), scale="none")


# -- afpx rank --formula: the best candidate structures of one composition -----------


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_rank_formula_equals_brute_force(seed: int) -> None:
    """Every template's best candidate of the composition, scored and ranked exactly."""
    from _rank_helpers import naive_candidates

    from afpx.rank import rank_formula
    from afpx.templates import reduce_rows, tie_ranks

    rng = np.random.default_rng(seed)
    lib = random_library(rng, 25, max_sites=5, multiplicities=(1, 2, 3), ties=bool(seed % 2))
    naive = naive_candidates(lib, [MN, GE])
    comps = {tuple(reduce_rows(np.asarray([c]))[0].tolist()) for (_, c) in naive}
    target = sorted(comps)[seed % len(comps)]
    best = {t: s for (t, c), s in naive.items() if tuple(reduce_rows(np.asarray([c]))[0]) == target}
    formula = f"Mn{target[0]}Ge{target[1]}"
    table = rank_formula(formula, library=lib, top=None)
    cols = table.columns()
    assert sorted(cols["template"].tolist()) == sorted(best)
    for t, s in zip(cols["template"].tolist(), cols["log_score"].tolist(), strict=True):
        assert s == pytest.approx(best[t], abs=1e-9, rel=0)
    expect = tie_ranks(np.asarray([best[t] for t in cols["template"].tolist()]))
    assert cols["rank"].tolist() == expect.rank.tolist()
    assert (np.diff(cols["rank"]) >= 0).all()
    # the assignment shown yields the composition and scores the row
    ds = table.to_dataset()
    for i, t in enumerate(cols["template"].tolist()):
        a, b = int(lib.site_start[t]), int(lib.site_start[t + 1])
        assign = ds["assignment"].values[i, : b - a]
        counts = np.bincount(assign, weights=lib.multiplicity[a:b], minlength=2).astype(int)
        assert tuple(reduce_rows(counts[None, :])[0].tolist()) == target
        s = sum(float(lib.log_likelihood[a + j, (MN, GE)[e] - 1]) for j, e in enumerate(assign))
        assert s == pytest.approx(cols["log_score"][i], abs=1e-6, rel=0)


def test_rank_formula_errors(hand: TemplateLibrary) -> None:
    from afpx.rank import rank_formula

    with pytest.raises(AfpxError, match="no template of the library can take"):
        rank_formula("Mn7Ge3", library=hand)
    with pytest.raises(AfpxError, match="top must be at least 1"):
        rank_formula("MnGe", library=hand, top=0)


def test_cli_formula_table_csv_and_export(cube: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(main, ["rank", "-f", "MnGe", "--cube", str(cube), "--top", "3"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].split()[:3] == ["rank", "formula", "score"]
    assert all(ln.split()[1] == "MnGe" for ln in lines[1:-1])
    assert "candidate structures of MnGe" in lines[-1]
    res = runner.invoke(main, ["rank", "-f", "MnGe", "--cube", str(cube), "--format", "json"])
    payload = json.loads(res.output)
    templates = [row["template"] for row in payload["rows"]]
    assert len(set(templates)) == len(templates)  # one row per template


def test_elements_without_training_sites_are_warned_about() -> None:
    import afpx
    from afpx.rank import load_library, rank_table, untrained_elements

    lib = load_library()
    assert untrained_elements(lib, [118, 17]) == ["Og"]
    assert untrained_elements(lib, [25, 32]) == []
    with pytest.warns(afpx.AfpxWarning, match="Og: no site of the library's training split"):
        table = rank_table("Og,Cl", library=lib, top=2)
    assert table.attrs["untrained_elements"] == ["Og"]


def test_an_empty_element_is_refused_not_skipped() -> None:
    from afpx.rank import parse_elements

    for bad in ("Li,,Ge", "Li,Ge,", ",Li,Ge"):
        with pytest.raises(AfpxError, match="empty element in"):
            parse_elements(bad)
    assert parse_elements("Li Mn Ge") == [3, 25, 32]
    assert parse_elements("Li, Mn, Ge") == [3, 25, 32]


# -----------------------------------------------------------------------------
# pruning by upper bounds: the same table as enumerating every template
# -----------------------------------------------------------------------------
def _same_table(a: RankTable, b: RankTable) -> None:
    assert a.attrs["n_compositions"] == b.attrs["n_compositions"]
    assert a.attrs["n_candidates"] == b.attrs["n_candidates"]
    assert set(a.variables) == set(b.variables)
    for name, (dims, values) in a.variables.items():
        assert dims == b.variables[name][0], name
        np.testing.assert_array_equal(values, b.variables[name][1], err_msg=name)


@pytest.mark.filterwarnings("ignore::afpx.AfpxWarning")  # random z: untrained elements
@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    k=st.integers(2, 4),
    top=st.integers(1, 8),
    ties=st.booleans(),
    tol=st.sampled_from([DEFAULT_TIE_TOLERANCE, 0.02, 0.1]),
)
def test_pruned_equals_unpruned(seed: int, k: int, top: int, ties: bool, tol: float) -> None:
    from afpx.templates import pruning

    rng = np.random.default_rng(seed)
    lib = random_library(rng, 40, max_sites=6 if k < 4 else 5, ties=ties)
    zs = rng.choice(np.arange(1, 119), k, replace=False).tolist()
    full = rank_table(zs, library=lib, top=top, prune=False, tie_tolerance=tol)
    # enumerate as few templates as possible first, so that pruning really prunes
    saved = pruning.FIRST_BATCH, pruning.PER_ROW
    pruning.FIRST_BATCH, pruning.PER_ROW = 1, 1  # type: ignore[misc]
    try:
        pruned = rank_table(zs, library=lib, top=top, tie_tolerance=tol)
    finally:
        pruning.FIRST_BATCH, pruning.PER_ROW = saved  # type: ignore[misc]
    _same_table(pruned, full)
    assert pruned.attrs["n_templates_enumerated"] <= full.attrs["n_templates_enumerated"]


@pytest.mark.filterwarnings("ignore::afpx.AfpxWarning")  # random z: untrained elements
def test_pruning_declines_options_that_filter_by_score() -> None:
    from afpx.templates import CandidateOptions
    from afpx.templates.pruning import prunable, top_candidates

    rng = np.random.default_rng(5)
    lib = random_library(rng, 30, max_sites=5)
    zs = np.asarray([MN, GE, LI])
    for opts in (
        CandidateOptions(min_likelihood=1e-6),
        CandidateOptions(min_site_likelihood=0.1),
        CandidateOptions(exclude_own_formula=True),
    ):
        assert not prunable(opts)
        assert top_candidates(lib, zs, opts, top=3, tie_tolerance=1e-9) is None
    # asking for every row: nothing to prune
    n = rank_table(zs.tolist(), library=lib, top=None).attrs["n_compositions"]
    assert top_candidates(lib, zs, CandidateOptions(), top=n, tie_tolerance=1e-9) is None
    assert top_candidates(lib, zs, CandidateOptions(), top=3, tie_tolerance=1e-9) is not None
    # with such an option, the ranking is still exact (everything enumerated)
    a = rank_table(zs.tolist(), library=lib, top=3, min_likelihood=1e-9)
    b = rank_table(zs.tolist(), library=lib, top=3, min_likelihood=1e-9, prune=False)
    _same_table(a, b)


@pytest.mark.filterwarnings("ignore::afpx.AfpxWarning")  # random z: untrained elements
def test_rank_table_is_thread_safe() -> None:
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(11)
    lib = random_library(rng, 300, max_sites=5)
    sets = [rng.choice(np.arange(1, 119), 3, replace=False).tolist() for _ in range(12)]
    other = random_library(np.random.default_rng(11), 300, max_sites=5)  # a separate cache
    alone = [rank_table(zs, library=other, top=5) for zs in sets]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda zs: rank_table(zs, library=lib, top=5), sets))
    for a, b in zip(together, alone, strict=True):
        _same_table(a, b)


def test_csv_and_json_rows_equal_the_standard_writers(hand: TemplateLibrary) -> None:
    import csv
    import io

    table = rank_table([MN, GE], library=hand, top=None, known=True)
    # awkward values: quotes, commas, new lines, non-ASCII, a NaN and an infinity
    ids = table.variables["structure_id"][1].copy()
    ids[0], ids[-1] = 'a "quoted", id', "line\nbreak é"
    table.variables["structure_id"] = (table.variables["structure_id"][0], ids)
    score = table.variables["score"][1].astype(np.float64)
    score[0], score[-1] = np.nan, np.inf
    table.variables["score"] = (table.variables["score"][0], score)
    cols = {n: v.tolist() for n, v in table.columns().items()}
    rows = list(zip(*cols.values(), strict=True))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(list(cols))
    writer.writerows(rows)
    assert table.to_csv() == buf.getvalue()
    encode = json.JSONEncoder().encode
    assert table.json_rows() == [encode(dict(zip(cols, r, strict=True))) for r in rows]
    # object columns holding numpy scalars or other objects: their value, or their text
    obj = np.asarray([np.int64(3), Path("x")], dtype=object)
    odd = RankTable([MN, GE], ["Mn", "Ge"], {"rank": (("composition",), obj)})
    assert odd.json_rows() == ['{"rank": 3}', '{"rank": "x"}']
    assert odd.to_csv() == "rank\n3\nx\n"


def test_writers_join_rows_as_the_per_row_writers_do(hand: TemplateLibrary) -> None:
    import csv
    import io

    table = rank_table([MN, GE], library=hand, top=None)
    rows = table.json_rows()
    assert len(rows) == len(table) > 1
    assert table.json_text() == ",\n".join(rows)
    assert table.json_text("") == "".join(rows)
    one = RankTable(
        [MN, GE], ["Mn", "Ge"], {n: (d, v[:1]) for n, (d, v) in table.variables.items()}
    )
    assert one.json_rows() == rows[:1] and one.json_text() == rows[0]
    # a field needing quotes in a column that otherwise needs none, and one row only
    text = table.variables["assignment_text"][1].copy()
    text[:] = "Mn 1a"
    text[-1] = 'Mn "1a"\r'
    table.variables["assignment_text"] = (table.variables["assignment_text"][0], text)
    cols = {n: v.tolist() for n, v in table.columns().items()}
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([list(cols), *zip(*cols.values(), strict=True)])
    assert table.to_csv() == buf.getvalue()
    # integer columns: small counts (written from a table of texts), negatives, large values
    rng = np.random.default_rng(0)
    for ints in (rng.integers(0, 7, 50), np.r_[rng.integers(0, 7, 50), -3], np.r_[0, 2**40, 7]):
        col = RankTable([MN, GE], ["Mn", "Ge"], {"rank": (("composition",), ints)})
        assert col.json_rows() == [json.dumps({"rank": v}) for v in ints.tolist()]
        assert col.to_csv() == "rank\n" + "".join(f"{v}\n" for v in ints.tolist())
    # text columns: plain ASCII, or with something to escape in one field
    for texts in (
        ["Mn 2a, Ge 4b", "x"], ["a\\b", "x"], ["del\x7f", "x"], ['"q"', "x"], ["é", "x"],
        ["tab\there", "x"], ["", ""], ["Mn", "\n"],
    ):  # fmt: skip
        col = RankTable([MN, GE], ["Mn", "Ge"], {"formula": (("composition",), np.asarray(texts))})
        col.variables["rank"] = (("composition",), np.ones(2))
        assert col.json_rows() == [json.dumps({"rank": 1.0, "formula": v}) for v in texts]
    empty = RankTable([MN, GE], ["Mn", "Ge"], {"rank": (("composition",), np.zeros(0))})
    assert (empty.json_rows(), empty.json_text(), empty.to_csv()) == ([], "", "rank\n")


def test_writers_refuse_a_column_of_another_length() -> None:
    ragged = RankTable(
        [MN, GE],
        ["Mn", "Ge"],
        {"rank": (("composition",), np.ones(3)), "formula": (("composition",), np.ones(2))},
    )
    with pytest.raises(AfpxError, match="column 'formula' has shape \\(2,\\) in a table of 3"):
        ragged.json_text()
    with pytest.raises(AfpxError, match="one value per row"):
        ragged.to_csv()


@pytest.mark.filterwarnings("ignore::afpx.AfpxWarning")  # random z: untrained elements
@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    k=st.integers(2, 4),
    ties=st.booleans(),
    wyckoff=st.booleans(),
)
def test_full_list_equals_obvious_grouping_order_and_text(
    seed: int, k: int, ties: bool, wyckoff: bool
) -> None:
    """The full list against plain Python: best per composition, display order, text, prefix."""
    import dataclasses

    from afpx.templates import CandidateOptions, candidates, check_elements, reduced_formulas

    rng = np.random.default_rng(seed)
    lib = random_library(rng, 60, max_sites=6 if k < 4 else 5, ties=ties)
    if wyckoff:
        # "%" and NUL: no format string, no row separator may take them for its own
        letters = rng.choice(np.asarray([*"abcdefg%", "\0"], dtype=object), lib.n_sites)
        lib = dataclasses.replace(lib, wyckoff=letters)
    zs = rng.choice(np.arange(1, 119), k, replace=False).tolist()
    table = rank_table(zs, library=lib, top=None)
    cols = {n: v.tolist() for n, v in table.columns().items()}
    symbols = table.symbols
    # best candidate per reduced composition, by a dict over the engine's candidates
    result, _ = candidates(lib, check_elements(zs), CandidateOptions(), assignments=False)
    groups: dict[tuple[int, ...], list[tuple[float, int]]] = {}
    rows = (result.template.tolist(), result.counts.tolist(), result.log_score.tolist())
    for t, c, s in zip(*rows, strict=True):
        g = math.gcd(*c)
        groups.setdefault(tuple(x // g for x in c), []).append((s, t))
    comps = list(groups)
    formulas = reduced_formulas(np.asarray(comps), symbols).tolist()
    expected = {}
    for comp, name in zip(comps, formulas, strict=True):
        best = max(s for s, _ in groups[comp])
        top_t = [t for s, t in groups[comp] if s == best]
        expected[name] = (best, min(top_t), len(groups[comp]), len(top_t))
    got = {
        f: (s, t, n, nb)
        for f, s, t, n, nb in zip(
            cols["formula"],
            cols["log_score"],
            cols["template"],
            cols["n_templates"],
            cols["n_best_templates"],
            strict=True,
        )
    }
    assert got == expected and len(table) == len(expected)
    # listed by tie group (optimistic rank), then by formula
    keys = list(zip(cols["rank_optimistic"], cols["formula"], strict=True))
    assert keys == sorted(keys)
    # the assignment text, one row at a time; the assignment reproduces the score
    assignment = table.variables["assignment"][1]
    logl = lib.log_likelihood[:, np.asarray(zs) - 1].astype(np.float64)
    for i, t in enumerate(cols["template"]):
        a, b = int(lib.site_start[t]), int(lib.site_start[t + 1])
        labels = [
            f"{m}{lib.wyckoff[a + j]}" if wyckoff else f"site{j + 1}×{m}"
            for j, m in enumerate(lib.multiplicity[a:b].tolist())
        ]
        row = assignment[i, : b - a].tolist()
        text = ", ".join(f"{symbols[e]} {lab}" for e, lab in zip(row, labels, strict=True))
        assert cols["assignment_text"][i] == text
        score = sum(logl[a + j, e] for j, e in enumerate(row))
        assert score == pytest.approx(cols["log_score"][i], abs=1e-9)
    # any top is the head of the full list, cut inside tie groups by formula too
    n = int(rng.integers(1, len(table) + 1))
    head = rank_table(zs, library=lib, top=n, prune=False)
    for name, (_, values) in head.variables.items():
        full = table.variables[name][1][:n]
        if name == "assignment":
            full = full[:, : values.shape[1]]
        np.testing.assert_array_equal(values, full, err_msg=name)


def test_formulas_of_many_rows_match_pymatgen() -> None:
    """One call over many rows of mixed element patterns, polyanions among them."""
    import warnings

    from pymatgen.core import Composition

    from afpx.templates import element_symbols, reduced_formulas

    rng = np.random.default_rng(3)
    for symbols in (["Li", "Mn", "P", "O"], ["K", "Na", "S", "O"], ["Li", "O"], ["Mn", "Ge", "Li"]):
        counts = rng.integers(0, 9, (400, len(symbols))) * rng.choice([1, 2, 4], (400, 1))
        counts = counts[counts.sum(axis=1) > 0]
        got = reduced_formulas(counts, symbols).tolist()
        want = [
            Composition({s: int(c) for s, c in zip(symbols, row, strict=True) if c}).reduced_formula
            for row in counts.tolist()
        ]
        assert got == want
        if len(symbols) > 2:  # P-O, S-O, Mn-Ge: polyanions (AB)n
            assert any("(" in f for f in got)
    # more elements than bits in an int64 code: the rows' patterns by a sort instead
    many = element_symbols()[:70]
    counts = rng.integers(0, 3, (6, 70))
    counts[:, -1] = 1
    counts[0, :-1] = 0  # the same pattern as row 1 in the first 64 elements only
    counts[1, :-1] = 0
    counts[1, 0] = 1
    counts[0, 0] = 1
    counts[0, 66] = 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymatgen: no electronegativity for noble gases
        want = [
            Composition({s: int(c) for s, c in zip(many, row, strict=True) if c}).reduced_formula
            for row in counts.tolist()
        ]
    assert reduced_formulas(counts, many).tolist() == want


@pytest.mark.filterwarnings("ignore::afpx.AfpxWarning")  # random z: untrained elements
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_full_list_from_kept_tables_equals_a_second_pass(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The full list backtracks from the first pass's tables; beyond the budget, re-runs them."""
    import importlib

    candidates_module = importlib.import_module("afpx.templates.candidates")
    rng = np.random.default_rng(seed)
    lib = random_library(rng, 60, max_sites=10)
    zs = rng.choice(np.arange(1, 119), 3, replace=False).tolist()
    options = [
        {},
        {"exclude_own_formula": True, "min_likelihood": 1e-5},
        {"min_site_likelihood": 0.05},
    ]
    kept = [rank_table(zs, library=lib, top=None, **o) for o in options]
    monkeypatch.setattr(candidates_module, "KEEP_TABLE_BYTES", 0)
    again = [rank_table(zs, library=lib, top=None, **o) for o in options]
    for a, b in zip(kept, again, strict=True):
        _same_table(a, b)
        assert len(a) > 10
