"""Evaluation reports and screens at URLs (a local S3 server, moto's), and outputs that
cannot be written: refused before any work, naming the path."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from _cube_helpers import make_cube_with_likelihoods
from _rank_helpers import random_library
from _s3_helpers import s3_bucket
from click.testing import CliRunner

import afpx.evaluate
import afpx.screen
from afpx import AfpxError, plots, store
from afpx.cli import main
from afpx.screen import CREATING_ATTR, open_screen, screen
from afpx.templates import TemplateLibrary

FAST = ["--baselines", "constant,random", "--no-progress", "--scheduler", "synchronous"]


@pytest.fixture(scope="module")
def bucket() -> Iterator[str]:
    with s3_bucket() as url:
        yield url


@pytest.fixture(scope="module")
def cube(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cube_with_likelihoods(tmp_path_factory.mktemp("remote") / "cube.zarr")


def _never_evaluate(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the evaluation ran although its report cannot be written")

    monkeypatch.setattr(afpx.evaluate, "evaluate", fail)


def test_report_at_a_url_equals_the_local_one(bucket: str, cube: Path, tmp_path: Path) -> None:
    local = tmp_path / "report"
    assert CliRunner().invoke(main, ["evaluate", str(cube), "-o", str(local), *FAST]).exit_code == 0
    # the cube read from the bucket too
    fs, root = store.filesystem(bucket)
    fs.put(str(cube), f"{root}/cube.zarr", recursive=True)
    url = f"{bucket}/reports/one"
    result = CliRunner().invoke(main, ["evaluate", f"{bucket}/cube.zarr", "-o", url, *FAST])
    assert result.exit_code == 0, result.output
    assert f"wrote {url}/metrics.json and {url}/arrays.zarr" in result.output
    assert not Path("s3:").exists()  # the URL was not taken for a local folder
    ours, theirs = plots.read_evaluation_metrics(local), plots.read_evaluation_metrics(url)
    for metrics in (ours, theirs):
        metrics.pop("runtime", None)
        metrics.get("cube", {}).pop("path", None)
    assert json.dumps(ours, sort_keys=True) == json.dumps(theirs, sort_keys=True)
    xr.testing.assert_identical(
        plots.read_evaluation_arrays(local, "confusion"),
        plots.read_evaluation_arrays(url, "confusion"),
    )
    # the figures read a report at a URL as they read a folder
    pytest.importorskip("matplotlib")
    figure = tmp_path / "confusion.png"
    drawn = CliRunner().invoke(main, ["plot", "confusion", url, str(figure)])
    assert drawn.exit_code == 0, drawn.output
    assert figure.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("where", ["file", "under_a_file"])
def test_unwritable_report_folder_fails_before_the_evaluation(
    where: str, cube: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a_file = tmp_path / "taken"
    a_file.write_text("not a folder\n")
    out = a_file if where == "file" else a_file / "report"
    _never_evaluate(monkeypatch)
    result = CliRunner().invoke(main, ["evaluate", str(cube), "-o", str(out), *FAST])
    assert result.exit_code == 2, result.output
    assert f"the report folder {out}" in result.output
    assert "Traceback" not in result.output
    assert a_file.read_text() == "not a folder\n"


def test_report_to_a_missing_bucket_fails_before_the_evaluation(
    bucket: str, cube: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _never_evaluate(monkeypatch)
    url = "s3://afpx-no-such-bucket-7f3a/report"
    result = CliRunner().invoke(main, ["evaluate", str(cube), "-o", url, *FAST])
    assert result.exit_code == 2, result.output
    assert f"cannot write the report folder to {url}" in result.output
    assert "bucket" in result.output


def test_check_writable_folder_creates_nothing_and_leaves_no_probe(
    bucket: str, tmp_path: Path
) -> None:
    out = tmp_path / "a" / "b"
    assert store.check_writable_folder(out) == str(out)
    assert list(tmp_path.iterdir()) == []
    url = f"{bucket}/empty-report"
    assert store.check_writable_folder(url) == url
    fs, root = store.filesystem(url)
    assert not fs.exists(root) or fs.ls(root, detail=False) == []


def test_reading_a_report_that_is_not_there_names_it(bucket: str, tmp_path: Path) -> None:
    with pytest.raises(AfpxError, match=r"metrics\.json not found"):
        plots.read_evaluation_metrics(f"{bucket}/nothing-here")
    with pytest.raises(AfpxError, match=r"arrays\.zarr not found"):
        plots.read_evaluation_arrays(f"{bucket}/nothing-here", "confusion")
    result = CliRunner().invoke(main, ["plot", "confusion", str(tmp_path / "no"), "x.png"])
    assert result.exit_code == 2 and "not found" in result.output


# -- screens -------------------------------------------------------------------------------
SPACE = ["Li", "Mn", "Ge", "O"]


@pytest.fixture(scope="module")
def library() -> TemplateLibrary:
    """Random templates whose sites carry only the screened elements."""
    lib = random_library(np.random.default_rng(7), 12, max_sites=4, multiplicities=(1, 2, 3))
    z = np.random.default_rng(8).choice(np.asarray([3, 25, 32, 8], dtype=np.int16), lib.z.size)
    return dataclasses.replace(lib, z=z)


def test_screen_at_a_url_equals_the_local_one(
    bucket: str, library: TemplateLibrary, tmp_path: Path
) -> None:
    local = screen(SPACE, 2, tmp_path / "s.zarr", library=library, top=4, batch_size=2)
    url = f"{bucket}/screens/s.zarr"
    remote = screen(SPACE, 2, url, library=library, top=4, batch_size=2)
    xr.testing.assert_identical(local.load(), remote.load())
    assert not Path("s3:").exists()
    with pytest.raises(AfpxError, match="pass --resume to continue"):
        screen(SPACE, 2, url, library=library, top=4, batch_size=2)
    again = screen(SPACE, 2, url, library=library, top=4, batch_size=2, overwrite=True)
    xr.testing.assert_identical(local.load(), again.load())


def test_a_url_screen_cut_short_while_created_is_started_again(
    bucket: str, library: TemplateLibrary, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # an object store has no rename: the half store stays, marked as being created
    create = afpx.screen._create_store

    def cut(path: str, *args: object) -> None:
        create(path, *args)  # type: ignore[arg-type]
        raise KeyboardInterrupt

    url = f"{bucket}/screens/cut.zarr"
    monkeypatch.setattr(afpx.screen, "_create_store", cut)
    with pytest.raises(KeyboardInterrupt):
        screen(SPACE, 2, url, library=library, top=4, batch_size=2)
    monkeypatch.undo()
    # the cut came after the arrays, before the options: mark it so by hand
    group = store.open_group(url, mode="r+")
    attrs = dict(group.attrs)
    attrs.pop(afpx.screen.OPTIONS_ATTR)
    group.attrs.put({**attrs, CREATING_ATTR: True})
    with pytest.raises(AfpxError, match="creation was cut short"):
        screen(SPACE, 2, url, library=library, top=4, batch_size=2)
    with pytest.raises(AfpxError, match="not an afpx screen store"):
        open_screen(url)
    resumed = screen(SPACE, 2, url, library=library, top=4, batch_size=2, resume=True)
    one_shot = screen(SPACE, 2, tmp_path / "one.zarr", library=library, top=4, batch_size=2)
    xr.testing.assert_identical(one_shot.load(), resumed.load())


def test_screen_output_in_a_missing_folder_is_refused(tmp_path: Path) -> None:
    a_file = tmp_path / "taken"
    a_file.write_text("x\n")
    result = CliRunner().invoke(
        main, ["screen", "-e", "Li,Mn,Ge", "-k", "2", "-o", str(a_file / "s.zarr")]
    )
    assert result.exit_code == 2, result.output
    assert f"the folder {a_file} of {a_file / 's.zarr'} does not exist" in result.output
    assert "Traceback" not in result.output


# -- operating-system errors in any command ------------------------------------------------
@pytest.mark.parametrize(
    ("error", "line"),
    [
        (
            PermissionError(13, "Permission denied", "/data/cube.zarr"),
            "Permission denied: /data/cube.zarr",
        ),
        (OSError(28, "No space left on device"), "No space left on device"),
        (
            OSError(18, "Invalid cross-device link", "/a", None, "/b"),
            "Invalid cross-device link: /a -> /b",
        ),
    ],
)
def test_an_os_error_is_one_line_naming_the_file(error: OSError, line: str) -> None:
    from afpx.cli import AfpxUsageError, library_errors

    def command() -> None:
        raise error

    with pytest.raises(AfpxUsageError) as caught:
        library_errors(command)()
    assert caught.value.format_message() == line


def test_training_from_a_cube_at_a_url_equals_training_from_the_folder(
    bucket: str, cube: Path, tmp_path: Path
) -> None:
    torch = pytest.importorskip("torch")
    from _model_helpers import train_tiny_model

    from afpx.checkpoint import load_weights

    fs, root = store.filesystem(bucket)
    fs.put(str(cube), f"{root}/train/cube.zarr", recursive=True)
    local = train_tiny_model(cube, tmp_path / "local", epochs=1)
    remote = train_tiny_model(f"{bucket}/train/cube.zarr", tmp_path / "remote", epochs=1)
    ours, theirs = load_weights(local / "model.pt"), load_weights(remote / "model.pt")
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    recorded = json.loads((remote / "config.json").read_text())["cube"]["path"]
    assert recorded == f"{bucket}/train/cube.zarr"  # not a local path made of the URL
    missing = CliRunner().invoke(
        main, ["train", f"{bucket}/no-cube.zarr", "-o", str(tmp_path / "m")]
    )
    assert missing.exit_code == 2
    assert f"cube '{bucket}/no-cube.zarr' does not exist" in missing.output


# -- cubes at URLs read by rank, screen and train: the URL is kept as it is ---------------------
def test_rank_and_screen_read_a_cube_at_a_url(bucket: str, tmp_path: Path) -> None:
    from _rank_helpers import cube_with_likelihood

    local = cube_with_likelihood(tmp_path / "cube.zarr", n_structures=40)
    fs, root = store.filesystem(bucket)
    fs.put(str(local), f"{root}/rank/cube.zarr", recursive=True)
    url = f"{bucket}/rank/cube.zarr"
    args = ["rank", "-e", "Mn,Ge", "--format", "csv", "--top", "0", "--cube"]
    ours = CliRunner().invoke(main, [*args, str(local)])
    theirs = CliRunner().invoke(main, [*args, url])
    assert ours.exit_code == 0 and theirs.exit_code == 0, theirs.output
    assert ours.output == theirs.output
    missing = CliRunner().invoke(main, [*args, f"{bucket}/rank/none.zarr"])
    assert missing.exit_code == 2
    assert f"no cube at {bucket}/rank/none.zarr: build one" in missing.output
    done = screen(["Li", "Mn", "Ge"], 2, tmp_path / "s.zarr", cube=url, top=3)
    assert done.attrs[afpx.screen.OPTIONS_ATTR]["cube"] == url
    assert int(done["n_rows"].sum()) > 0
