"""CIF reading, quality filters and unique sites (afpx.structures)."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

from afpx import AfpxError, AfpxWarning
from afpx.schema import REJECT_REASONS
from afpx.structures import (
    MAX_VOLUME_PER_ATOM,
    AnalysedStructure,
    FilterParams,
    ReadResult,
    Rejection,
    SiteTable,
    parse_formula_sum,
    read_structures,
    shortest_distance,
    split_cif_blocks,
    unique_sites,
)

DATA = Path(__file__).parent / "data"
COD = DATA / "cod"
BAD = DATA / "bad"

# expected reason of every made-up bad input
BAD_REASONS = {
    "empty": "parse_error",
    "garbage": "parse_error",
    "truncated": "parse_error",
    "unknown_setting": "parse_error",
    "no_atoms": "no_atoms",
    "zero_volume": "bad_cell",
    "overlap": "short_distance",
    "unknown_symbol": "unknown_species",
    "deuterium": "unknown_species",
    "label_nh4": "formula_mismatch",
    "label_bi": "unknown_species",
    "label_fl": "unknown_species",
    "formula_mismatch": "formula_mismatch",
    "occupancy_zero": "occupancy",
    "occupancy_negative": "occupancy",
    "occupancy_text": "parse_error",
    "occupancy_sum": "occupancy",
    "symop_garbage": "parse_error",
    "huge_cell": "bad_cell",
}

CIF_HEAD = """data_{name}
_cell_length_a {a}
_cell_length_b {a}
_cell_length_c {a}
_cell_angle_alpha 90
_cell_angle_beta 90
_cell_angle_gamma 90
_symmetry_space_group_name_H-M 'F m -3 m'
_symmetry_Int_Tables_number 225
{extra}
loop_
_atom_site_label
_atom_site_type_symbol
_atom_site_fract_x
_atom_site_fract_y
_atom_site_fract_z
_atom_site_occupancy
"""


def rocksalt_cif(
    tmp_path: Path,
    *,
    name: str = "rocksalt",
    a: float = 5.64,
    cation: str = "Na",
    anion: str = "Cl",
    occupancy: float = 1.0,
    extra: str = "",
) -> Path:
    """A made-up rock-salt CIF in Fm-3m with the given symbols."""
    text = CIF_HEAD.format(name=name, a=a, extra=extra)
    text += f"M1 {cation} 0 0 0 {occupancy}\nX1 {anion} 0.5 0.5 0.5 1\n"
    path = tmp_path / f"{name}.cif"
    path.write_text(text)
    return path


FCC = [[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]]


def nacl(a: float = 5.64) -> Structure:
    """Rock salt, conventional cell (``Structure.from_spacegroup`` takes seconds)."""
    anion = [[(x + 0.5) % 1, y, z] for x, y, z in FCC]
    return Structure(Lattice.cubic(a), ["Na"] * 4 + ["Cl"] * 4, FCC + anion)


def site_multiset(table: SiteTable) -> Counter[tuple[int, int, str]]:
    """(Z, multiplicity, Wyckoff letter) of each unique site, as a multiset."""
    return Counter(
        (int(z), int(m), str(w))
        for z, m, w in zip(table.z, table.multiplicity, table.wyckoff, strict=True)
    )


def by_id(result: ReadResult) -> tuple[dict[str, AnalysedStructure], dict[str, Rejection]]:
    # keyed by file name: the COD files are named after the code that becomes their id
    return (
        {s.metadata.get("file_id", s.structure_id): s for s in result.structures},
        {
            # a rejected record keeps the id it would have had (a bad file derived from
            # a COD entry states that entry's code): key it by its file instead
            Path(r.source).stem if r.source.endswith(".cif") else Path(r.id).stem: r
            for r in result.rejections
        },
    )


@pytest.fixture(scope="module")
def data_result() -> ReadResult:
    """Everything in tests/data, read once."""
    with pytest.warns(AfpxWarning, match="hydrogen"):
        return read_structures([DATA])


# -- reading real and bad files together --------------------------------------------


def test_every_bad_input_has_its_reason_and_good_files_survive(data_result: ReadResult) -> None:
    accepted, rejected = by_id(data_result)
    for name, reason in BAD_REASONS.items():
        assert rejected[name].reason == reason, (name, rejected[name])
        assert rejected[name].message
    # the real, clean files next to them are accepted
    for cod_id in ("1011211", "1000044", "1000017", "1100042", "2204979", "1010132"):
        assert cod_id in accepted
    assert "spinel_origin2" in accepted
    assert data_result.n_read == len(data_result.structures) + len(data_result.rejections)
    assert all(r.reason in REJECT_REASONS for r in data_result.rejections)


def test_parse_errors_carry_a_message_not_a_traceback(data_result: ReadResult) -> None:
    _, rejected = by_id(data_result)
    assert rejected["empty"].message == "empty file"
    assert "binary" in rejected["garbage"].message
    # unreadable files are recorded under their path, with no block
    assert rejected["garbage"].id.endswith("garbage.cif")
    assert rejected["garbage"].block is None
    # pymatgen's own message, with its exception type
    assert "Error" in rejected["truncated"].message
    assert rejected["truncated"].block == "2204979"
    assert "F d -3 m QQ" in rejected["unknown_setting"].message


def test_messages_name_the_value(data_result: ReadResult) -> None:
    _, rejected = by_id(data_result)
    assert "'Qq'" in rejected["unknown_symbol"].message
    assert "'D'" in rejected["deuterium"].message
    assert "0.300 Å" in rejected["overlap"].message
    assert "0.1071" in rejected["8103030"].message
    assert "_refine_ls_R_factor_gt" in rejected["8103030"].message
    assert "0.127" in rejected["2002219"].message
    assert "0.88" in rejected["1011100"].message
    assert "Cr" in rejected["1006144"].message and "Mn" in rejected["1006144"].message


def test_summary_counts_by_reason(data_result: ReadResult) -> None:
    text = data_result.summary()
    counts = data_result.counts()
    assert f"read: {data_result.n_read}" in text
    assert f"accepted: {len(data_result.structures)}" in text
    assert sum(counts.values()) == len(data_result.rejections)
    for reason, n in counts.items():
        assert f"  {reason}: {n}" in text
    assert list(counts) == [r for r in REJECT_REASONS if r in counts]


def test_folder_is_read_recursively_in_sorted_order(tmp_path: Path) -> None:
    (tmp_path / "b" / "deeper").mkdir(parents=True)
    shutil.copy(COD / "1000044.cif", tmp_path / "b" / "deeper" / "1000044.cif")
    shutil.copy(COD / "1011211.cif", tmp_path / "a.cif")
    (tmp_path / "README.md").write_text("not a structure")
    (tmp_path / ".hidden.cif").write_text("ignored")
    result = read_structures([tmp_path])
    assert [s.structure_id for s in result.structures] == ["cod-1011211", "cod-1000044"]
    assert [s.metadata["file_id"] for s in result.structures] == ["a", "1000044"]
    assert result.rejections == []


def test_missing_input_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(AfpxError, match="neither a file"):
        read_structures([tmp_path / "nothing-here.cif"])


def test_workers_must_be_positive() -> None:
    with pytest.raises(AfpxError, match="workers"):
        read_structures([COD / "1000044.cif"], workers=0)


def test_a_single_path_is_accepted() -> None:
    result = read_structures(COD / "1000044.cif")
    assert [s.formula for s in result.structures] == ["CaO"]


# -- CIF specifics ------------------------------------------------------------------


def test_multi_block_cif_gives_one_structure_per_block() -> None:
    result = read_structures([COD / "1011211+1000044.cif"])
    assert [s.structure_id for s in result.structures] == ["cod-1011211", "cod-1000044"]
    assert [s.metadata["file_id"] for s in result.structures] == [
        "1011211+1000044#1011211",
        "1011211+1000044#1000044",
    ]
    assert [s.formula for s in result.structures] == ["CaTiO3", "CaO"]
    assert [s.metadata["block"] for s in result.structures] == ["1011211", "1000044"]


def test_split_cif_blocks_ignores_data_inside_text_fields() -> None:
    text = "# header\ndata_one\n_a 1\n_note\n;\ndata_not_a_block\n;\ndata_two\n_b 2\n"
    blocks = split_cif_blocks(text)
    assert [name for name, _ in blocks] == ["one", "two"]
    assert "data_not_a_block" in blocks[0][1]


def test_r_factor_prefers_gt_and_records_absence(data_result: ReadResult) -> None:
    accepted, _ = by_id(data_result)
    stated = accepted["2204979"].metadata  # gt 0.0307, all 0.0313
    assert stated["r_factor"] == pytest.approx(0.0307)
    assert stated["r_factor_stated"] is True
    assert stated["r_factor_key"] == "_refine_ls_R_factor_gt"
    assert accepted["1000017"].metadata["r_factor"] == pytest.approx(0.063)  # only _all
    absent = accepted["1000044"].metadata
    assert absent["r_factor"] is None and absent["r_factor_stated"] is False
    assert accepted["1000044"].metadata["cod_id"] == "1000044"


@pytest.mark.parametrize(
    ("value", "accepted"),
    [("0.0999(3)", True), ("0.10", False), ("0.1000(2)", False), ("?", True), (".", True)],
)
def test_r_factor_limit_is_exclusive(tmp_path: Path, value: str, accepted: bool) -> None:
    path = rocksalt_cif(tmp_path, extra=f"_refine_ls_R_factor_gt {value}")
    result = read_structures([path])
    assert len(result.structures) == int(accepted)
    if not accepted:
        assert result.rejections[0].reason == "r_factor"


def test_r_factor_filter_can_be_switched_off() -> None:
    result = read_structures([COD / "8103030.cif"], params=FilterParams(r_factor_max=None))
    assert [s.structure_id for s in result.structures] == ["cod-8103030"]
    assert result.structures[0].metadata["r_factor"] == pytest.approx(0.1071)


@pytest.mark.parametrize(
    ("occupancy", "accepted"), [(1.0, True), (0.99, True), (0.98, False), (0.5, False)]
)
def test_occupancy_limit(tmp_path: Path, occupancy: float, accepted: bool) -> None:
    result = read_structures([rocksalt_cif(tmp_path, occupancy=occupancy)])
    assert len(result.structures) == int(accepted)
    if accepted:
        assert result.structures[0].formula == "NaCl"
    else:
        assert result.rejections[0].reason == "occupancy"


def test_occupancy_filter_off_keeps_the_majority_species() -> None:
    params = FilterParams(min_occupancy=None)
    result = read_structures([COD / "1006144.cif", COD / "1011100.cif"], params=params)
    assert len(result.structures) == 2
    mixed, partial = result.structures
    assert mixed.metadata["disordered"] is True
    assert partial.metadata["disordered"] is True
    # Mn (0.83) beats Cr (0.17) on the mixed site; no Cr is left
    assert 24 not in mixed.numbers and 25 in mixed.numbers
    assert partial.formula == "TiN"


@pytest.mark.parametrize(
    ("symbol", "problem"),
    [
        ("D", "'D'"),
        ("T", "'T'"),
        ("X", "'X'"),
        ("Va", "'Va'"),
        ("Qq", "'Qq'"),
        ("Cl1-x", "'Cl1-x'"),
        ("Cl--+", "'Cl--+'"),
    ],
)
def test_unknown_species_are_named(tmp_path: Path, symbol: str, problem: str) -> None:
    result = read_structures([rocksalt_cif(tmp_path, anion=symbol)])
    assert result.structures == []
    (rejection,) = result.rejections
    assert rejection.reason == "unknown_species"
    assert problem in rejection.message


@pytest.mark.parametrize("symbol", ["Cl", "Cl-", "Cl1-", "CL", "Cl0", "Cl0.5-"])
def test_charged_and_odd_case_symbols_are_elements(tmp_path: Path, symbol: str) -> None:
    result = read_structures([rocksalt_cif(tmp_path, anion=symbol)])
    assert [s.formula for s in result.structures] == ["NaCl"]


def test_odd_type_symbols_from_cod_are_read() -> None:
    # COD 1100042 writes its type symbols as Ti0 and O0
    (structure,) = read_structures([COD / "1100042.cif"]).structures
    assert structure.formula == "TiO"


def test_species_check_off_reads_deuterium_as_hydrogen() -> None:
    result = read_structures([BAD / "deuterium.cif"], params=FilterParams(check_species=False))
    (structure,) = result.structures
    assert structure.formula == "NaH"
    # a symbol with no atomic number cannot be kept even then
    result = read_structures([BAD / "unknown_symbol.cif"], params=FilterParams(check_species=False))
    assert result.rejections[0].reason == "unknown_species"


def test_hydrogen_is_an_element() -> None:
    (structure,) = read_structures([COD / "1010132.cif"]).structures
    assert structure.formula == "PH3"
    assert 1 in structure.sites.z


def test_distance_filter(tmp_path: Path) -> None:
    result = read_structures([BAD / "overlap.cif"], params=FilterParams(min_distance=None))
    (structure,) = result.structures
    assert structure.sites.dmin == pytest.approx(0.3)
    result = read_structures([BAD / "overlap.cif"], params=FilterParams(min_distance=0.2))
    assert len(result.structures) == 1
    # a real file with two symmetry copies 0.008 Å apart
    (rejection,) = read_structures([COD / "5900019.cif"]).rejections
    assert rejection.reason == "short_distance"


def test_distance_includes_periodic_images(tmp_path: Path) -> None:
    # two atoms 0.3 Å apart only across the cell boundary
    text = (
        "data_wrap\n_cell_length_a 5\n_cell_length_b 5\n_cell_length_c 5\n"
        "_cell_angle_alpha 90\n_cell_angle_beta 90\n_cell_angle_gamma 90\n"
        "_symmetry_space_group_name_H-M 'P 1'\nloop_\n_symmetry_equiv_pos_as_xyz\n'x, y, z'\n"
        "loop_\n_atom_site_label\n_atom_site_type_symbol\n_atom_site_fract_x\n"
        "_atom_site_fract_y\n_atom_site_fract_z\nA1 Na 0.02 0 0\nA2 Na 0.96 0 0\n"
        "A3 Cl 0.5 0.5 0.5\n"
    )
    (tmp_path / "wrap.cif").write_text(text)
    (rejection,) = read_structures([tmp_path / "wrap.cif"]).rejections
    assert rejection.reason == "short_distance"
    assert "0.300 Å" in rejection.message


def test_origin_choice_2_without_operations_is_read_in_its_setting() -> None:
    # pymatgen alone reads this file in origin choice 1 (Mg16Al8O32)
    (structure,) = read_structures([BAD / "spinel_origin2.cif"]).structures
    counts = Counter(structure.numbers.tolist())
    assert counts == {12: 8, 13: 16, 8: 32}
    assert structure.sites.spacegroup == 227
    assert structure.metadata["symops_generated"] is True
    assert structure.sites.dmin == pytest.approx(1.924, abs=2e-3)  # Al-O in MgAl2O4


def test_hall_symbol_without_operations(tmp_path: Path) -> None:
    text = (BAD / "spinel_origin2.cif").read_text()
    text = text.replace("_symmetry_space_group_name_H-M 'F d -3 m:2'", "")
    hall = "_symmetry_space_group_name_Hall '-F 4vw 2vw 3'"
    text = text.replace("_symmetry_Int_Tables_number 227", hall)
    (tmp_path / "hall.cif").write_text(text)
    (structure,) = read_structures([tmp_path / "hall.cif"]).structures
    assert Counter(structure.numbers.tolist()) == {12: 8, 13: 16, 8: 32}


def strip_symmetry_operations(text: str) -> str:
    """A CIF without its loop of symmetry operations."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        following = lines[i + 1] if i + 1 < len(lines) else ""
        if lines[i].strip() == "loop_" and re.match(
            r"\s*_(symmetry_equiv_pos|space_group_symop)", following
        ):
            i += 1
            while i < len(lines) and lines[i].strip().startswith("_"):
                i += 1
            while i < len(lines) and lines[i].strip() and lines[i].strip()[0] != "_":
                if lines[i].strip() == "loop_":
                    break
                i += 1
            continue
        out.append(lines[i])
        i += 1
    return "\n".join(out) + "\n"


