"""JSON lines, ASE databases, de-duplication, workers and the inspect command."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from pymatgen.core import Lattice, Structure

import afpx.structures as structures_module
from afpx import AfpxWarning
from afpx.cli import main
from afpx.structures import (
    AnalysedStructure,
    FilterParams,
    ReadResult,
    StructureTable,
    read_structures,
    read_table,
)

DATA = Path(__file__).parent / "data"
COD = DATA / "cod"


FCC = [[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]]


def nacl(a: float = 5.64) -> Structure:
    """Rock salt, conventional cell (``Structure.from_spacegroup`` takes seconds)."""
    anion = [[(x + 0.5) % 1, y, z] for x, y, z in FCC]
    return Structure(Lattice.cubic(a), ["Na"] * 4 + ["Cl"] * 4, FCC + anion)


def cscl(a: float = 4.12) -> Structure:
    return Structure(Lattice.cubic(a), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def outcome(result: ReadResult) -> list[tuple[str, str, str]]:
    """(id, accepted / reason, formula or message) of every record, in order."""
    rows = [
        (s.structure_id, "accepted", s.formula, s.metadata.get("block")) for s in result.structures
    ]
    rows += [(r.id, r.reason, r.message, r.block) for r in result.rejections]
    return sorted(rows, key=lambda row: (str(row[3]), row[0]))  # type: ignore[return-value]


# -- JSON -------------------------------------------------------------------------------


def write_jsonl(path: Path, lines: list[str]) -> Path:
    text = "\n".join(lines) + "\n"
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


@pytest.fixture
def jsonl_lines() -> list[str]:
    deuterated = nacl().as_dict()
    deuterated["sites"][0]["species"][0]["element"] = "D"
    return [
        json.dumps(nacl().as_dict()),  # 1: plain pymatgen dict
        json.dumps({"id": "cscl-1", "structure": cscl().as_dict(), "note": "wrapped"}),  # 2
        "{not json",  # 3
        json.dumps([1, 2, 3]),  # 4: not a dict
        json.dumps({"id": "no-sites", "structure": {"lattice": {}}}),  # 5
        json.dumps({"id": "deut", "structure": deuterated}),  # 6
        json.dumps({"id": "cscl-1", "structure": cscl().as_dict(), "note": "wrapped"}),  # 7: dup
        "",  # blank lines are skipped
        json.dumps({"id": "cscl-1", "structure": cscl(4.2).as_dict()}),  # 9: same id, other cell
    ]


@pytest.mark.parametrize("name", ["s.jsonl", "s.jsonl.gz", "s.ndjson"])
def test_json_lines(tmp_path: Path, jsonl_lines: list[str], name: str) -> None:
    path = write_jsonl(tmp_path / name, jsonl_lines)
    result = read_structures([path])
    accepted = {s.structure_id: s for s in result.structures}
    assert set(accepted) == {"s:1", "cscl-1", "cscl-1@9"}
    assert accepted["s:1"].formula == "NaCl"
    assert accepted["cscl-1"].metadata["note"] == "wrapped"
    assert accepted["cscl-1"].sites.spacegroup == 221
    reasons = {(r.block, r.reason) for r in result.rejections}
    assert reasons == {
        ("3", "parse_error"),
        ("4", "parse_error"),
        ("5", "parse_error"),
        ("6", "unknown_species"),
        ("7", "duplicate"),
    }
    assert result.n_read == 8


def test_json_species_checks(tmp_path: Path) -> None:
    deuterated = nacl().as_dict()
    deuterated["sites"][0]["species"][0]["element"] = "D"
    dummy = nacl().as_dict()
    dummy["sites"][0]["species"][0]["element"] = "Qq"
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(deuterated), json.dumps(dummy)])
    strict = read_structures([path])
    assert [r.reason for r in strict.rejections] == ["unknown_species"] * 2
    assert "'D'" in strict.rejections[0].message and "'Qq'" in strict.rejections[1].message
    lenient = read_structures([path], params=FilterParams(check_species=False))
    assert [s.formula for s in lenient.structures] == ["Na3HCl4"]  # D read as H
    assert [r.reason for r in lenient.rejections] == ["unknown_species"]


def test_json_file_with_a_list(tmp_path: Path) -> None:
    path = tmp_path / "list.json"
    path.write_text(
        json.dumps([nacl().as_dict(), {"material_id": "m-2", "structure": cscl().as_dict()}])
    )
    result = read_structures([path])
    assert [s.structure_id for s in result.structures] == ["list:1", "m-2"]


def test_json_with_a_disordered_structure(tmp_path: Path) -> None:
    disordered = Structure(Lattice.cubic(3.0), [{"Mn": 0.5, "Co": 0.5}], [[0, 0, 0]])
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(disordered.as_dict())])
    (rejection,) = read_structures([path]).rejections
    assert rejection.reason == "occupancy"


def test_empty_json_file(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n")
    (rejection,) = read_structures([tmp_path / "empty.jsonl"]).rejections
    assert rejection.reason == "parse_error"


# -- ASE databases ----------------------------------------------------------------------


def make_ase_db(path: Path) -> Path:
    """A small ASE database with good rows and every kind of bad row."""
    import ase.db
    from ase import Atoms
    from pymatgen.io.ase import AseAtomsAdaptor

    adaptor = AseAtomsAdaptor()
    db = ase.db.connect(str(path))
    db.write(adaptor.get_atoms(nacl()), name="nacl")  # 1
    db.write(adaptor.get_atoms(nacl()), name="nacl")  # 2: exact duplicate of 1
    db.write(adaptor.get_atoms(cscl()))  # 3: no name
    db.write(Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]), name="water")  # 4
    db.write(
        Atoms("XCl", cell=np.eye(3) * 4, pbc=True, scaled_positions=[[0, 0, 0], [0.5] * 3])
    )  # 5
    db.write(Atoms("Na2", cell=np.eye(3) * 4, pbc=True, positions=[[0, 0, 0], [0.3, 0, 0]]))  # 6
    flat = np.array([[4.0, 0, 0], [0, 4.0, 0], [4.0, 4.0, 0]])
    db.write(Atoms("Na", cell=flat, pbc=True), name="flat")  # 7
    db.write(adaptor.get_atoms(nacl(5.7)), name="nacl")  # 8: same name, other structure
    db.write(adaptor.get_atoms(cscl()), name="cscl", spacegroup=221)  # 9
    return path


@pytest.fixture(scope="module")
def small_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_ase_db(tmp_path_factory.mktemp("ase") / "small.db")


def ase_db(path: Path, small_db: Path) -> Path:
    """A copy of the small database at ``path``."""
    return Path(shutil.copy(small_db, path))


def test_ase_database(tmp_path: Path, small_db: Path) -> None:
    path = ase_db(tmp_path / "small.db", small_db)
    result = read_structures([path])
    accepted = {s.structure_id: s for s in result.structures}
    assert list(accepted) == ["nacl", "small:3", "nacl@8", "cscl"]
    assert accepted["nacl"].metadata["row"] == 1
    assert accepted["cscl"].metadata["spacegroup"] == 221
    assert accepted["nacl"].sites.spacegroup == 225
    assert accepted["nacl"].sites.multiplicity.tolist() == [4, 4]
    assert accepted["nacl@8"].sites.dmin == pytest.approx(5.7 / 2)
    rejected = {r.block: r for r in result.rejections}
    assert {block: r.reason for block, r in rejected.items()} == {
        "2": "duplicate",
        "4": "bad_cell",
        "5": "unknown_species",
        "6": "short_distance",
        "7": "bad_cell",
    }
    assert "X" in rejected["5"].message
    assert "pbc" in rejected["4"].message
    assert result.n_read == 9
    # frac coords wrapped into [0, 1)
    for s in result.structures:
        assert np.all((s.frac_coords >= 0) & (s.frac_coords < 1))


def test_ase_database_is_not_modified(tmp_path: Path, small_db: Path) -> None:
    path = ase_db(tmp_path / "small.db", small_db)
    before = path.read_bytes()
    read_structures([path])
    assert path.read_bytes() == before


def test_not_an_ase_database(tmp_path: Path) -> None:
    (tmp_path / "junk.db").write_bytes(b"\x00garbage" * 50)
    (tmp_path / "empty.db").write_bytes(b"")
    result = read_structures([tmp_path / "junk.db", tmp_path / "empty.db"])
    assert [r.reason for r in result.rejections] == ["parse_error", "parse_error"]
    assert "not an ASE SQLite database" in result.rejections[0].message
    assert not result.structures


def test_empty_ase_database(tmp_path: Path) -> None:
    import ase.db
    from ase import Atoms

    path = tmp_path / "none.db"
    db = ase.db.connect(str(path))
    db.delete([db.write(Atoms("Na", cell=np.eye(3) * 4, pbc=True))])
    (rejection,) = read_structures([path]).rejections
    assert rejection.reason == "no_atoms"


def test_ase_rows_in_several_tasks_give_the_same_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_db: Path
) -> None:
    path = ase_db(tmp_path / "small.db", small_db)
    whole = read_structures([path])
    monkeypatch.setattr(structures_module, "_ROWS_PER_TASK", 2)
    assert len(structures_module._ase_tasks(path, source=str(path))) == 5
    split = read_structures([path])
    assert outcome(split) == outcome(whole)
    assert [s.structure_id for s in split.structures] == [s.structure_id for s in whole.structures]


def test_workers_give_identical_ordered_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_db: Path
) -> None:
    ase_db(tmp_path / "small.db", small_db)
    for cif in sorted(COD.glob("*.cif"))[:6]:
        shutil.copy(cif, tmp_path / cif.name)
    monkeypatch.setattr(structures_module, "_ROWS_PER_TASK", 3)
    monkeypatch.setattr(structures_module, "_FILES_PER_TASK", 2)
    one = read_structures([tmp_path], scheduler="synchronous")
    two = read_structures([tmp_path], workers=2)  # a local cluster of two processes
    assert [s.structure_id for s in two.structures] == [s.structure_id for s in one.structures]
    assert two.rejections == one.rejections
    assert two.n_read == one.n_read
    for a, b in zip(one.structures, two.structures, strict=True):
        np.testing.assert_array_equal(a.frac_coords, b.frac_coords)
        np.testing.assert_array_equal(a.sites.multiplicity, b.sites.multiplicity)
        np.testing.assert_array_equal(a.sites.wyckoff, b.sites.wyckoff)


def test_threads_do_not_take_each_others_warnings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the reasons of these two rejections come from warnings pymatgen raises while
    # parsing; read in threads next to accepted files, each must keep its own
    bad = DATA / "bad"
    for i in range(6):
        shutil.copy(bad / "unknown_setting.cif", tmp_path / f"{i}a.cif")
        shutil.copy(COD / "1011211.cif", tmp_path / f"{i}b.cif")
        shutil.copy(bad / "occupancy_sum.cif", tmp_path / f"{i}c.cif")
    monkeypatch.setattr(structures_module, "_FILES_PER_TASK", 1)
    alone = read_structures([tmp_path], scheduler="synchronous")
    threads = read_structures([tmp_path], scheduler="threads", workers=4)
    assert outcome(threads) == outcome(alone)
    assert alone.counts() == {"parse_error": 6, "occupancy": 6}
    assert len(alone.structures) == 6


def test_duplicates_are_per_source(tmp_path: Path, small_db: Path) -> None:
    # the same structure in two databases is no duplicate
    first = ase_db(tmp_path / "a.db", small_db)
    second = shutil.copy(first, tmp_path / "b.db")
    result = read_structures([first, second])
    assert sum(r.reason == "duplicate" for r in result.rejections) == 2
    assert len(result.structures) == 8


def test_read_table_keeps_what_read_structures_accepts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_db: Path, jsonl_lines: list[str]
) -> None:
    # duplicates, renamed ids, rejections that repeat, a warning, records over several tasks
    db = ase_db(tmp_path / "small.db", small_db)
    inputs = [db, write_jsonl(tmp_path / "s.jsonl", jsonl_lines), *sorted(COD.glob("*.cif"))[:3]]
    inputs += [DATA / "bad" / "hydrogen_missing.cif", db]  # the database again: all repeats
    monkeypatch.setattr(structures_module, "_ROWS_PER_TASK", 2)
    monkeypatch.setattr(structures_module, "_FILES_PER_TASK", 2)
    with pytest.warns(AfpxWarning, match="hydrogen") as warned:
        full = read_structures(inputs)
    with pytest.warns(AfpxWarning, match="hydrogen") as warned_too:
        read = read_table(inputs)
    assert [str(w.message) for w in warned_too] == [str(w.message) for w in warned]
    assert read.rejections == full.rejections
    assert sum(r.reason == "duplicate" for r in read.rejections) == 11
    assert (read.n_read, read.summary(), read.counts()) == (
        full.n_read,
        full.summary(),
        full.counts(),
    )
    assert len(read.table) == len(full.structures)
    assert "nacl@8" in read.table.structure_id.tolist()
    for i, expected in enumerate(full.structures):
        assert_same_structure(read.table.structure(i), expected)


def assert_same_structure(got: AnalysedStructure, expected: AnalysedStructure) -> None:
    assert (got.structure_id, got.source, got.formula) == (
        expected.structure_id,
        expected.source,
        expected.formula,
    )
    for name in ("lattice", "frac_coords", "numbers"):
        np.testing.assert_array_equal(getattr(got, name), getattr(expected, name), err_msg=name)
    for name in ("index", "z", "multiplicity", "wyckoff"):
        np.testing.assert_array_equal(
            getattr(got.sites, name), getattr(expected.sites, name), err_msg=name
        )
    assert (got.sites.spacegroup, got.sites.dmin) == (
        expected.sites.spacegroup,
        expected.sites.dmin,
    )
    assert bool(got.metadata.get("hydrogen_missing")) == bool(
        expected.metadata.get("hydrogen_missing")
    )


def test_duplicate_keys_are_dropped_once_their_source_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_db: Path
) -> None:
    a = ase_db(tmp_path / "a.db", small_db)
    b = ase_db(tmp_path / "b.db", small_db)
    forgotten: list[tuple[int, list[str]]] = []
    forget = structures_module._Duplicates.forget

    def record(self: structures_module._Duplicates, sources: list[str]) -> None:
        forgotten.append((sum(map(len, self._first.values())), list(sources)))
        forget(self, sources)

    monkeypatch.setattr(structures_module._Duplicates, "forget", record)
    monkeypatch.setattr(structures_module, "_ROWS_PER_TASK", 3)  # three chunks per database
    read_table([a, b])
    # 8 distinct records in a.db (row 2 repeats row 1)
    assert [(n, s) for n, s in forgotten if s] == [(8, [str(a)]), (8, [str(b)])]
    forgotten.clear()
    read_table([a, b, a])  # a.db again: its keys are kept to the end
    assert [(n, s) for n, s in forgotten if s] == [(16, [str(b)]), (8, [str(a)])]


def test_structure_table_round_trip_and_read_only(tmp_path: Path, small_db: Path) -> None:
    structures = read_structures([ase_db(tmp_path / "small.db", small_db)]).structures
    table = StructureTable.from_structures(structures)
    assert len(table) == len(structures) == 4
    assert table.atom_start.tolist() == [0, 8, 10, 18, 20]
    for i, expected in enumerate(structures):
        assert_same_structure(table.structure(i), expected)
    with pytest.raises(ValueError, match="read-only"):
        table.frac_coords[0, 0] = 0.5  # shared with a cube's variables and Dask tasks
    empty = StructureTable.from_structures([])
    assert len(empty) == 0
    assert empty.lattice.shape == (0, 3, 3)
    assert empty.frac_coords.shape == (0, 3)
    assert empty.site_start.tolist() == [0]


def test_read_table_on_workers(tmp_path: Path, small_db: Path) -> None:
    db = ase_db(tmp_path / "small.db", small_db)
    one = read_table([db], scheduler="synchronous")
    two = read_table([db], workers=2)  # the columns travel between processes
    assert two.rejections == one.rejections
    for name in ("structure_id", "formula", "frac_coords", "wyckoff", "site_start"):
        np.testing.assert_array_equal(getattr(two.table, name), getattr(one.table, name))


# -- afpx inspect -----------------------------------------------------------------------


def test_inspect_prints_structures_rejections_and_counts() -> None:
    result = CliRunner().invoke(
        main, ["inspect", str(COD / "1011211.cif"), str(COD / "1006144.cif")]
    )
    assert result.exit_code == 0, result.output
    out = result.output
    assert "1011211  CaTiO3  sg 221" in out
    assert "Ca1a" in out and "O3c" in out
    assert "1006144  occupancy: site Mn1 holds 2 species" in out
    assert "read: 2\naccepted: 1\nrejected: 1\n  occupancy: 1" in out


def test_inspect_summary_only_and_filter_switches() -> None:
    args = ["inspect", "--summary", "--no-filter", "occupancy", str(COD / "1006144.cif")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == ["read: 1", "accepted: 1", "rejected: 0"]


def test_inspect_unknown_input_is_a_one_line_error() -> None:
    result = CliRunner().invoke(main, ["inspect", "no-such-dataset-or-file"])
    assert result.exit_code == 2
    assert "neither a file, a folder nor a dataset name" in result.output
    assert "Traceback" not in result.output


def test_inspect_params_reach_the_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}

    def fake(inputs: list[str], **kwargs: object) -> ReadResult:
        seen.update(kwargs, inputs=inputs)
        return ReadResult([], [], 0, kwargs["params"])  # type: ignore[arg-type]

    monkeypatch.setattr(structures_module, "read_structures", fake)
    args = ["inspect", "x", "--workers", "2", "--min-distance", "0.5", "--no-filter", "r-factor"]
    args += ["--max-file-mb", "3", "--scheduler", "processes"]
    result = CliRunner().invoke(main, args)
    # the fake reader accepts nothing: exit 1, after the reader got every option
    assert result.exit_code == 1, result.output
    assert "no structure accepted (0 read; nothing to read)" in result.output
    assert seen["workers"] == 2
    assert seen["scheduler"] == "processes"
    assert seen["max_file_mb"] == 3.0
    assert seen["params"] == FilterParams(r_factor_max=None, min_distance=0.5)


def test_echo_warnings_keeps_nothing(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import gc
    import warnings
    import weakref

    from afpx import AfpxWarning
    from afpx.commands.ingest import echo_warnings

    others: list[str] = []

    def previous(message: Warning | str, *args: object, **kwargs: object) -> None:
        others.append(str(message))

    monkeypatch.setattr(warnings, "showwarning", previous)
    with echo_warnings():
        warnings.simplefilter("always", UserWarning)
        refs = []
        for i in range(3):
            warning = AfpxWarning(f"number {i}")
            refs.append(weakref.ref(warning))
            warnings.warn(warning, stacklevel=1)
            del warning
        gc.collect()
        # shown as raised, then dropped: a long build cannot pile them up
        assert [ref() for ref in refs] == [None, None, None]
        assert capsys.readouterr().err.splitlines() == [
            "warning: number 0",
            "warning: number 1",
            "warning: number 2",
        ]
        warnings.warn("others go to the handler in place", UserWarning, stacklevel=1)
        assert others == ["others go to the handler in place"]
    assert warnings.showwarning is previous


def test_lean_metadata_keeps_what_a_cube_needs(tmp_path: Path, small_db: Path) -> None:
    path = ase_db(tmp_path / "small.db", small_db)
    full = read_structures([path])
    lean = read_structures([path], metadata=False)
    assert outcome(lean) == outcome(full)
    assert len(full.structures[0].metadata) > 2
    for s in lean.structures:
        assert set(s.metadata) <= {"block", "hydrogen_missing"}
        assert s.metadata["block"] is not None
