from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
    assert lines[0].startswith(f"Error: {what} needs PyTorch")
    assert "pip install 'afpx[train]'" in lines[0]
    assert "Traceback" not in result.output
    assert not out.exists()  # nothing written


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