@pytest.mark.parametrize("cod_id", ["1011211", "1000017", "1100042", "2204979", "1010132"])
def test_operations_from_the_symbol_equal_the_listed_ones(tmp_path: Path, cod_id: str) -> None:
    # oracle: the same file without its operations gives the same structure
    stripped = strip_symmetry_operations((COD / f"{cod_id}.cif").read_text())
    assert "_symmetry_equiv_pos_as_xyz" not in stripped
    (tmp_path / f"{cod_id}.cif").write_text(stripped)
    (listed,) = read_structures([COD / f"{cod_id}.cif"]).structures
    (generated,) = read_structures([tmp_path / f"{cod_id}.cif"]).structures
    assert generated.metadata["symops_generated"] is True
    assert generated.formula == listed.formula
    assert generated.sites.spacegroup == listed.sites.spacegroup
    assert site_multiset(generated.sites) == site_multiset(listed.sites)
    assert generated.sites.dmin == pytest.approx(listed.sites.dmin)


@pytest.mark.parametrize(
    ("symbol", "accepted"),
    [("F d -3 m (origin choice 2)", True), ("F d -3 m:3", False), ("F 41/d -3 2/m:2", True)],
)
def test_explicit_settings(tmp_path: Path, symbol: str, accepted: bool) -> None:
    text = (BAD / "spinel_origin2.cif").read_text().replace("F d -3 m:2", symbol)
    (tmp_path / "s.cif").write_text(text)
    result = read_structures([tmp_path / "s.cif"])
    if accepted:
        (structure,) = result.structures
        assert Counter(structure.numbers.tolist()) == {12: 8, 13: 16, 8: 32}
    else:
        (rejection,) = result.rejections
        assert rejection.reason == "parse_error"
        assert "F d -3 m:3" in rejection.message


