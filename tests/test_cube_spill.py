"""build-cube with the structures read spilled to disk (issue 14: memory flat in the corpus)."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr

import afpx.cube
import afpx.store
import afpx.structures
from afpx import schema
from afpx.cube import build_cube, fingerprint_dataset, open_cube, write_cube
from afpx.scheduler import workers_on_this_host
from afpx.structures import (
    SpilledTable,
    load_spilled,
    load_spilled_column,
    read_spilled,
    read_table,
)

COD = Path(__file__).parent / "data" / "cod"
FILES = sorted(str(p) for p in COD.glob("*.cif"))


@pytest.fixture
def small_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three files per reading task: several parts, and blocks that span two of them."""
    monkeypatch.setattr(afpx.structures, "_FILES_PER_TASK", 3)


def digests(root: Path) -> dict[str, str]:
    """sha256 of every file of a store, by relative path."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


@pytest.mark.parametrize(
    "options",
    [
        {"draws": 2, "chunk_sites": 5},
        {"chunk_sites": 7, "deterministic": True},
        {"chunk_sites": 256, "seed": 3},
    ],
)
@pytest.mark.usefixtures("small_parts")
def test_spilled_build_equals_the_in_memory_cube_byte_for_byte(
    tmp_path: Path, options: dict[str, Any]
) -> None:
    spilled = build_cube(FILES, tmp_path / "spilled.zarr", progress=False, **options)
    ds = fingerprint_dataset(read_table(FILES), sources=FILES, **options)
    in_memory = write_cube(ds, tmp_path / "memory.zarr", progress=False)
    a, b = digests(Path(spilled)), digests(Path(in_memory))
    assert sorted(a) == sorted(b)
    assert [name for name in a if a[name] != b[name]] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory.zarr", "spilled.zarr"]


@pytest.mark.usefixtures("small_parts")
def test_waves_smaller_than_the_blocks_write_the_same_cube(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = {"draws": 2, "chunk_sites": 5}
    whole = build_cube(FILES, tmp_path / "whole.zarr", progress=False, **options)
    n_chunks = len(open_cube(whole)[schema.AFP].chunks[0])
    assert n_chunks > 6
    written: list[int] = []
    original = afpx.cube.scheduler_compute

    def compute(wave: Any, **kwargs: Any) -> Any:
        keys = wave.__dask_graph__()
        written.append(sum(isinstance(k, tuple) and k[0].startswith("afpx-write") for k in keys))
        return original(wave, **kwargs)

    trims = {"n": 0}

    def trim() -> bool:
        trims["n"] += 1
        return True

    monkeypatch.setattr(afpx.cube, "CHUNKS_PER_WAVE", 3)
    monkeypatch.setattr(afpx.cube, "scheduler_compute", compute)
    monkeypatch.setattr(afpx.cube, "trim_memory", trim)
    monkeypatch.setattr(afpx.cube, "task_slots", lambda client: 1)
    waved = build_cube(FILES, tmp_path / "waved.zarr", progress=False, **options)
    assert digests(Path(waved)) == digests(Path(whole))
    # after reading, before every wave and after the last
    assert trims["n"] == len(written) + 2
    # the sites' chunks four at a time (four per task slot: more than 3), then the atoms'
    # and the lattices' chunk (one each)
    assert written == [4] * (n_chunks // 4) + [n_chunks % 4] * bool(n_chunks % 4) + [1, 1]
    written.clear()
    monkeypatch.setattr(afpx.cube, "CHUNKS_PER_WAVE", 5)
    again = build_cube(FILES, tmp_path / "again.zarr", progress=False, **options)
    assert digests(Path(again)) == digests(Path(whole))
    assert written == [5] * (n_chunks // 5) + [n_chunks % 5] * bool(n_chunks % 5) + [1, 1]


def test_the_waves_run_under_a_fixed_mmap_threshold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[Any] = []
    original = afpx.cube.scheduler_compute

    def compute(wave: Any, **kwargs: Any) -> Any:
        events.append("wave")
        return original(wave, **kwargs)

    monkeypatch.setattr(afpx.cube, "scheduler_compute", compute)
    monkeypatch.setattr(afpx.cube, "set_mmap_threshold", lambda n: events.append(n) or True)
    build_cube(FILES[:3], tmp_path / "a.zarr", progress=False)
    assert events[0] == afpx.cube.WAVE_MMAP_THRESHOLD == 2**20  # before the first wave
    assert events[1:] and set(events[1:]) == {"wave"}
    events.clear()
    monkeypatch.setattr(afpx.cube, "WAVE_MMAP_THRESHOLD", None)  # glibc's own
    build_cube(FILES[:3], tmp_path / "b.zarr", progress=False)
    assert events and set(events) == {"wave"}


def test_the_build_holds_no_per_structure_variable_while_it_computes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the counts and the rejections are in the store before the first wave, the labels
    # are lazy (read back from the spill a chunk at a time); write_cube leaves the
    # caller's dataset be
    held: list[list[str]] = []
    lazy: list[list[str]] = []
    original = afpx.store.chunk_waves

    def waves(ds: xr.Dataset, *args: Any) -> Any:
        held.append(sorted(str(n) for n in ds.variables))
        lazy.append(afpx.store.lazy_names(ds))
        return original(ds, *args)

    monkeypatch.setattr(afpx.store, "chunk_waves", waves)
    built = build_cube(FILES, tmp_path / "cube.zarr", chunk_sites=16, progress=False)
    cube = open_cube(built)
    per_site = [name for name, var in cube.variables.items() if schema.SITE in var.dims]
    geometry = [schema.LATTICE, schema.ATOM_FRAC_COORDS, schema.ATOM_Z]
    labels = [
        schema.STRUCTURE_ID,
        schema.FORMULA,
        schema.SOURCE,
        schema.SPACEGROUP,
        schema.DMIN,
        schema.SPLIT,
    ]
    assert held == lazy == [sorted(per_site + geometry + labels)]
    assert set(cube.variables) - set(held[0]) >= {schema.N_ATOMS, schema.N_UNIQUE_SITES}
    ds = fingerprint_dataset(read_table(FILES), sources=FILES, chunk_sites=16)
    names = set(ds.variables)
    write_cube(ds, tmp_path / "other.zarr", progress=False)
    assert set(ds.variables) == names


def test_a_resumable_build_is_keyed_by_the_structures_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the labels are not in memory to hash: the key takes the digest of the parts
    keys: list[str] = []
    real = afpx.store.build_key

    def build_key(ds: xr.Dataset, *, extra: str = "") -> str:
        keys.append(extra)
        return real(ds, extra=extra)

    monkeypatch.setattr(afpx.store, "build_key", build_key)
    build_cube(FILES, tmp_path / "a.zarr", progress=False)
    (tmp_path / "spill").mkdir()
    assert keys == [read_spilled(FILES, tmp_path / "spill").table.digest]
    assert real(open_cube(tmp_path / "a.zarr"), extra="x") != real(open_cube(tmp_path / "a.zarr"))


def test_a_build_stopped_between_waves_resumes_to_the_same_cube(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = {"draws": 2, "chunk_sites": 5}
    whole = build_cube(FILES, tmp_path / "whole.zarr", progress=False, **options)
    target = tmp_path / "cube.zarr"
    original = afpx.cube.scheduler_compute
    waves = {"n": 0}

    def compute(wave: Any, **kwargs: Any) -> Any:
        waves["n"] += 1
        if waves["n"] == 3:
            raise KeyboardInterrupt
        return original(wave, **kwargs)

    monkeypatch.setattr(afpx.cube, "CHUNKS_PER_WAVE", 3)
    monkeypatch.setattr(afpx.cube, "task_slots", lambda client: 0)
    monkeypatch.setattr(afpx.cube, "scheduler_compute", compute)
    with pytest.raises(KeyboardInterrupt):
        build_cube(FILES, target, progress=False, **options)
    (partial,) = afpx.store.partials(target)
    assert len(afpx.store.done_chunks(partial)) == 2 * 3 * 10  # two waves of ten per-site variables
    assert [p.name for p in tmp_path.glob(".cube.zarr.spill-*")] == []
    monkeypatch.setattr(afpx.cube, "scheduler_compute", original)
    build_cube(FILES, target, progress=False, resume=True, **options)
    assert digests(target) == digests(Path(whole))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cube.zarr", "whole.zarr"]


@pytest.mark.parametrize(
    ("shape", "dtype"), [((60_000, 3), "float64"), ((40_000, 3, 3), "float64"), ((9,), "int16")]
)
def test_lazy_geometry_gets_the_chunks_zarr_gives_an_array_in_memory(
    tmp_path: Path, shape: tuple[int, ...], dtype: str
) -> None:
    # the spilled build writes lattices and atoms from Dask, with these chunks
    import zarr

    xr.Dataset({"x": (tuple(f"d{i}" for i in range(len(shape))), np.zeros(shape, dtype))}).to_zarr(
        tmp_path / "s.zarr", zarr_format=3, consolidated=False
    )
    written = zarr.open_array(tmp_path / "s.zarr" / "x", mode="r").chunks
    assert afpx.cube._zarr_chunks(shape, np.dtype(dtype)) == written


@pytest.mark.usefixtures("small_parts")
def test_read_spilled_equals_read_table(tmp_path: Path) -> None:
    table = read_table(FILES)
    (tmp_path / "spill").mkdir()
    spilled = read_spilled(FILES, tmp_path / "spill")
    assert isinstance(spilled.table, SpilledTable)
    assert spilled.rejections == table.rejections and spilled.n_read == table.n_read
    assert spilled.summary() == table.summary()
    n = len(table.table)
    assert len(spilled.table) == n and len(spilled.table.part_start) > 2  # several parts
    back = load_spilled(spilled.table.pieces(0, n))
    for name in ("lattice", "frac_coords", "numbers", "site_index", "site_z", "multiplicity"):
        np.testing.assert_array_equal(getattr(back, name), getattr(table.table, name))
    assert back.wyckoff.tolist() == table.table.wyckoff.tolist()
    for name in ("atom_start", "site_start"):
        np.testing.assert_array_equal(getattr(spilled.table, name), getattr(table.table, name))
    # the labels are on disk only
    pieces = spilled.table.pieces(0, n)
    for name in ("spacegroup", "dmin", "hydrogen_missing"):
        np.testing.assert_array_equal(
            load_spilled_column(pieces, name), getattr(table.table, name), err_msg=name
        )
    for name in ("structure_id", "source", "formula"):
        assert load_spilled_column(pieces, name).tolist() == getattr(table.table, name).tolist()
    assert spilled.table.sources == tuple(dict.fromkeys(table.table.source.tolist()))
    assert spilled.table.n_hydrogen_missing == int(table.table.hydrogen_missing.sum())
    # the digest is the parts' content: the same read, the same digest; fewer files, another
    (tmp_path / "again").mkdir()
    assert read_spilled(FILES, tmp_path / "again").table.digest == spilled.table.digest
    (tmp_path / "fewer").mkdir()
    assert read_spilled(FILES[1:], tmp_path / "fewer").table.digest != spilled.table.digest
    # any range of structures, across parts
    middle = load_spilled(spilled.table.pieces(1, n - 1))
    np.testing.assert_array_equal(middle.lattice, table.table.lattice[1 : n - 1])
    np.testing.assert_array_equal(
        middle.site_start, table.table.site_start[1:n] - table.table.site_start[1]
    )


@pytest.mark.usefixtures("small_parts")
def test_a_lazy_variable_computed_on_its_own_equals_the_cube(tmp_path: Path) -> None:
    # the writes take every chunk from its block's result; the variables' own tasks are
    # made only when one is computed alone
    (tmp_path / "spill").mkdir()
    ds = fingerprint_dataset(read_spilled(FILES, tmp_path / "spill"), chunk_sites=7, draws=2)
    cube = open_cube(build_cube(FILES, tmp_path / "c.zarr", chunk_sites=7, draws=2, progress=False))
    for name in (schema.AFP, schema.R0, schema.Z, schema.DRAW, schema.STRUCTURE_INDEX):
        np.testing.assert_array_equal(ds[name].values, cube[name].values)
    assert ds[schema.WYCKOFF].values.tolist() == cube[schema.WYCKOFF].values.tolist()
    afp = ds[schema.AFP].data
    layer = afp.dask.layers[afp.name]
    assert len(layer) == len(afp.chunks[0]) > 2
    assert list(layer) == [(afp.name, b, 0, 0) for b in range(len(layer))]
    for key in [(afp.name, len(layer), 0, 0), (afp.name, 0, 1, 0), (afp.name, 0), "x"]:
        with pytest.raises(KeyError):
            layer[key]


@pytest.mark.usefixtures("small_parts")
def test_the_blocks_tasks_are_made_when_asked_for(tmp_path: Path) -> None:
    # the graph keeps a few integers per block, not a task object with its file names
    (tmp_path / "spill").mkdir()
    read = read_spilled(FILES, tmp_path / "spill")
    table = read.table
    assert isinstance(table, SpilledTable)
    ds = fingerprint_dataset(read, chunk_sites=7, draws=2)
    afp = ds[schema.AFP].data
    (source,) = afp.dask.dependencies[afp.name]
    layer = afp.dask.layers[source]
    assert not isinstance(layer.mapping, dict)
    assert list(layer) == [(source, b) for b in range(len(afp.chunks[0]))]
    starts = np.concatenate([[0], np.cumsum(afp.chunks[0])])
    spans_parts = False
    for b, key in enumerate(layer):
        _, block = layer[key]
        assert block.stop - block.start == afp.chunks[0][b]
        # its rows from its first structure's first row, and that structure's parts
        assert block.start == starts[b] - 2 * table.site_start[block.first]
        last = np.searchsorted(table.site_start, (starts[b + 1] - 1) // 2, side="right") - 1
        assert block.pieces == table.pieces(block.first, int(last) + 1)
        spans_parts |= len(block.pieces) > 1
    assert spans_parts
    for key in [(source, len(layer)), (source, -1), (source, 0, 0), (afp.name, 0), "x"]:
        with pytest.raises(KeyError):
            layer[key]


def test_duplicates_dropped_from_a_spilled_part(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # row 2 of the database repeats row 1: the reading task wrote both, the part keeps one
    from test_structures_sources import make_ase_db

    db = str(make_ase_db(tmp_path / "small.db"))
    monkeypatch.setattr(afpx.structures, "_ROWS_PER_TASK", 3)
    spilled = build_cube([db], tmp_path / "spilled.zarr", chunk_sites=3, progress=False)
    ds = fingerprint_dataset(read_table([db]), sources=[db], chunk_sites=3)
    in_memory = write_cube(ds, tmp_path / "memory.zarr", progress=False)
    assert "duplicate" in open_cube(spilled)[schema.REJECT_REASON].values.tolist()
    a, b = digests(Path(spilled)), digests(Path(in_memory))
    assert a == b


def test_the_spill_is_there_during_the_build_and_gone_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "cube.zarr"
    original = afpx.cube._compute_block
    seen: list[list[str]] = []

    def compute(block: Any, options: Any) -> Any:
        seen.append(sorted(p.name for p in tmp_path.glob(".cube.zarr.spill-*/part-*.npz")))
        return original(block, options)

    monkeypatch.setattr(afpx.cube, "_compute_block", compute)
    build_cube(FILES, target, chunk_sites=16, progress=False)
    assert seen and all(names and names[0] == "part-000000.npz" for names in seen)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cube.zarr"]


def test_a_failed_build_removes_its_spill(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(block: Any, options: Any) -> Any:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(afpx.cube, "_compute_block", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        build_cube(FILES, tmp_path / "cube.zarr", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_spill_left_by_a_killed_build_is_removed(tmp_path: Path) -> None:
    import json

    left = tmp_path / ".cube.zarr.spill-0123abcd"
    left.mkdir()
    (left / "part-000000.npz").write_bytes(b"old")
    owner = {"host": socket.gethostname(), "pid": 2**22 + 1}  # no such process
    (tmp_path / ".cube.zarr.spill-0123abcd.owner.json").write_text(json.dumps(owner))
    running = tmp_path / ".cube.zarr.spill-4567cdef"  # another machine's build: kept
    running.mkdir()
    other = {"host": "elsewhere", "pid": 1}
    (tmp_path / ".cube.zarr.spill-4567cdef.owner.json").write_text(json.dumps(other))
    build_cube(FILES[:3], tmp_path / "cube.zarr", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".cube.zarr.spill-4567cdef",
        ".cube.zarr.spill-4567cdef.owner.json",
        "cube.zarr",
    ]
    assert open_cube(tmp_path / "cube.zarr").sizes[schema.STRUCTURE] > 0


class _Client:
    def __init__(self, hosts: list[str]) -> None:
        self.hosts = hosts

    def run(self, function: Any) -> dict[str, str]:
        assert function is socket.gethostname
        return {f"tcp://w{i}:1": host for i, host in enumerate(self.hosts)}


def test_spill_only_where_every_worker_sees_this_disk() -> None:
    here = socket.gethostname()
    assert workers_on_this_host(None)
    assert workers_on_this_host(_Client([here, here]))
    assert not workers_on_this_host(_Client([here, "elsewhere"]))
    assert not workers_on_this_host(_Client([]))


def test_pending_chunks_adds_up_the_waves(tmp_path: Path) -> None:
    ds = fingerprint_dataset(read_table(FILES), sources=FILES, chunk_sites=5)
    for done in [set(), {(name, 0) for name in afpx.store.lazy_names(ds)}]:
        waves = list(afpx.store.chunk_waves(ds, tmp_path, done, 4))
        assert sum(n for _, n in waves) == afpx.store.pending_chunks(ds, done)
        assert all(0 < n <= 4 for _, n in waves)
    n_site_chunks = len(ds[schema.AFP].chunks[0])
    assert afpx.store.pending_chunks(ds, set()) == n_site_chunks  # all in memory but these
