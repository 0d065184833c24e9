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

from afpx import AfpxError
from afpx.schema import REJECT_REASONS
from afpx.structures import (
    AnalysedStructure,
    FilterParams,
    ReadResult,
    Rejection,
    SiteTable,
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
            r.id.removeprefix("cod-") if r.block is not None else Path(r.id).stem: r
            for r in result.rejections
        },
    )


@pytest.fixture(scope="module")
def data_result() -> ReadResult:
    """Everything in tests/data, read once."""
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