def test_structure_round_trip(data_result: ReadResult) -> None:
    accepted, _ = by_id(data_result)
    record = accepted["1011211"]
    structure = record.to_structure()
    assert structure.composition.reduced_formula == record.formula == "CaTiO3"
    again = unique_sites(structure)
    assert site_multiset(again) == site_multiset(record.sites)
    assert record.lattice.shape == (3, 3)
    assert record.frac_coords.shape == (record.n_atoms, 3)
    assert record.numbers.dtype == np.int16


def test_filter_params_are_recorded_as_json() -> None:
    params = FilterParams(r_factor_max=None)
    attrs = json.loads(json.dumps(params.to_attrs()))
    assert attrs["r_factor_max"] is None
    assert attrs["min_occupancy"] == 0.98 and attrs["min_distance"] == 0.65
    assert attrs["symprec"] == 0.01 and attrs["angle_tolerance"] == 5.0
    assert read_structures([COD / "1000044.cif"], params=params).params == params


def test_progress_bar_does_not_change_the_result() -> None:
    quiet = read_structures([COD], progress=False)
    loud = read_structures([COD], progress=True)
    assert [s.structure_id for s in quiet.structures] == [s.structure_id for s in loud.structures]
    assert quiet.rejections == loud.rejections


# -- unique sites -------------------------------------------------------------------


