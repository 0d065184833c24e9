"""A corpus of hostile inputs, each through the command that reads it (issue 12).

Every case: the exit code, one ``Error:``/rejection line naming the file or the
value, no traceback, and nothing left behind (the working folder holds the
same files with the same bytes afterwards, and no output was created).
Inputs are the CIFs of ``tests/data/bad/`` and files derived at test time from
them and from a tiny trained model and cube.
"""

from __future__ import annotations

import gzip
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from _cube_helpers import make_synthetic_cube
from _model_helpers import train_tiny_model
from click.testing import CliRunner

from afpx.cli import main

DATA = Path(__file__).parent / "data"
BAD = DATA / "bad"
LIME = BAD / "position_twice.cif"  # lime plus one extra line; the clean lime is derived below


def lime_text() -> str:
    """Clean lime (CaO, COD 1000044), to derive hostile variants from."""
    return LIME.read_text().replace("Ca3 Ca2+ 0. 0. 0. 1.\n", "")


# -- CIFs in tests/data/bad: `afpx inspect` rejects each, naming file and reason --------------
CIF_REASONS = {
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
    "coordinate_nan": "parse_error",
    "coordinate_inf": "parse_error",
    "angle_zero": "bad_cell",
    "angle_180": "bad_cell",
    "length_negative": "bad_cell",
    "cell_missing": "parse_error",
    "multiplicity_huge": "bad_cell",
    "position_twice": "occupancy",
}

