"""afpx.screen: every element set of one size, ranked into one resumable store."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from _rank_helpers import GE, LI, MN, cube_with_likelihood, library_from_sites, random_library
from click.testing import CliRunner

import afpx.screen
from afpx import AfpxError, AfpxWarning
from afpx.cli import main
from afpx.rank import rank_table
from afpx.scheduler import use_scheduler
from afpx.screen import element_sets, open_screen, screen, screen_frame
from afpx.templates import TemplateLibrary

ELEMENTS = ["Li", "Mn", "Ge", "O", "Sr", "Zr"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def library() -> TemplateLibrary:
    """Random templates whose sites carry only the screened elements (all trained)."""
    lib = random_library(np.random.default_rng(7), 16, max_sites=4, multiplicities=(1, 2, 3))
    rng = np.random.default_rng(8)
    z = rng.choice(np.asarray([3, 25, 32, 8, 38, 40], dtype=np.int16), lib.z.size)
    return dataclasses.replace(lib, z=z)


def store_files(path: Path) -> dict[str, bytes]:
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return {os.fspath(p.relative_to(path)): p.read_bytes() for p in files}


def test_element_sets_are_combinations_in_the_given_order() -> None:
    assert element_sets(["Li", "Mn", "Ge", "O"], 3) == [
        ("Li", "Mn", "Ge"),
        ("Li", "Mn", "O"),
        ("Li", "Ge", "O"),
        ("Mn", "Ge", "O"),
    ]
    assert len(element_sets([f"E{i}" for i in range(20)], 3)) == 1140


@pytest.mark.parametrize(("size", "top"), [(2, 50), (3, 4)])
def test_each_set_equals_rank_table(
    library: TemplateLibrary, tmp_path: Path, size: int, top: int
) -> None:
    ds = screen(
        ELEMENTS, size, tmp_path / "s.zarr", library=library, top=top, known=True, batch_size=4
    ).load()
    sets = element_sets(ELEMENTS, size)
    assert list(ds["element_set"].values) == ["-".join(s) for s in sets]
    assert ds["done"].values.all()
    short = 0
    for i, symbols in enumerate(sets):
        table = rank_table(list(symbols), library=library, top=top, known=True)
        m = len(table)
        short += m < top
        assert int(ds["n_rows"][i]) == m
        assert int(ds["n_compositions"][i]) == table.attrs["n_compositions"]
        assert int(ds["n_candidates"][i]) == table.attrs["n_candidates"]
        row = ds.isel(element_set=i)
        for name, (_, values) in table.variables.items():
            if name == "assignment":
                continue
            got = row[name].values[:m]
            if values.dtype == object:
                assert got.astype(object).tolist() == values.tolist(), name
            else:
                np.testing.assert_array_equal(got, values, err_msg=name)
        # rows past n_rows hold fill values
        assert np.isnan(row["score"].values[m:]).all()
        assert (row["template"].values[m:] == -1).all()
        assert [str(f) for f in row["formula"].values[m:]] == [""] * (top - m)
        zs = [int(z) for z in row["elements"].values]
        assert zs == table.elements
    if size == 2:
        assert short > 0  # some binaries have fewer than 50 compositions: the fill is tested


def test_frame_has_one_row_per_filled_row(library: TemplateLibrary, tmp_path: Path) -> None:
    ds = screen(ELEMENTS[:4], 2, tmp_path / "s.zarr", library=library, top=3, batch_size=2)
    frame = screen_frame(ds)
    assert len(frame) == int(ds["n_rows"].sum())
    first = rank_table(["Li", "Mn"], library=library, top=3).to_frame()
    li_mn = frame[frame["element_set"] == "Li-Mn"]
    assert li_mn["formula"].tolist() == first["formula"].tolist()
    assert li_mn["row"].tolist() == [1, 2, 3]
    assert "known" not in frame


def test_resume_after_a_failure_equals_one_shot_byte_for_byte(
    library: TemplateLibrary, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    one_shot = tmp_path / "one.zarr"
    screen(ELEMENTS, 3, one_shot, library=library, top=6, batch_size=3)

    calls: list[tuple[tuple[str, ...], ...]] = []
    failed: list[bool] = []
    rank_sets = afpx.screen._rank_sets

    def failing(lib: TemplateLibrary, sets: list[tuple[str, ...]], options: object) -> object:
        calls.append(tuple(sets))
        if len(calls) == 4 and not failed:
            failed.append(True)
            raise RuntimeError("killed")
        return rank_sets(lib, sets, options)  # type: ignore[arg-type]

    resumed = tmp_path / "resumed.zarr"
    monkeypatch.setattr(afpx.screen, "_rank_sets", failing)
    with use_scheduler("synchronous"), pytest.raises(RuntimeError, match="killed"):
        screen(ELEMENTS, 3, resumed, library=library, top=6, batch_size=3)
    assert zarr.open_array(resumed / "done")[:].sum() == 9  # three batches of three
    # a chunk write cut short by a kill leaves zarr's temporary file behind
    (resumed / "score" / "c" / "3").mkdir(parents=True, exist_ok=True)
    (resumed / "score" / "c" / "3" / "0.0123abcd.partial").write_bytes(b"cut")
    calls.clear()
    with use_scheduler("threads", workers=2):
        screen(ELEMENTS, 3, resumed, library=library, top=6, batch_size=3, resume=True)
    assert len(calls) == 7 - 3  # 20 sets in 7 batches; the 3 finished are not ranked again
    assert store_files(resumed) == store_files(one_shot)
    # resuming a finished screen ranks nothing
    calls.clear()
    screen(ELEMENTS, 3, resumed, library=library, top=6, batch_size=3, resume=True)
    assert calls == []


def test_resume_of_a_missing_store_starts_it(library: TemplateLibrary, tmp_path: Path) -> None:
    ds = screen(ELEMENTS[:3], 2, tmp_path / "s.zarr", library=library, top=2, resume=True)
    assert ds["done"].values.all()


def test_resume_with_other_options_is_refused_naming_them(
    library: TemplateLibrary, tmp_path: Path
) -> None:
    out = tmp_path / "s.zarr"
    screen(ELEMENTS[:4], 2, out, library=library, top=3, batch_size=2)
    before = store_files(out)
    with pytest.raises(AfpxError, match=r"other options \(known: stored False, asked True; top"):
        screen(ELEMENTS[:4], 2, out, library=library, top=5, known=True, batch_size=2, resume=True)
    with pytest.raises(AfpxError, match="elements: stored"):
        screen(ELEMENTS[:5], 2, out, library=library, top=3, batch_size=2, resume=True)
    assert store_files(out) == before


def test_existing_output_needs_resume_or_overwrite(
    library: TemplateLibrary, tmp_path: Path
) -> None:
    out = tmp_path / "s.zarr"
    screen(ELEMENTS[:3], 2, out, library=library, top=2)
    with pytest.raises(AfpxError, match=r"exists: pass --resume .* or --overwrite"):
        screen(ELEMENTS[:3], 2, out, library=library, top=2)
    with pytest.raises(AfpxError, match="exclude each other"):
        screen(ELEMENTS[:3], 2, out, library=library, top=2, overwrite=True, resume=True)
    ds = screen(ELEMENTS[:4], 2, out, library=library, top=2, overwrite=True)
    assert ds.sizes["element_set"] == 6


def test_overwrite_refuses_a_folder_that_is_not_a_screen(
    library: TemplateLibrary, tmp_path: Path
) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("data")
    with pytest.raises(AfpxError, match="not an afpx screen store; choose another output"):
        screen(ELEMENTS[:3], 2, out, library=library, overwrite=True)
    assert (out / "keep.txt").read_text() == "data"
    with pytest.raises(AfpxError, match="is not an afpx screen store"):
        open_screen(out)


@pytest.mark.parametrize(
    ("elements", "size", "kwargs", "match"),
    [
        ("Li,Mn,Xx", 2, {}, "unknown element symbol 'Xx'"),
        ("Li,Mn,Li", 2, {}, "Li is repeated"),
        ("Li,Mn,Ge", 1, {}, "set size must be at least 2"),
        ("Li,Mn,Ge", 4, {}, "sets of 4 elements cannot be drawn from the 3"),
        ("Li,Mn,Ge", 2, {"top": 0}, "top must be at least 1"),
        ("Li,Mn,Ge", 2, {"batch_size": 0}, "batch size must be at least 1"),
        ("Li,Mn,Ge", 3, {"max_sites": 2}, "at least 3 unique sites; the most .* is 2"),
    ],
)
def test_bad_options_raise_before_writing(
    library: TemplateLibrary,
    tmp_path: Path,
    elements: str,
    size: int,
    kwargs: dict[str, int],
    match: str,
) -> None:
    with pytest.raises(AfpxError, match=match):
        screen(elements, size, tmp_path / "s.zarr", library=library, **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "s.zarr").exists()


def test_a_failing_set_is_named(tmp_path: Path) -> None:
    # one template MnGe: Mn-Ge's only candidate is the template's own formula
    lib = library_from_sites([[(1, MN, {}), (1, GE, {}), (1, LI, {})]], formulas=["LiMnGe"])
    with pytest.raises(AfpxError, match="element set Li-Mn-Ge: no candidate uses every element"):
        screen("Li,Mn,Ge", 3, tmp_path / "s.zarr", library=lib, exclude_own_formula=True)


def test_untrained_elements_warn_once_per_screen(tmp_path: Path) -> None:
    lib = library_from_sites([[(1, MN, {}), (2, GE, {}), (3, LI, {})]] * 2)
    with pytest.warns(AfpxWarning, match="^O, Sr: on no site") as record:
        screen("Li,Mn,Ge,O,Sr", 2, tmp_path / "s.zarr", library=lib, top=2)
    assert len([w for w in record if issubclass(w.category, AfpxWarning)]) == 1


def test_two_process_cluster_equals_threads(library: TemplateLibrary, tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed")
    with use_scheduler("threads", workers=2):
        screen(ELEMENTS, 3, tmp_path / "threads.zarr", library=library, top=5, batch_size=4)
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=False
        ) as cluster,
        distributed.Client(cluster) as client,
        use_scheduler() as current,  # the active client is used
    ):
        assert current is client and len(client.scheduler_info()["workers"]) == 2
        out = tmp_path / "cluster.zarr"
        screen(ELEMENTS, 3, out, library=library, top=5, batch_size=4, progress=True)
    assert store_files(tmp_path / "cluster.zarr") == store_files(tmp_path / "threads.zarr")


def test_cli_screen_lists_the_best_sets_and_refuses_a_rerun(tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    args = ["screen", "-e", "Li,Mn,Ge", "-k", "2", "-o", str(out), "--top", "3", "--show", "2"]
    result = CliRunner().invoke(main, [*args, "--no-progress"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["element", "set", "best", "formula", "score", "template"]
    assert len(lines) == 4 and lines[-1] == f"# 3 element sets ranked into {out}"
    ds = open_screen(out)
    best = ds["score"].isel(row=0).values
    top_set = str(ds["element_set"].values[int(np.argmax(best))])
    assert lines[1].split()[0] == top_set
    again = CliRunner().invoke(main, [*args, "--no-progress"])
    assert again.exit_code == 2 and "exists: pass --resume" in again.output


def _done(path: Path) -> int:
    try:
        return int(zarr.open_array(path / "done", mode="r")[:].sum())
    except Exception:  # not created yet, or a chunk being written
        return 0


def test_sigkill_then_resume_equals_one_shot(tmp_path: Path) -> None:
    """A screen killed with SIGKILL continues with --resume to the uninterrupted store."""
    elements = "Li,Mn,Ge,O,Si,Fe"
    out = tmp_path / "killed.zarr"
    cmd = [sys.executable, "-m", "afpx", "screen", "-e", elements, "-k", "2", "-o", str(out)]
    cmd += ["--top", "5", "--batch-size", "1", "--scheduler", "synchronous", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.fspath(ROOT)}
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while _done(out) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_done = _done(out)
    assert 3 <= n_done < 15, "the screen was not killed part-way"
    resumed = subprocess.run([*cmd, "--resume"], env=env, cwd=tmp_path, capture_output=True)
    assert resumed.returncode == 0, resumed.stderr
    one_shot = tmp_path / "one.zarr"
    screen(elements, 2, one_shot, top=5, batch_size=1)
    assert store_files(out) == store_files(one_shot)


def test_a_cube_library_is_loaded_by_the_tasks(tmp_path: Path) -> None:
    cube = cube_with_likelihood(tmp_path / "cube.zarr", n_structures=30)
    with use_scheduler("threads", workers=2):
        ds = screen("Li,O,Na,Mn", 2, tmp_path / "s.zarr", cube=cube, top=4, batch_size=2).load()
    assert ds.attrs["afpx_screen"]["cube"] == os.path.abspath(cube)
    for i, symbols in enumerate(element_sets(["Li", "O", "Na", "Mn"], 2)):
        table = rank_table(list(symbols), cube=cube, top=4)
        m = len(table)
        assert (
            ds["formula"].values[i, :m].astype(object).tolist()
            == table.columns()["formula"].tolist()
        )
        np.testing.assert_array_equal(ds["score"].values[i, :m], table.columns()["score"])


def test_a_store_cut_short_while_created_is_not_left(
    library: TemplateLibrary, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    create = afpx.screen._create_store

    def cut(path: Path, *args: object) -> None:
        create(path, *args)  # type: ignore[arg-type]
        raise KeyboardInterrupt

    monkeypatch.setattr(afpx.screen, "_create_store", cut)
    with pytest.raises(KeyboardInterrupt):
        screen(ELEMENTS[:3], 2, tmp_path / "s.zarr", library=library)
    assert list(tmp_path.iterdir()) == []