def test_nacl_unique_sites() -> None:
    table = unique_sites(nacl())
    assert table.spacegroup == 225
    assert Counter((int(z), int(m)) for z, m in zip(table.z, table.multiplicity, strict=True)) == {
        (11, 4): 1,
        (17, 4): 1,
    }
    assert sorted(table.wyckoff.tolist()) == ["a", "b"]
    assert table.dmin == pytest.approx(5.64 / 2)
    assert table.index.dtype == np.int32 and table.z.dtype == np.int16
    assert table.multiplicity.dtype == np.int32
    assert len(table) == 2


def test_perovskite_unique_sites(data_result: ReadResult) -> None:
    accepted, _ = by_id(data_result)
    table = accepted["1011211"].sites
    assert table.spacegroup == 221
    assert Counter((int(z), int(m)) for z, m in zip(table.z, table.multiplicity, strict=True)) == {
        (20, 1): 1,
        (22, 1): 1,
        (8, 3): 1,
    }
    letters = dict(zip(table.z.tolist(), table.wyckoff.tolist(), strict=True))
    assert letters[8] in {"c", "d"} and {letters[20], letters[22]} == {"a", "b"}
    assert table.dmin == pytest.approx(accepted["1011211"].lattice[0, 0] / 2)  # Ti-O