# other kinds of file, written at test time: name -> (bytes, words of the message)
OTHER_FILES: dict[str, tuple[bytes, str]] = {
    "garbage.json.gz": (b"\x00garbage, not gzip", "Not a gzipped file"),
    "garbage_inside.jsonl.gz": (gzip.compress(b"\x00\x01\x02 garbage"), "binary data"),
    "empty_list.json": (b"[]", "no JSON records in the file"),
    "empty.json": (b"", "no JSON records in the file"),
    "not_a_structure.json": (b'{"x": 1}', "not a structure dict"),
    "broken_line.jsonl": (b'{"x": 1}\n{broken\n', "JSONDecodeError"),
    "not_sqlite.db": (b"this is not sqlite\n" * 10, "not an ASE SQLite database"),
}


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with the bytes of files (None for folders)."""
    return {
        p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None)
        for p in root.rglob("*")
    }


def invoke(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(main, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def test_the_corpus_has_at_least_40_cases() -> None:
    n = len(CIF_REASONS) + len(OTHER_FILES) + len(VALUE_CASES) + len(DAMAGE_CASES)
    assert n >= 40
    assert all((BAD / f"{name}.cif").is_file() for name in CIF_REASONS)


@pytest.mark.parametrize("name", sorted(CIF_REASONS))
def test_inspect_rejects_each_bad_cif(name: str) -> None:
    before = tree(BAD)
    path = BAD / f"{name}.cif"
    code, output = invoke(["inspect", str(path)])
    assert code == 1, output
    (line,) = [x for x in output.splitlines() if str(path) in x]
    assert f" {CIF_REASONS[name]}: " in line
    assert tree(BAD) == before


@pytest.mark.parametrize("name", sorted(OTHER_FILES))
def test_inspect_rejects_each_bad_file(tmp_path: Path, name: str) -> None:
    data, words = OTHER_FILES[name]
    path = tmp_path / name
    path.write_bytes(data)
    before = tree(tmp_path)
    code, output = invoke(["inspect", str(path)])
    assert code == 1, output
    lines = [x for x in output.splitlines() if str(path) in x]
    assert lines and all(" parse_error: " in x for x in lines)
    assert any(words in x for x in lines), output
    assert tree(tmp_path) == before


@pytest.mark.parametrize("name", ["coordinate_nan", "angle_zero", "garbage", "multiplicity_huge"])
def test_build_cube_of_nothing_accepted_creates_nothing(tmp_path: Path, name: str) -> None:
    out = tmp_path / "cube.zarr"
    code, output = invoke(["build-cube", str(BAD / f"{name}.cif"), "-o", str(out)])
    assert code == 2, output
    (error,) = [x for x in output.splitlines() if x.startswith("Error:")]
    assert (
        "no structure was accepted" in error and f"{BAD / name}.cif: {CIF_REASONS[name]}: " in error
    )
    assert list(tmp_path.iterdir()) == []


# -- variants that must read FINE -----------------------------------------------------------
@pytest.mark.parametrize(
    "variant",
    [
        lambda t: t.replace("\n", "\r\n").encode(),  # CRLF line endings
        lambda t: t.replace("# derived", "# d\xe9riv\xe9").encode("latin-1"),  # a Latin-1 comment
        lambda t: t.replace("O1 O2-", "Ca1 O2-").encode(),  # a repeated label, typed sites
    ],
    ids=["crlf", "latin1_comment", "repeated_label"],
)
def test_harmless_variants_read_as_lime(tmp_path: Path, variant: Callable[[str], bytes]) -> None:
    path = tmp_path / "lime.cif"
    path.write_bytes(variant(lime_text()))
    code, output = invoke(["inspect", str(path)])
    assert code == 0, output
    assert "CaO  sg 225" in output and "sites: Ca4a O4b" in output


# -- bad values on the command line: exit 2, one line naming the value ----------------------
@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]
    words: str


VALUE_CASES = {
    "unknown_element": Case(("rank", "--elements", "Xx,Ge"), "unknown element symbol 'Xx'"),
    "repeated_element": Case(("rank", "--elements", "Mn,Mn"), "element Mn is repeated"),
    "one_element": Case(("rank", "--elements", "Mn"), "give at least two elements (got 1)"),
    "negative_top": Case(("rank", "--elements", "Mn,Ge", "--top", "-1"), "got -1"),
    "zero_amount": Case(("rank", "--formula", "Li2Mn0Ge"), "gives Mn the amount 0"),
    "negative_amount": Case(("rank", "--formula", "Li-2Ge"), "cannot read formula 'Li-2Ge'"),
    "unknown_in_formula": Case(
        ("rank", "--formula", "Xx2Ge"), "cannot read formula 'Xx2Ge': unknown element symbol(s) Xx"
    ),
    "nan_likelihood": Case(("rank", "--elements", "Mn,Ge", "--min-likelihood", "nan"), "got nan"),
    "symprec": Case(("inspect", "{lime}", "--symprec", "-1"), "-1"),
    "min_distance": Case(("inspect", "{lime}", "--min-distance", "nan"), "nan"),
    "min_occupancy": Case(("inspect", "{lime}", "--min-occupancy", "2"), "2"),
    "set_type": Case(
        ("train", "{cube}", "-o", "{new}", "--set", "kl_max=abc"), "'kl_max' must be float"
    ),
    "set_key": Case(("train", "{cube}", "-o", "{new}", "--set", "colour=red"), "colour"),
    "epochs": Case(("train", "{cube}", "-o", "{new}", "--epochs", "-1"), "got -1"),
    # outputs that cannot be written: refused before the work, naming the path
    "cif_folder_under_a_file": Case(
        ("rank", "--elements", "Mn,Ge", "--export-cif", "{lime}/cifs"),
        "cannot write the --export-cif folder",
    ),
    "cif_folder_url": Case(
        ("rank", "--elements", "Mn,Ge", "--export-cif", "s3://bucket/cifs"),
        "--export-cif writes local files",
    ),
    "model_folder_under_a_file": Case(
        ("train", "{cube}", "-o", "{lime}/model", "--epochs", "1", "--no-progress"),
        "cannot write the model folder",
    ),
    "screen_under_a_file": Case(
        ("screen", "-e", "Li,Mn,Ge", "-k", "2", "-o", "{lime}/s.zarr", "--no-progress"),
        "lime.cif of",
    ),
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny cube and a model trained on it (one epoch)."""
    base = tmp_path_factory.mktemp("bad-inputs")
    cube = make_synthetic_cube(base / "cube.zarr", n_structures=20)
    train_tiny_model(cube, base / "model", epochs=1)
    from afpx.cube import build_cube

    cod = sorted(str(p) for p in (DATA / "cod").glob("*.cif"))[:3]
    build_cube(cod, base / "real.zarr", chunk_sites=5, progress=False)  # records checksums
    (base / "lime.cif").write_text(lime_text())
    return base


