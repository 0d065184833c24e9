from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import afpx
from afpx.cli import main, require_torch


def test_version() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert afpx.__version__ in result.output


def test_import_afpx_does_not_import_torch() -> None:
    code = "import sys, afpx, afpx.schema, afpx.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- dependencies by job: torch only for train, likelihood, evaluate --model ------


@pytest.mark.parametrize(
    ("args", "what"),
    [
        (["train", "{cube}", "-o", "{out}"], "afpx train"),
        (["likelihood", "{cube}", "--model", "{cube}"], "afpx likelihood"),
        (["evaluate", "{cube}", "--model", "{cube}", "-o", "{out}"], "afpx evaluate --model"),
    ],
)
def test_commands_that_need_torch_name_the_install_without_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], what: str
) -> None:
    # ``import torch`` raises ImportError when its sys.modules entry is None
    monkeypatch.setitem(sys.modules, "torch", None)
    cube = tmp_path / "cube.zarr"
    cube.mkdir()
    out = tmp_path / "out"
    argv = [a.format(cube=cube, out=out) for a in args]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"Error: {what} needs torch")
    assert "pip install 'afpx[train]'" in lines[0]
    assert "Traceback" not in result.output
    assert not out.exists()  # nothing written


def test_plot_without_matplotlib_names_the_plot_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = CliRunner().invoke(main, ["plot", "afp", str(tmp_path / "afp.png")])
    assert result.exit_code == 2
    assert result.output.strip() == (
        "Error: afpx plot needs matplotlib, which is not installed: pip install 'afpx[plot]'"
    )
    assert not (tmp_path / "afp.png").exists()


def test_require_torch_passes_when_torch_is_there() -> None:
    pytest.importorskip("torch")
    require_torch("afpx train")  # no error


def test_rank_inspect_build_cube_and_cif_export_run_without_torch(
    tmp_path: Path, data_dir: Path
) -> None:
    # a fresh interpreter in which ``import torch`` fails: the core jobs must not need it
    cif = data_dir / "cod" / "1000017.cif"
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from afpx.cli import main\n"
        "import click.testing as t\n"
        "r = t.CliRunner()\n"
        f"cmds = [['inspect', {str(cif)!r}],\n"
        f"        ['build-cube', {str(cif)!r}, '-o', {str(tmp_path / 'c.zarr')!r}],\n"
        "        ['rank', '--elements', 'Li,Mn,Ge', '--top', '2', '--export-cif',\n"
        f"         {str(tmp_path / 'cif')!r}]]\n"
        "for c in cmds:\n"
        "    res = r.invoke(main, c)\n"
        "    assert res.exit_code == 0, (c, res.output, res.exception)\n"
        "print('torch' in sys.modules and sys.modules['torch'] is not None)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"
    assert len(list((tmp_path / "cif").glob("*.cif"))) == 2
    assert (tmp_path / "c.zarr").is_dir()


# -- afpx inspect --report ----------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_inspect_report_has_one_row_per_structure(
    tmp_path: Path, data_dir: Path, suffix: str
) -> None:
    import pandas as pd

    report = tmp_path / f"rejections{suffix}"
    result = CliRunner().invoke(
        main, ["inspect", str(data_dir / "bad"), "--summary", "--report", str(report)]
    )
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(report) if suffix == ".csv" else pd.read_json(report, orient="records")
    assert list(frame.columns) == [
        "id",
        "source",
        "block",
        "accepted",
        "reason",
        "message",
        "formula",
        "spacegroup",
        "n_unique_sites",
    ]
    # every file of the folder is one row; the printed counts agree with the table
    assert len(frame) == len(list((data_dir / "bad").glob("*.cif")))
    accepted = frame[frame["accepted"]]
    rejected = frame[~frame["accepted"]]
    assert f"accepted: {len(accepted)}" in result.output
    assert f"rejected: {len(rejected)}" in result.output
    assert (rejected["reason"].astype(str).str.len() > 0).all()
    assert (rejected["message"].astype(str).str.len() > 0).all()
    row = frame.set_index("id").loc["deuterium"]
    assert row["reason"] == "unknown_species"
    assert "'D'" in row["message"]
    spinel = frame.set_index("id").loc["spinel_origin2"]
    assert spinel["formula"] == "MgAl2O4"
    assert spinel["spacegroup"] == 227


def test_inspect_report_bad_suffix_or_folder_fails_before_reading(
    tmp_path: Path, data_dir: Path
) -> None:
    for path, words in [
        (tmp_path / "r.txt", "use a .csv or .json"),
        (tmp_path / "missing" / "r.csv", "does not exist"),
    ]:
        result = CliRunner().invoke(main, ["inspect", str(data_dir / "cod"), "--report", str(path)])
        assert result.exit_code == 2
        assert words in result.output
        assert "accepted" not in result.output  # nothing was read
        assert not path.exists()