def test_spinel_unique_sites(data_result: ReadResult) -> None:
    accepted, _ = by_id(data_result)
    table = accepted["spinel_origin2"].sites
    assert table.spacegroup == 227
    multiplicity = dict(zip(table.z.tolist(), table.multiplicity.tolist(), strict=True))
    assert multiplicity == {12: 8, 13: 16, 8: 32}
    letters = dict(zip(table.z.tolist(), table.wyckoff.tolist(), strict=True))
    # letters are defined up to the normaliser of Fd-3m: 8a/16d or 8b/16c
    assert (letters[12], letters[13]) in {("a", "d"), ("b", "c")}
    assert letters[8] == "e"


@pytest.mark.parametrize("scaling", [(2, 1, 1), (1, 3, 1), (2, 2, 2)])
def test_supercell_has_the_same_unique_sites(
    data_result: ReadResult, scaling: tuple[int, int, int]
) -> None:
    accepted, _ = by_id(data_result)
    factor = int(np.prod(scaling))
    perovskite, corundum = accepted["1011211"], accepted["1000017"]
    for structure in (nacl(), perovskite.to_structure(), corundum.to_structure()):
        cell = unique_sites(structure)
        supercell = unique_sites(structure.make_supercell(scaling, in_place=False))
        assert supercell.spacegroup == cell.spacegroup
        expected = Counter({(z, m * factor, w): n for (z, m, w), n in site_multiset(cell).items()})
        assert site_multiset(supercell) == expected
        assert supercell.dmin == pytest.approx(cell.dmin)


def test_primitive_and_conventional_cells_agree() -> None:
    conventional = nacl()
    primitive = conventional.get_primitive_structure()
    assert len(primitive) == 2
    small, large = unique_sites(primitive), unique_sites(conventional)
    assert Counter({(z, 4 * m, w): n for (z, m, w), n in site_multiset(small).items()}) == (
        site_multiset(large)
    )


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # spglib, called by pymatgen
def test_unique_sites_match_pymatgen_analyser(data_result: ReadResult) -> None:
    for record in data_result.structures[:6]:
        structure = record.to_structure()
        dataset = SpacegroupAnalyzer(structure, symprec=0.01).get_symmetry_dataset()
        representatives = sorted(set(np.asarray(dataset.crystallographic_orbits).tolist()))
        assert representatives == sorted(set(np.asarray(dataset.equivalent_atoms).tolist()))
        assert record.sites.index.tolist() == representatives
        assert record.sites.wyckoff.tolist() == [dataset.wyckoffs[i] for i in representatives]
        assert record.sites.spacegroup == dataset.number


