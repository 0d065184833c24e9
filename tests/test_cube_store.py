"""Cube stores: no-replace publishing, stale partials, resume, append, checksums (issue 12)."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

import afpx.cube
import afpx.store
from afpx import AfpxError, schema
from afpx.cli import main
from afpx.cube import append_to_cube, build_cube, open_cube, verify_cube
from afpx.store import CHECKSUMS_GROUP, partials, recorded_chunks, rename_noreplace

COD = Path(__file__).parent / "data" / "cod"
FILES = sorted(str(p) for p in COD.glob("*.cif"))
FIRST, SECOND = FILES[:5], FILES[5:]
CHUNK = 5  # sites per chunk: the first cube ends in a partly filled chunk


def tree(root: Path) -> dict[str, bytes]:
    """Every file of a store by relative path, with its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def assert_same_store(a: Path, b: Path) -> None:
    ta, tb = tree(a), tree(b)
    assert sorted(ta) == sorted(tb)
    different = [name for name in ta if ta[name] != tb[name]]
    assert not different, different


@pytest.fixture(scope="module")
def one_shot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FIRST and SECOND built in one go."""
    out = tmp_path_factory.mktemp("oneshot") / "cube.zarr"
    return build_cube(FIRST + SECOND, out, chunk_sites=CHUNK, draws=2, progress=False)


def failing_after(monkeypatch: pytest.MonkeyPatch, n: int, exc: BaseException) -> dict[str, int]:
    """Make the n-th fingerprint block (and later ones) raise ``exc``; count the calls."""
    original = afpx.cube._compute_block
    calls = {"n": 0}

    def compute(block: Any, options: Any) -> Any:
        calls["n"] += 1
        if calls["n"] >= n:
            raise exc
        return original(block, options)

    monkeypatch.setattr(afpx.cube, "_compute_block", compute)
    return calls


# -- publishing ------------------------------------------------------------------------------
def test_rename_noreplace_never_replaces(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()  # empty: a plain rename would replace it
    with pytest.raises(FileExistsError):
        rename_noreplace(tmp_path / "a", tmp_path / "b")
    rename_noreplace(tmp_path / "a", tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "c"]


def test_target_that_appears_during_the_build_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "cube.zarr"
    original = afpx.store.finish

    def finish_and_race(partial: Path) -> None:
        original(partial)
        target.mkdir()  # another program (or build) creates the target meanwhile
        (target / "theirs.txt").write_text("theirs")

    monkeypatch.setattr(afpx.store, "finish", finish_and_race)
    with pytest.raises(AfpxError, match="appeared while the cube was built; the new cube is kept"):
        build_cube(FIRST, target, chunk_sites=CHUNK, progress=False)
    assert (target / "theirs.txt").read_text() == "theirs"
    (kept,) = partials(target)
    assert open_cube(kept).sizes[schema.STRUCTURE] > 0  # nothing done is lost


def test_stale_partial_is_reported_and_removed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    target = tmp_path / "cube.zarr"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    stale = tmp_path / ".cube.zarr.partial-deadbeef"
    stale.mkdir()
    (stale / "junk").write_text("x")
    owner = {"host": os.uname().nodename, "pid": int(dead.stdout), "key": "k", "template": True}
    (tmp_path / ".cube.zarr.partial-deadbeef.owner.json").write_text(json.dumps(owner))
    with caplog.at_level(logging.WARNING, logger="afpx.cube"):
        build_cube(FIRST, target, chunk_sites=CHUNK, progress=False)
    assert f"removing {stale}" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cube.zarr"]


def test_a_running_build_of_the_same_path_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "cube.zarr"
    running = tmp_path / ".cube.zarr.partial-0badc0de"
    running.mkdir()
    owner = {"host": os.uname().nodename, "pid": os.getppid(), "key": "k", "template": False}
    (tmp_path / ".cube.zarr.partial-0badc0de.owner.json").write_text(json.dumps(owner))
    with pytest.raises(AfpxError, match=r"another build of .* is running"):
        build_cube(FIRST, target, chunk_sites=CHUNK, progress=False)
    assert running.is_dir() and not target.exists()


def test_full_disk_is_one_line_and_keeps_the_chunks_for_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_shot: Path
) -> None:
    target = tmp_path / "cube.zarr"
    failing_after(monkeypatch, 4, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(AfpxError, match=r"No space left on device \(free some space; the chunks"):
        build_cube(FIRST + SECOND, target, chunk_sites=CHUNK, draws=2, progress=False)
    assert not target.exists() and len(partials(target)) == 1
    monkeypatch.undo()
    calls = failing_after(monkeypatch, 10**9, RuntimeError("unused"))
    build_cube(FIRST + SECOND, target, chunk_sites=CHUNK, draws=2, progress=False, resume=True)
    n_blocks = len(open_cube(target)[schema.AFP].chunks[0])
    assert 0 < calls["n"] < n_blocks  # the finished blocks were not computed again
    assert_same_store(target, one_shot)
    assert partials(target) == []


def test_unwritable_folder_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(afpx.store, "new_partial", refuse)
    with pytest.raises(AfpxError, match=r"Permission denied \(choose a writable folder\)$"):
        build_cube(FIRST, tmp_path / "cube.zarr", progress=False)
    monkeypatch.undo()
    # the folder refuses the store itself (after the owner file): nothing is left behind
    monkeypatch.setattr(afpx.store, "start_store", refuse)
    with pytest.raises(AfpxError, match=r"Permission denied \(choose a writable folder\)$"):
        build_cube(FIRST, tmp_path / "cube.zarr", progress=False)
    assert list(tmp_path.iterdir()) == []


# -- resume ----------------------------------------------------------------------------------
KILL_SCRIPT = """
import os, signal, sys
import afpx.cube
original = afpx.cube._compute_block
calls = [0]
sig = signal.SIGINT if os.environ.get("AFPX_TEST_SIGNAL") == "SIGINT" else signal.SIGKILL
def compute(block, options):
    calls[0] += 1
    if calls[0] == int(sys.argv[1]):
        os.kill(os.getpid(), sig)
    return original(block, options)