def test_write_report_rejects_unknown_suffix(tmp_path: Path) -> None:
    from afpx.commands.ingest import write_report
    from afpx.structures import FilterParams, ReadResult

    empty = ReadResult(structures=[], rejections=[], n_read=0, params=FilterParams())
    with pytest.raises(afpx.AfpxError, match=r"\.csv or \.json"):
        write_report(empty, tmp_path / "r.parquet")
    assert write_report(empty, tmp_path / "r.csv").read_text().startswith("id,source")


# -- geometry travels with the cube: afpx rank --cube --export-cif ------------------


def _with_likelihoods(cube: Path) -> None:
    import numpy as np
    import xarray as xr
    import zarr

    from afpx import schema
    from afpx.cube import COMPLETE_ATTR

    z = np.asarray(xr.open_zarr(cube, consolidated=False)[schema.Z].values).astype(int)
    lk = np.full((z.size, schema.N_ELEMENTS), 0.1, dtype=np.float32)
    lk[np.arange(z.size), z - 1] = 0.9  # each site likes its own element
    xr.Dataset({schema.LIKELIHOOD: ((schema.SITE, schema.ELEMENT), lk)}).to_zarr(
        cube, mode="a", zarr_format=3, consolidated=False
    )
    zarr.open_group(cube, mode="r+").attrs.update({COMPLETE_ATTR: True})


def test_rank_exports_cifs_from_a_built_cube(tmp_path: Path, data_dir: Path) -> None:
    from pymatgen.core import Structure

    from afpx.cube import open_cube, structure_geometry
    from afpx.structures import read_structures

    cifs = [data_dir / "cod" / name for name in ("1000044.cif", "1011211.cif", "1000017.cif")]
    cube = tmp_path / "cube.zarr"
    runner = CliRunner()
    result = runner.invoke(main, ["build-cube", *map(str, cifs), "-o", str(cube)])
    assert result.exit_code == 0, result.output
    # the cube stores every structure's cell and atoms as read
    geometry = structure_geometry(open_cube(cube))
    assert geometry is not None
    read = read_structures(cifs).structures
    assert geometry["atom_start"][-1] == sum(s.n_atoms for s in read)
    for t, s in enumerate(read):
        a, b = geometry["atom_start"][t : t + 2]
        np.testing.assert_allclose(geometry["lattice"][t], s.lattice)
        np.testing.assert_allclose(geometry["frac_coords"][a:b], s.frac_coords)
        np.testing.assert_array_equal(geometry["numbers"][a:b], s.numbers)

    _with_likelihoods(cube)
    out = tmp_path / "cifs"
    result = runner.invoke(
        main, ["rank", "--elements", "Ca,O", "--cube", str(cube), "--export-cif", str(out)]
    )
    assert result.exit_code == 0, result.output
    files = sorted(out.glob("*.cif"))
    assert files
    # the best CaO candidate is rock salt itself: its own template, its own elements
    first = Structure.from_file(files[0])
    assert first.composition.reduced_formula == "CaO"
    assert "cod-1000044" in files[0].name


def test_rank_export_from_a_cube_without_geometry_fails_before_writing(tmp_path: Path) -> None:
    from _cube_helpers import make_synthetic_cube

    cube = make_synthetic_cube(tmp_path / "old.zarr", n_structures=8)
    _with_likelihoods(cube)
    out = tmp_path / "cifs"
    result = CliRunner().invoke(
        main, ["rank", "--elements", "Na,O", "--cube", str(cube), "--export-cif", str(out)]
    )
    assert result.exit_code == 2
    assert "stores no template geometry" in result.output
    assert "afpx build-cube" in result.output
    assert not out.exists()  # no empty output folder


def test_build_cube_shares_one_malloc_arena(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import afpx.scheduler

    calls: list[bool] = []
    monkeypatch.setattr(afpx.scheduler, "one_malloc_arena", lambda: calls.append(True) or True)
    cif = str(data_dir / "cod" / "1000044.cif")
    result = CliRunner().invoke(main, ["build-cube", cif, "-o", str(tmp_path / "c.zarr")])
    assert result.exit_code == 0, result.output
    assert calls == [True]  # before the build: its threads are not started yet


def test_structure_geometry_rejects_inconsistent_counts(tmp_path: Path, data_dir: Path) -> None:
    from afpx import schema
    from afpx.cube import open_cube, structure_geometry

    cube = tmp_path / "cube.zarr"
    result = CliRunner().invoke(
        main, ["build-cube", str(data_dir / "cod" / "1000044.cif"), "-o", str(cube)]
    )
    assert result.exit_code == 0, result.output
    ds = open_cube(cube).load()
    assert structure_geometry(ds.drop_vars(schema.ATOM_Z)) is None  # an older cube
    broken = ds.assign({schema.N_ATOMS: ds[schema.N_ATOMS] + 1})
    with pytest.raises(afpx.AfpxError, match="cube geometry is inconsistent"):
        structure_geometry(broken)