def test_one_atom_cell_distance_is_the_shortest_lattice_vector() -> None:
    bcc = Structure(Lattice.cubic(3.0), ["Fe", "Fe"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    primitive = bcc.get_primitive_structure()
    assert len(primitive) == 1
    assert shortest_distance(primitive) == pytest.approx(3.0 * np.sqrt(3) / 2)
    # a large cell needs a search radius above the first guess
    big = Structure(Lattice.cubic(9.0), ["Cs"], [[0, 0, 0]])
    assert shortest_distance(big) == pytest.approx(9.0)


def test_unique_sites_refuse_disordered_or_empty_structures() -> None:
    disordered = Structure(Lattice.cubic(4.0), [{"Mn": 0.5, "Co": 0.5}], [[0, 0, 0]])
    with pytest.raises(AfpxError, match="ordered"):
        unique_sites(disordered)
    empty = Structure(Lattice.cubic(4.0), [], [])
    with pytest.raises(AfpxError, match="no unique sites"):
        unique_sites(empty)
    with pytest.raises(AfpxError, match="no shortest distance"):
        shortest_distance(empty)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"symprec": -1.0}, "symprec"),
        ({"symprec": 0.0}, "symprec"),
        ({"angle_tolerance": float("nan")}, "angle_tolerance"),
        ({"r_factor_max": 0.0}, "r_factor_max"),
        ({"min_occupancy": 1.0}, "min_occupancy"),
        ({"min_distance": -0.1}, "min_distance"),
    ],
)
def test_filter_params_are_checked(options: dict[str, float], match: str) -> None:
    # spglib crashes the interpreter on a negative symprec: refuse it first
    with pytest.raises(AfpxError, match=match):
        FilterParams(**options)  # type: ignore[arg-type]


def test_unique_sites_checks_its_tolerances() -> None:
    with pytest.raises(AfpxError, match="symprec"):
        unique_sites(nacl(), symprec=-0.5)


def test_symmetry_failure_is_a_rejection_and_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # spglib finds no group when symprec exceeds the cell
    with pytest.raises(AfpxError, match="no space group"):
        unique_sites(nacl(), symprec=10.0)
    (rejection,) = read_structures(
        [COD / "1000044.cif"], params=FilterParams(symprec=10.0)
    ).rejections
    assert rejection.reason == "symmetry"
    assert "symprec=10.0" in rejection.message
    import spglib

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("spglib is broken")

    monkeypatch.setattr(spglib, "get_symmetry_dataset", broken)
    with pytest.raises(AfpxError, match="symmetry analysis failed: RuntimeError: spglib is broken"):
        unique_sites(nacl())


# -- silent misreads made rejections (issue 12) -----------------------------------------------

# bad input -> (reason, words the message must contain)
MISREADS = {
    "label_nh4": ("formula_mismatch", "'Cl H4 N'"),
    "label_bi": ("unknown_species", "'BI' is ambiguous"),
    "label_fl": ("unknown_species", "Fl (Z = 114)"),
    "formula_mismatch": ("formula_mismatch", "on Ca: fraction 0.500 read, 0.333 stated"),
    "occupancy_zero": ("occupancy", "site Ca2 has occupancy 0"),
    "occupancy_negative": ("occupancy", "site O1 has occupancy -0.5"),
    "occupancy_text": ("parse_error", "_atom_site_occupancy 'abc' of site O1"),
    "occupancy_sum": ("occupancy", "sum to more than 1 (1.5)"),
    "symop_garbage": ("parse_error", "'foo,bar,baz'"),
    "huge_cell": ("bad_cell", "emptier than any crystal"),
}


@pytest.mark.parametrize("name", sorted(MISREADS))
def test_misread_cif_is_a_rejection_with_a_reason(name: str) -> None:
    reason, words = MISREADS[name]
    result = read_structures([BAD / f"{name}.cif"])
    assert not result.structures
    (rejection,) = result.rejections
    assert rejection.reason == reason
    assert words in rejection.message
    assert "\n" not in rejection.message


def test_misreads_stay_rejected_with_every_filter_off() -> None:
    # the checks of the data itself are not filters: --no-filter cannot turn them off
    params = FilterParams(r_factor_max=None, min_occupancy=None, min_distance=None)
    for name in ("label_nh4", "formula_mismatch", "occupancy_zero", "occupancy_text"):
        result = read_structures([BAD / f"{name}.cif"], params=params)
        assert [r.reason for r in result.rejections] == [MISREADS[name][0]], name