afpx.cube._compute_block = compute
chunk = int(sys.argv[2])
afpx.cube.build_cube(sys.argv[4:], sys.argv[3], chunk_sites=chunk, draws=2, progress=False)
"""


# SIGINT is not among them: raised inside a Dask compute thread it was sometimes
# swallowed and the build completed (exit 0) — an open problem, not a tested promise
@pytest.mark.parametrize(("kill_at", "sig"), [(1, "SIGKILL"), (4, "SIGKILL"), (8, "SIGKILL")])
def test_sigkill_then_resume_equals_one_shot(
    tmp_path: Path, one_shot: Path, kill_at: int, sig: str
) -> None:
    target = tmp_path / "cube.zarr"
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(afpx.__file__).parent.parent),
        "AFPX_TEST_SIGNAL": sig,
    }
    killed = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(kill_at), str(CHUNK), str(target), *FIRST, *SECOND],
        env=env,
        capture_output=True,
        check=False,
    )
    assert killed.returncode != 0, killed.stderr.decode()[-500:]
    assert not target.exists() and len(partials(target)) == 1
    build_cube(FIRST + SECOND, target, chunk_sites=CHUNK, draws=2, progress=False, resume=True)
    assert_same_store(target, one_shot)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cube.zarr"]


def test_resume_with_other_options_starts_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    target = tmp_path / "cube.zarr"
    failing_after(monkeypatch, 2, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(AfpxError, match="No space left"):
        build_cube(FIRST, target, chunk_sites=CHUNK, progress=False)
    assert len(partials(target)) == 1
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING, logger="afpx.cube"):
        build_cube(FIRST, target, chunk_sites=CHUNK, seed=5, progress=False, resume=True)
    assert "building from the start" in caplog.text
    assert open_cube(target).attrs["seed"] == 5 and partials(target) == []


# -- append ----------------------------------------------------------------------------------
def test_append_equals_one_shot_bit_for_bit(tmp_path: Path, one_shot: Path) -> None:
    cube = build_cube(FIRST, tmp_path / "cube.zarr", chunk_sites=CHUNK, draws=2, progress=False)
    before = open_cube(cube)
    n_old = before.sizes[schema.SITE]
    assert n_old % CHUNK  # the last chunk is partly filled, and gets rewritten
    old_split = before[schema.SPLIT].values.tolist()
    append_to_cube(SECOND, cube, progress=False)
    assert_same_store(cube, one_shot)
    after = open_cube(cube)
    assert after[schema.SPLIT].values.tolist()[: len(old_split)] == old_split
    np.testing.assert_array_equal(after[schema.AFP].values[:n_old], before[schema.AFP].values)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cube.zarr"]


def test_append_spills_its_read_or_reads_into_memory_alike(
    tmp_path: Path, one_shot: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import afpx.structures

    spilled = {"n": 0}
    original = afpx.structures.read_spilled

    def read_spilled(*args: Any, **kwargs: Any) -> Any:
        spilled["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(afpx.structures, "read_spilled", read_spilled)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    cube = build_cube(FIRST, tmp_path / "a" / "cube.zarr", chunk_sites=CHUNK, draws=2)
    append_to_cube(SECOND, cube, progress=False)
    # the append read the old sources and the new ones to disk, as a build does
    assert spilled["n"] == 2
    assert_same_store(cube, one_shot)
    assert sorted(p.name for p in cube.parent.iterdir()) == ["cube.zarr"]  # spill removed
    # workers that cannot see this disk: the rows are read into memory, same cube
    monkeypatch.setattr(afpx.cube, "workers_on_this_host", lambda client: False)
    cube = build_cube(FIRST, tmp_path / "b" / "cube.zarr", chunk_sites=CHUNK, draws=2)
    append_to_cube(SECOND, cube, progress=False)
    assert spilled["n"] == 2
    assert_same_store(cube, one_shot)


def test_append_refuses_when_a_source_changed(tmp_path: Path) -> None:
    sources = tmp_path / "sources"
    sources.mkdir()
    first = []
    for name in FIRST:
        copy = sources / Path(name).name
        copy.write_bytes(Path(name).read_bytes())
        first.append(str(copy))
    cube = build_cube(first, tmp_path / "cube.zarr", chunk_sites=CHUNK, progress=False)
    before = tree(cube)
    edited = Path(first[0])
    text = edited.read_text()
    assert "_cell_length_a    4.76060" in text
    edited.write_text(text.replace("_cell_length_a    4.76060", "_cell_length_a    4.80060"))
    with pytest.raises(AfpxError, match=r"no longer matches its sources \(`dmin` differs"):
        append_to_cube(SECOND, cube, progress=False)
    assert tree(cube) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cube.zarr", "sources"]
    # fewer structures than the cube holds, once two sources are no CIFs any more
    for name in first[:2]:
        Path(name).write_text("not a CIF\n")
    with pytest.raises(AfpxError, match=r"its sources \(`atom_frac_coords` differs"):
        append_to_cube(SECOND[:1], cube, progress=False)
    assert tree(cube) == before


def test_failed_append_leaves_the_cube_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cube = build_cube(FIRST, tmp_path / "cube.zarr", chunk_sites=CHUNK, draws=2, progress=False)
    before = tree(cube)
    failing_after(monkeypatch, 2, RuntimeError("disk on fire"))
    with pytest.raises(RuntimeError, match="disk on fire"):
        append_to_cube(SECOND, cube, progress=False)
    assert tree(cube) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cube.zarr"]
    verify_cube(cube)  # the hard-linked chunks were not touched


def test_append_refusals(tmp_path: Path) -> None:
    cube = build_cube(FIRST, tmp_path / "cube.zarr", chunk_sites=CHUNK, progress=False)
    with pytest.raises(AfpxError, match="is already a source of the cube"):
        append_to_cube(FIRST[:1], cube, progress=False)
    garbage = Path(__file__).parent / "data" / "bad" / "garbage.cif"
    with pytest.raises(AfpxError, match="no new structure accepted"):
        append_to_cube([str(garbage)], cube, progress=False)
    with pytest.raises(AfpxError, match="no cube at"):
        append_to_cube(SECOND, tmp_path / "none.zarr", progress=False)


def test_cli_append_and_resume(tmp_path: Path, one_shot: Path) -> None:
    out = tmp_path / "cube.zarr"
    runner = CliRunner()
    first = ["build-cube", *FIRST, "-o", str(out), "--chunk-sites", str(CHUNK), "--draws", "2"]
    assert runner.invoke(main, [*first, "--no-progress"]).exit_code == 0
    wrong = runner.invoke(main, ["build-cube", "--append", *SECOND, "-o", str(out), "--draws", "2"])
    assert wrong.exit_code == 2 and "--append keeps the cube's own options; drop --draws" in (
        wrong.output
    )
    appended = runner.invoke(main, ["build-cube", "--append", *SECOND, "-o", str(out)])
    assert appended.exit_code == 0, appended.output
    assert_same_store(out, one_shot)


# -- checking what was written ----------------------------------------------------------------
def test_deleted_or_truncated_chunk_is_refused_on_open(tmp_path: Path, one_shot: Path) -> None:
    cube = tmp_path / "cube.zarr"
    build_cube(FIRST, cube, chunk_sites=CHUNK, progress=False)
    chunk = cube / "afp" / "c" / "1" / "0" / "0"
    data = chunk.read_bytes()
    chunk.unlink()
    with pytest.raises(AfpxError, match="is damaged: chunk afp/c/1/0/0 is missing"):
        open_cube(cube)
    chunk.write_bytes(data[:-5])
    with pytest.raises(AfpxError, match=f"has {len(data) - 5} bytes, {len(data)} were written"):
        open_cube(cube)
    # an all-zero chunk (draw 0 everywhere) is written too, so its loss is seen
    (cube / "draw" / "c" / "0").unlink()
    chunk.write_bytes(data)
    with pytest.raises(AfpxError, match="chunk draw/c/0 is missing"):
        open_cube(cube)


def test_info_verify_finds_a_flipped_bit(tmp_path: Path) -> None:
    cube = tmp_path / "cube.zarr"
    build_cube(FIRST, cube, chunk_sites=CHUNK, progress=False)
    runner = CliRunner()
    good = runner.invoke(main, ["info", "--verify", str(cube)])
    assert good.exit_code == 0, good.output
    n_files = len(list(recorded_chunks(cube)))
    assert f"verified: {n_files} chunk files match their sha256" in good.output
    chunk = cube / "r0" / "c" / "0"
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 1
    chunk.write_bytes(bytes(data))
    open_cube(cube)  # same size: the cheap check on open cannot see it
    bad = runner.invoke(main, ["info", "--verify", str(cube)])
    assert bad.exit_code == 1
    assert "damaged: r0/c/0: sha256 differs" in bad.output
    assert f"1 of {n_files} chunk files of {cube} are damaged" in bad.output


def test_verify_needs_recorded_checksums(tmp_path: Path) -> None:
    cube = tmp_path / "cube.zarr"
    build_cube(FIRST, cube, chunk_sites=CHUNK, progress=False)
    import shutil

    shutil.rmtree(cube / CHECKSUMS_GROUP)
    open_cube(cube)  # a cube from before checksums opens as it did
    with pytest.raises(AfpxError, match="records no checksums"):
        verify_cube(cube)
    with pytest.raises(AfpxError, match="no afpx cube at"):
        verify_cube(tmp_path / "none.zarr")


def test_info_reports_a_partial_build_next_to_the_cube(tmp_path: Path) -> None:
    cube = build_cube(FIRST, tmp_path / "cube.zarr", chunk_sites=CHUNK, progress=False)
    (tmp_path / ".cube.zarr.partial-12345678").mkdir()
    info = CliRunner().invoke(main, ["info", str(cube)])
    assert info.exit_code == 0
    assert "partial build next to it (stale):" in info.output


def test_build_key_hashes_text_a_slice_at_a_time_as_all_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import hashlib

    import xarray as xr

    text = np.array([f"id-{i}" for i in range(10)], dtype=np.dtypes.StringDType())
    ds = xr.Dataset({"s": ("x", text), "o": ("x", text.astype(object))})
    key = afpx.store.build_key(ds)
    for size in (1, 3, 10, 11):
        monkeypatch.setattr(afpx.store, "_KEY_SLICE", size)
        assert afpx.store.build_key(ds) == key
    # the values joined by NULs, variable by variable
    h = hashlib.sha256(b"{}")
    for name, var in sorted(ds.variables.items()):
        h.update(f"\0{name}\0{var.dims}\0{var.shape}\0{var.dtype}\0".encode())
        h.update("\0".join(text.tolist()).encode())
    assert key == h.hexdigest()


def test_checksums_are_written_as_gathered_in_text_order(tmp_path: Path) -> None:
    # names with "-" and "." sort before "/": the record must still be in text order of
    # the files; marks are taken as they are; the record is data (JSON lines in a zarr
    # array read a chunk at a time), not attributes that zarr parses on every open
    import hashlib

    import zarr

    partial = tmp_path / "store"
    contents = {
        "a/c/0": b"x",
        "a/c/10": b"yy",
        "a/c/2": b"zzz",
        "a-b/c/0/0": b"1",
        "a.x/c/1": b"22",
        "ab/c/0": b"",
        "a/zarr.json": b"{}",  # metadata: not recorded
        "a/c/3.0123456789abcdef0123456789abcdef.partial": b"half",  # zarr's temporary: removed
    }
    for rel, data in contents.items():
        (partial / rel).parent.mkdir(parents=True, exist_ok=True)
        (partial / rel).write_bytes(data)
    marks = partial / ".afpx-chunks" / "a"
    marks.mkdir(parents=True)
    (marks / "10").write_text(json.dumps({"file": "a/c/10", "size": 2, "sha256": "recorded"}))
    afpx.store.finish(partial)
    chunks = sorted(rel for rel in contents if "/c/" in rel and not rel.endswith(".partial"))
    assert chunks == ["a-b/c/0/0", "a.x/c/1", "a/c/0", "a/c/10", "a/c/2", "ab/c/0"]
    expected = [
        (rel, len(contents[rel]), hashlib.sha256(contents[rel]).hexdigest()) for rel in chunks
    ]
    expected[chunks.index("a/c/10")] = ("a/c/10", 2, "recorded")
    assert list(recorded_chunks(partial)) == expected
    assert list(recorded_chunks(partial, under="a")) == [r for r in expected if r[0][:2] == "a/"]
    group = zarr.open_group(partial / CHECKSUMS_GROUP, mode="r")
    assert dict(group.attrs) == {"algorithm": "sha256", "format": "json-lines"}
    text = b"".join(json.dumps(list(r)).encode() + b"\n" for r in expected)
    assert np.asarray(group["records"][:]).tobytes() == text
    assert not (partial / "a" / "c" / "3.0123456789abcdef0123456789abcdef.partial").exists()
    assert sorted(p.name for p in partial.iterdir()) == ["a", "a-b", "a.x", "ab", CHECKSUMS_GROUP]


def test_a_record_longer_than_a_chunk_is_read_across_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(afpx.store, "RECORD_CHUNK", 7)  # every line spans chunks
    partial = tmp_path / "store"
    (partial / "v" / "c").mkdir(parents=True)
    for i in range(12):
        (partial / "v" / "c" / str(i)).write_bytes(b"x" * i)
    afpx.store.finish(partial)
    got = [(rel, size) for rel, size, _ in recorded_chunks(partial)]
    assert got == sorted((f"v/c/{i}", i) for i in range(12))
    afpx.store.check_chunks(partial)
    assert afpx.store.verify_chunks(partial) == (12, [])


def test_a_damaged_record_is_named(tmp_path: Path) -> None:
    import zarr

    partial = tmp_path / "store"
    (partial / "v" / "c").mkdir(parents=True)
    (partial / "v" / "c" / "0").write_bytes(b"x")
    afpx.store.finish(partial)
    records = zarr.open_array(partial / CHECKSUMS_GROUP / "records", mode="r+")
    text = np.asarray(records[:]).tobytes()
    records[-1] = ord(" ")  # the final newline lost
    with pytest.raises(AfpxError, match="damaged: its record ends in an unfinished line"):
        afpx.store.check_chunks(partial)
    records[:] = np.frombuffer(text.replace(b"[", b"{"), np.uint8)
    with pytest.raises(AfpxError, match="damaged: unreadable record line"):
        afpx.store.verify_chunks(partial)


def test_a_cube_with_its_record_in_attributes_still_opens_and_verifies(tmp_path: Path) -> None:
    # cubes of earlier versions held the record in the group's attributes
    import shutil

    cube = build_cube(FIRST, tmp_path / "cube.zarr", chunk_sites=CHUNK, progress=False)
    records = list(recorded_chunks(cube))
    group = cube / CHECKSUMS_GROUP
    shutil.rmtree(group)
    group.mkdir()
    files = {rel: [size, digest] for rel, size, digest in records}
    meta = {"attributes": {"algorithm": "sha256", "files": files}, "node_type": "group"}
    (group / "zarr.json").write_text(json.dumps({**meta, "zarr_format": 3}, sort_keys=True))
    assert list(recorded_chunks(cube)) == records
    open_cube(cube)
    assert verify_cube(cube) == (len(records), [])
    chunk = cube / records[0][0]
    chunk.write_bytes(chunk.read_bytes()[:-1])
    with pytest.raises(AfpxError, match="is damaged: chunk"):
        open_cube(cube)