def fill(args: tuple[str, ...], work: Path) -> list[str]:
    names = {
        "real": "real.zarr",
        "cube": "cube.zarr",
        "model": "model",
        "new": "new",
        "lime": "lime.cif",
    }
    return [a.format(**{k: str(work / v) for k, v in names.items()}) for a in args]


@pytest.mark.parametrize("name", sorted(VALUE_CASES))
def test_bad_value_is_one_line_and_writes_nothing(
    tmp_path: Path, workspace: Path, name: str
) -> None:
    work = tmp_path / "w"
    shutil.copytree(workspace, work)
    before = tree(work)
    case = VALUE_CASES[name]
    code, output = invoke(fill(case.args, work))
    assert code == 2, output
    (error,) = [x for x in output.splitlines() if x.startswith("Error:")]
    assert case.words in error, output
    assert tree(work) == before


# -- damaged model folders and cubes: exit 2 (info --verify: 1), naming the file -----------
def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def first_afp_chunk(work: Path) -> Path:
    return work / "real.zarr" / "afp" / "c" / "0" / "0" / "0"


LIKELIHOOD = ("likelihood", "{cube}", "--model", "{model}")
RESUME = ("train", "{cube}", "-o", "{model}", "--resume", "--epochs", "2", "--no-progress")
DAMAGE_CASES: dict[str, tuple[str, Callable[[Path], None], tuple[str, ...], int, str]] = {
    # name: (file damaged, how, command, exit code, words naming it)
    "model_truncated": ("model/model.pt", truncate, LIKELIHOOD, 2, "model.pt' differs"),
    "model_flipped": ("model/model.pt", flip, LIKELIHOOD, 2, "model.pt' differs"),
    "config_not_json": (
        "model/config.json",
        lambda p: p.write_text("{not json"),
        LIKELIHOOD,
        2,
        "config.json' differs",
    ),
    "manifest_missing": ("model/manifest.json", Path.unlink, LIKELIHOOD, 2, "has no manifest"),
    "state_flipped_resume": ("model/state.pt", flip, RESUME, 2, "state.pt' is corrupt"),
    "state_truncated_resume": ("model/state.pt", truncate, RESUME, 2, "state.pt' as afpx"),
    "evaluate_bad_model": (
        "model/model.pt",
        truncate,
        ("evaluate", "{cube}", "-o", "{new}", "--model", "{model}"),
        2,
        "model.pt' differs",
    ),
    "chunk_deleted_likelihood": (
        "",
        lambda w: first_afp_chunk(w).unlink(),
        ("likelihood", "{real}", "--model", "{model}"),
        2,
        "is missing",
    ),
    "chunk_deleted_info": (
        "",
        lambda w: first_afp_chunk(w).unlink(),
        ("info", "{real}"),
        2,
        "is missing",
    ),
    "chunk_truncated_train": (
        "",
        lambda w: truncate(first_afp_chunk(w)),
        ("train", "{real}", "-o", "{new}", "--no-progress"),
        2,
        "were written",
    ),
    "chunk_flipped_verify": (
        "",
        lambda w: flip(first_afp_chunk(w)),
        ("info", "--verify", "{real}"),
        1,
        "sha256 differs",
    ),
    "not_a_cube": ("", lambda w: None, ("info", "{model}"), 2, "is not a readable zarr"),
}


@pytest.mark.parametrize("name", sorted(DAMAGE_CASES))
def test_damaged_model_or_cube_is_one_line_and_changes_nothing(
    tmp_path: Path, workspace: Path, name: str
) -> None:
    where, damage, args, expected, words = DAMAGE_CASES[name]
    work = tmp_path / "w"
    shutil.copytree(workspace, work)
    damage(work / where)
    before = tree(work)
    code, output = invoke(fill(args, work))
    assert code == expected, output
    errors = [x for x in output.splitlines() if words in x]
    assert len(errors) == 1, output
    assert str(work) in errors[0] or "afp/c/" in errors[0]
    assert tree(work) == before  # no output folder, lock or partial array left