def test_lime_with_its_own_formula_is_accepted(tmp_path: Path) -> None:
    # the same CaO as the fixtures, stated formula right: the check passes it
    text = (BAD / "formula_mismatch.cif").read_text().replace("'Ca O2'", "'Ca O'")
    (tmp_path / "lime.cif").write_text(text)
    (structure,) = read_structures([tmp_path / "lime.cif"]).structures
    assert structure.formula == "CaO"
    assert structure.metadata["formula_sum"] == "Ca O"
    assert not structure.metadata.get("hydrogen_missing")


def test_label_only_cif_with_a_confirming_formula_is_accepted(tmp_path: Path) -> None:
    # CA1 in capitals: Ca or C? the formula sum says Ca
    text = (BAD / "label_bi.cif").read_text()
    text = text.replace("BI 0.", "CA1 0.").replace("I1 0.5", "O1 0.5")
    text = text.replace("data_label_bi\n", "data_label_bi\n_chemical_formula_sum 'Ca O'\n")
    (tmp_path / "upper.cif").write_text(text)
    (structure,) = read_structures([tmp_path / "upper.cif"]).structures
    assert structure.formula == "CaO"


def test_hydrogen_stated_but_absent_is_accepted_with_a_warning() -> None:
    with pytest.warns(AfpxWarning, match="1 accepted structure.*hydrogen_missing"):
        result = read_structures([BAD / "hydrogen_missing.cif"])
    (structure,) = result.structures
    assert structure.formula == "P"
    assert structure.metadata["hydrogen_missing"] is True
    assert result.hydrogen_missing() == [structure]
    assert "without the hydrogen their formula states: 1" in result.summary()


def test_hydrogen_in_atoms_but_not_in_formula_is_a_mismatch(tmp_path: Path) -> None:
    text = (COD / "1010132.cif").read_text()
    text = text.replace("data_1010132\n", "data_1010132\n_chemical_formula_sum 'P'\n")
    (tmp_path / "ph3.cif").write_text(text)
    (rejection,) = read_structures([tmp_path / "ph3.cif"]).rejections
    assert rejection.reason == "formula_mismatch"
    assert "hold H" in rejection.message


def test_byte_order_mark_reads_like_the_plain_file() -> None:
    plain = read_structures([COD / "1000044.cif"]).structures[0]
    (bom,) = read_structures([BAD / "bom.cif"]).structures
    assert (BAD / "bom.cif").read_bytes()[:3] == b"\xef\xbb\xbf"
    assert bom.formula == plain.formula == "CaO"
    np.testing.assert_array_equal(bom.frac_coords, plain.frac_coords)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("'Ca O3 Ti'", {"Ca": 1.0, "O": 3.0, "Ti": 1.0}),
        ("C6 H12 N2 O4", {"C": 6.0, "H": 12.0, "N": 2.0, "O": 4.0}),
        ("'D2 O'", {"H": 2.0, "O": 1.0}),
        ("Ca0.98 Mg.02 O", {"Ca": 0.98, "Mg": 0.02, "O": 1.0}),
        ("'(Ca O)2'", None),
        ("Fe2+ O", None),
        ("Qq2", None),
        ("?", None),
    ],
)
def test_parse_formula_sum(text: str, expected: dict[str, float] | None) -> None:
    assert parse_formula_sum(text) == expected


def test_cell_emptier_than_the_limit_is_refused_and_a_dense_one_is_not(tmp_path: Path) -> None:
    # rock salt with a = 5.64 Å holds 8 atoms in 179 Å^3; at the limit's cube root it is refused
    a_limit = (8 * MAX_VOLUME_PER_ATOM) ** (1 / 3)
    ok = read_structures([rocksalt_cif(tmp_path, name="dense")])
    assert len(ok.structures) == 1
    bad = read_structures([rocksalt_cif(tmp_path, name="sparse", a=a_limit * 1.01)])
    assert [r.reason for r in bad.rejections] == ["bad_cell"]


def test_special_files_are_refused_and_never_read() -> None:
    with pytest.raises(AfpxError, match="/dev/zero is not a regular file"):
        read_structures(["/dev/zero"])


def test_a_file_above_max_file_mb_is_a_rejection_not_read_whole() -> None:
    size = (COD / "1000044.cif").stat().st_size
    result = read_structures([COD / "1000044.cif"], max_file_mb=size / 2e6)
    (rejection,) = result.rejections
    assert rejection.reason == "parse_error"
    assert "--max-file-mb" in rejection.message
    assert len(read_structures([COD / "1000044.cif"], max_file_mb=size / 1e6).structures) == 1


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_max_file_mb_must_be_positive(value: float) -> None:
    with pytest.raises(AfpxError, match="max_file_mb must be a positive"):
        read_structures([COD / "1000044.cif"], max_file_mb=value)


# -- afpx inspect: one-line errors and exit codes ---------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "words"),
    [
        ("--symprec", "-1", "symprec must be a positive distance in Å, not -1.0"),
        ("--min-distance", "nan", "min_distance must be at least 0 Å, not nan"),
        ("--min-occupancy", "2", "min_occupancy must lie in [0, 1), not 2.0"),
        ("--r-factor-max", "-1", "r_factor_max must be positive (a fraction), not -1.0"),
        ("--max-file-mb", "0", "max_file_mb must be a positive number of megabytes, not 0.0"),
    ],
)
def test_inspect_bad_filter_option_is_one_line_usage_error(
    option: str, value: str, words: str
) -> None:
    from click.testing import CliRunner

    from afpx.cli import main

    result = CliRunner().invoke(main, ["inspect", str(COD / "1000044.cif"), option, value])
    assert result.exit_code == 2
    assert result.output.strip() == f"Error: {words}"


def test_inspect_refuses_a_device_file_at_once() -> None:
    from click.testing import CliRunner

    from afpx.cli import main

    result = CliRunner().invoke(main, ["inspect", "/dev/zero"])
    assert result.exit_code == 2
    assert "/dev/zero is not a regular file" in result.output
    assert "Traceback" not in result.output


def test_inspect_with_nothing_accepted_exits_1_with_a_hint() -> None:
    from click.testing import CliRunner

    from afpx.cli import main

    result = CliRunner().invoke(main, ["inspect", str(BAD / "occupancy_zero.cif")])
    assert result.exit_code == 1
    assert "site Ca2 has occupancy 0" in result.output
    assert "no structure accepted (1 read; occupancy 1)" in result.output
    ok = CliRunner().invoke(main, ["inspect", str(COD / "1000044.cif")])
    assert ok.exit_code == 0


def test_inspect_shows_the_hydrogen_warning_as_one_line() -> None:
    from click.testing import CliRunner

    from afpx.cli import main

    result = CliRunner().invoke(main, ["inspect", "--summary", str(BAD / "hydrogen_missing.cif")])
    assert result.exit_code == 0
    warning_lines = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warning_lines) == 1
    assert "hydrogen" in warning_lines[0]


@pytest.mark.parametrize("name", sorted(BAD_REASONS))
def test_inspect_of_each_bad_input_exits_1_naming_file_and_reason(name: str) -> None:
    from click.testing import CliRunner

    from afpx.cli import main

    path = BAD / f"{name}.cif"
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 1, result.output
    (line,) = [x for x in result.output.splitlines() if str(path) in x]
    assert f" {BAD_REASONS[name]}: " in line
    assert "Traceback" not in result.output
    assert sorted(p.name for p in BAD.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("_cod_database_code 1000044", "cod-1000044"),
        ("_database_code_amcsd 0000029", "amcsd-0000029"),
        ("_database_code_ICSD 61316", "icsd-61316"),
        ("_database_code_icsd ?", "218"),  # no code stated: the file stem
        ("", "218"),
    ],
)
def test_cif_id_is_the_database_code_the_file_states(
    tmp_path: Path, line: str, expected: str
) -> None:
    text = (COD / "1000044.cif").read_text()
    text = "\n".join(t for t in text.splitlines() if not t.startswith("_cod_database_code"))
    (tmp_path / "218.cif").write_text(text + "\n" + line + "\n")
    (structure,) = read_structures([tmp_path / "218.cif"]).structures
    assert structure.structure_id == expected
    assert structure.metadata.get("file_id", structure.structure_id) == "218"
    assert structure.source == str(tmp_path / "218.cif")  # provenance: the file it came from


def test_site_of_atoms_maps_every_atom_to_its_orbit() -> None:
    from pymatgen.core import Lattice, Structure

    from afpx.structures import site_of_atoms, unique_sites

    nacl = Structure.from_spacegroup(
        "Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]
    )
    table = unique_sites(nacl)
    site = site_of_atoms(nacl.lattice.matrix, nacl.frac_coords, nacl.atomic_numbers, table.index)
    assert site.tolist() == [0] * 4 + [1] * 4
    np.testing.assert_array_equal(np.bincount(site), table.multiplicity)
    with pytest.raises(AfpxError, match=r"the orbits of atoms \[4\] have no representative"):
        site_of_atoms(nacl.lattice.matrix, nacl.frac_coords, nacl.atomic_numbers, [0])
    with pytest.raises(AfpxError, match="lie outside the cell's 8 atoms"):
        site_of_atoms(nacl.lattice.matrix, nacl.frac_coords, nacl.atomic_numbers, [0, 8])
