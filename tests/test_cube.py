"""The AFP cube: physics invariants, lazy = eager, seeds, schedulers, storage, CLI, splits."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner
from invariants import (
    assert_equivalent_sites_agree,
    assert_first_peak_near_one,
    assert_scale_invariant,
    assert_supercell_invariant,
    assert_translation_invariant,
    atom_fingerprints,
    coordination,
    perovskite,
    rock_salt,
    triclinic,
    wurtzite,
)
from pymatgen.core import Structure

import afpx
import afpx.cube
from afpx import AfpxError, schema
from afpx._array import cupy_available
from afpx.cli import main
from afpx.cube import (
    build_cube,
    compute_fingerprints,
    cube_summary,
    fingerprint_dataset,
    fingerprint_structures,
    open_cube,
    select_sites,
    site_mask,
    write_cube,
)
from afpx.kernels import FingerprintParams
from afpx.splits import SplitParams, assign_splits
from afpx.structures import (
    AnalysedStructure,
    FilterParams,
    ReadResult,
    Rejection,
    SiteTable,
    StructureTable,
    TableRead,
    read_structures,
    unique_sites,
)

COD = Path(__file__).parent / "data" / "cod"


def analysed(structure: Structure, structure_id: str) -> AnalysedStructure:
    return AnalysedStructure(
        structure_id=structure_id,
        source="memory",
        formula=structure.composition.reduced_formula,
        lattice=np.asarray(structure.lattice.matrix),
        frac_coords=np.asarray(structure.frac_coords),
        numbers=np.asarray([s.specie.Z for s in structure], dtype=np.int16),
        sites=unique_sites(structure),
    )


@pytest.fixture(scope="module")
def read() -> ReadResult:
    structures = [
        analysed(rock_salt(5.64), "nacl"),
        analysed(rock_salt(6.15, "La", "As"), "laas"),
        analysed(perovskite(), "srtio3"),
        analysed(wurtzite(), "zno"),
        analysed(triclinic(seed=1, n=4), "p1"),
    ]
    rejections = [Rejection("bad-1", "x.cif", "blk", "r_factor", "R = 0.2 >= 0.1")]
    return ReadResult(structures, rejections, 6, FilterParams())


def n_sites(read: ReadResult, draws: int = 1) -> int:
    return draws * sum(len(s.sites) for s in read.structures)


# -- physics invariants --------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda: rock_salt(5.64), perovskite, wurtzite, triclinic])
def test_translation_invariance(make: Any) -> None:
    assert_translation_invariant(make())


@pytest.mark.parametrize(
    ("make", "scaling"),
    [(lambda: rock_salt(5.64), (2, 1, 1)), (wurtzite, (1, 2, 2)), (triclinic, (1, 1, 2))],
)
def test_supercell_invariance(make: Any, scaling: tuple[int, int, int]) -> None:
    assert_supercell_invariant(make(), scaling=scaling)


def test_scale_invariance_nacl_laas() -> None:
    """The paper's Figure 2: rock-salt NaCl and LaAs have the same normalised AFPs."""
    assert_scale_invariant(rock_salt(5.64), rock_salt(6.15, "La", "As"))
    fp = fingerprint_structures([rock_salt(5.64), rock_salt(6.15, "La", "As")], deterministic=True)
    np.testing.assert_allclose(fp[schema.AFP][:2], fp[schema.AFP][2:], atol=1e-4)
    np.testing.assert_allclose(fp[schema.R0], [2.82, 2.82, 3.075, 3.075], rtol=1e-6)


def test_symmetry_equivalent_sites_agree() -> None:
    # centring translations of rock salt: identical perspectives
    assert_equivalent_sites_agree(rock_salt(5.64))
    # the 3-fold axis relating the O of SrTiO3 maps the tetrahedron onto itself
    assert_equivalent_sites_agree(perovskite(), up_to_perspective_order=True)


def test_first_peak_near_one() -> None:
    cases = [(rock_salt(5.64), range(8)), (perovskite(), [0, 1]), (wurtzite(), range(4))]
    for s, atoms in cases:
        afp = atom_fingerprints(s, list(atoms))
        assert_first_peak_near_one(afp, what=s.composition.reduced_formula)
    # also with rotation and jitter
    fp = fingerprint_structures([wurtzite(), rock_salt(4.0)], draws=3, seed=5)
    assert_first_peak_near_one(fp[schema.AFP], what="augmented")


def test_descriptors(read: ReadResult) -> None:
    fp = compute_fingerprints(read.structures, deterministic=True)
    # rock salt: 6 neighbours; SrTiO3: Sr 12 O at 1.41 r0 is outside 1.2 r0, Ti 6, O 2
    expected = {(11, "nacl"): 6, (22, "srtio3"): 6, (8, "srtio3"): 2}
    ids = [s.structure_id for s in read.structures]
    for (z, sid), n in expected.items():
        rows = (fp[schema.Z] == z) & (fp[schema.STRUCTURE_INDEX] == ids.index(sid))
        assert fp[schema.COORDINATION][rows].tolist() == [n]
    for s in (wurtzite(), triclinic(seed=1, n=4)):
        atoms = unique_sites(s).index
        got = fingerprint_structures([s], deterministic=True)[schema.COORDINATION]
        np.testing.assert_array_equal(got, coordination(s, atoms))
    # dmin_ratio: shortest distance of the structure over r0; 1 on the site that has it
    per_structure = np.maximum.reduceat(
        fp[schema.DMIN_RATIO], np.r_[0, np.cumsum([len(s.sites) for s in read.structures])[:-1]]
    )
    np.testing.assert_allclose(per_structure, 1.0, rtol=1e-6)
    assert np.all(fp[schema.DMIN_RATIO] <= 1.0 + 1e-6)


# -- lazy = eager, chunking, seeds ---------------------------------------------------------------
def test_lazy_dataset_equals_eager(read: ReadResult) -> None:
    ds = fingerprint_dataset(read, draws=2, seed=3, chunk_sites=5)
    assert ds[schema.AFP].chunks[0] == (5,) * (n_sites(read, 2) // 5) + (
        (n_sites(read, 2) % 5,) if n_sites(read, 2) % 5 else ()
    )
    eager = compute_fingerprints(read.structures, draws=2, seed=3)
    for name in (
        schema.AFP,
        schema.R0,
        schema.DMIN_RATIO,
        schema.COORDINATION,
        schema.Z,
        schema.DRAW,
        schema.STRUCTURE_INDEX,
    ):
        np.testing.assert_array_equal(ds[name].values, eager[name], err_msg=name)
    # the layout: all draws of a unique site consecutive
    assert ds[schema.DRAW].values[:4].tolist() == [0, 1, 0, 1]


@pytest.mark.parametrize("chunk_sites", [1, 4, 1000])
def test_chunking_does_not_change_the_cube(read: ReadResult, chunk_sites: int) -> None:
    ref = fingerprint_dataset(read, draws=2, seed=11, chunk_sites=7)[schema.AFP].values
    got = fingerprint_dataset(read, draws=2, seed=11, chunk_sites=chunk_sites)[schema.AFP].values
    np.testing.assert_array_equal(got, ref)


def test_rows_handed_to_the_kernel_a_few_at_a_time_give_the_same_cube(
    read: ReadResult, monkeypatch: pytest.MonkeyPatch
) -> None:
    import afpx.cube

    calls: list[int] = []
    real = afpx.cube.afp_kernel

    def counting(vectors: Any, counts: Any, r0: Any, **kwargs: Any) -> Any:
        calls.append(len(counts))
        return real(vectors, counts, r0, **kwargs)

    monkeypatch.setattr(afpx.cube, "afp_kernel", counting)
    whole = fingerprint_dataset(read, draws=2, seed=3, chunk_sites=1000).compute()
    assert len(calls) == 1
    calls.clear()
    monkeypatch.setattr(afpx.cube, "MAX_PENDING_PAIRS", 50)  # about a row at a time
    few = fingerprint_dataset(read, draws=2, seed=3, chunk_sites=1000).compute()
    assert len(calls) > 4 and sum(calls) == whole.sizes[schema.SITE]
    for name in (schema.AFP, schema.R0, schema.DMIN_RATIO, schema.COORDINATION):
        np.testing.assert_array_equal(few[name].values, whole[name].values, err_msg=name)


def test_blocks_of_many_structures_equal_one_structure_at_a_time(read: ReadResult) -> None:
    # blocks hold views with offsets into the whole table; one structure alone has none
    alone = [compute_fingerprints([s], deterministic=True) for s in read.structures]
    for chunk_sites in (3, 8):
        ds = fingerprint_dataset(read, deterministic=True, chunk_sites=chunk_sites)
        for name in (schema.AFP, schema.R0, schema.DMIN_RATIO, schema.COORDINATION):
            expected = np.concatenate([fp[name] for fp in alone])
            np.testing.assert_array_equal(ds[name].values, expected, err_msg=name)


def test_a_structure_without_unique_sites_has_no_rows(read: ReadResult) -> None:
    a, b = read.structures[0], read.structures[2]
    nothing = SiteTable(
        np.zeros(0, np.int32),
        np.zeros(0, np.int16),
        np.zeros(0, np.int32),
        np.zeros(0, str),
        1,
        1.0,
    )
    between = dataclasses.replace(a, structure_id="none", sites=nothing)
    without = compute_fingerprints([a, b], deterministic=True)
    with_it = compute_fingerprints([a, between, b], deterministic=True)
    np.testing.assert_array_equal(with_it[schema.AFP], without[schema.AFP])
    assert set(with_it[schema.STRUCTURE_INDEX].tolist()) == {0, 2}
    # blocks that end, or begin, next to it
    three = ReadResult([a, between, b], [], 3, FilterParams())
    ds = fingerprint_dataset(three, deterministic=True, chunk_sites=len(a.sites))
    np.testing.assert_array_equal(ds[schema.AFP].values, without[schema.AFP])
    assert ds[schema.N_UNIQUE_SITES].values.tolist() == [len(a.sites), 0, len(b.sites)]


def test_the_cube_and_its_tasks_share_the_table(read: ReadResult) -> None:
    # one copy of the coordinates in memory: the Dataset's and the blocks' are the table's
    table = StructureTable.from_structures(read.structures)
    ds = fingerprint_dataset(TableRead(table, read.rejections, read.n_read, read.params))
    assert np.shares_memory(ds[schema.ATOM_FRAC_COORDS].values, table.frac_coords)
    assert np.shares_memory(ds[schema.SITE_INDEX].values, table.site_index)
    assert np.shares_memory(ds[schema.WYCKOFF].values, table.wyckoff)
    blocks = afpx.cube._blocks(table, 2, 5)
    assert sum(block.n_rows for block in blocks) == n_sites(read, 2)
    for block in blocks:
        assert np.shares_memory(block.frac_coords, table.frac_coords)
        assert np.shares_memory(block.atoms, table.site_index)


@pytest.mark.parametrize("draws", [1, 2])
def test_cube_read_as_a_table_equals_cube_read_as_structures(tmp_path: Path, draws: int) -> None:
    # build_cube reads files with read_table; structures read as objects give the same cube
    inputs = [str(p) for p in sorted(COD.glob("*.cif"))[:6]]
    table = open_cube(build_cube(inputs, tmp_path / "t.zarr", draws=draws, chunk_sites=3))
    read = read_structures(inputs)
    objects = open_cube(build_cube(read, tmp_path / "o.zarr", draws=draws, chunk_sites=3))
    assert table.attrs.pop("sources") == inputs
    assert objects.attrs.pop("sources") == sorted({s.source for s in read.structures})
    xr.testing.assert_identical(table.load(), objects.load())


def test_seeds(read: ReadResult) -> None:
    a = compute_fingerprints(read.structures, draws=2, seed=1)
    b = compute_fingerprints(read.structures, draws=2, seed=1)
    c = compute_fingerprints(read.structures, draws=2, seed=2)
    np.testing.assert_array_equal(a[schema.AFP], b[schema.AFP])
    assert not np.allclose(a[schema.AFP], c[schema.AFP])
    # draws of one site differ from each other
    assert not np.allclose(a[schema.AFP][0], a[schema.AFP][1])
    # r0 and the rest do not depend on the seed
    np.testing.assert_array_equal(a[schema.R0], c[schema.R0])
    d1 = compute_fingerprints(read.structures, deterministic=True, seed=1)
    d2 = compute_fingerprints(read.structures, deterministic=True, seed=2)
    np.testing.assert_array_equal(d1[schema.AFP], d2[schema.AFP])
    # augmentation is a small perturbation: augmented and deterministic AFPs are close in shape
    corr = np.corrcoef(a[schema.AFP][0].ravel(), d1[schema.AFP][0].ravel())[0, 1]
    assert corr > 0.9


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"draws": 0}, "draws"),
        ({"draws": 2, "deterministic": True}, "deterministic"),
        ({"seed": -1}, "seed"),
        ({"chunk_sites": 0}, "chunk_sites"),
        ({"device": "tpu"}, "unknown device"),
    ],
)
def test_invalid_options_raise(read: ReadResult, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(AfpxError, match=match):
        fingerprint_dataset(read, **kwargs)


@pytest.mark.skipif(cupy_available(), reason="CuPy with a GPU is present")
def test_cuda_without_cupy_is_a_clear_error(read: ReadResult, tmp_path: Path) -> None:
    with pytest.raises(AfpxError, match="cuda"):
        build_cube(read, tmp_path / "c.zarr", device="cuda")
    assert not (tmp_path / "c.zarr").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not cupy_available(), reason="needs CuPy and a CUDA device")
def test_cuda_cube_matches_cpu(read: ReadResult) -> None:  # pragma: no cover - no GPU in CI
    cpu = compute_fingerprints(read.structures, draws=2)
    gpu = compute_fingerprints(read.structures, draws=2, device="cuda")
    np.testing.assert_allclose(gpu[schema.AFP], cpu[schema.AFP], atol=1e-3)


def test_no_accepted_structure_raises(tmp_path: Path) -> None:
    empty = ReadResult([], [Rejection("a", "a.cif", None, "parse_error", "bad")], 1, FilterParams())
    with pytest.raises(AfpxError, match=r"no structure was accepted.*parse_error: 1"):
        build_cube(empty, tmp_path / "c.zarr")
    assert list(tmp_path.iterdir()) == []


# -- storage -------------------------------------------------------------------------------------
def test_write_open_round_trip(read: ReadResult, tmp_path: Path) -> None:
    path = build_cube(read, tmp_path / "cube.zarr", draws=2, seed=4, chunk_sites=4)
    ds = open_cube(path)
    schema.check_cube(ds)
    assert ds.sizes[schema.SITE] == n_sites(read, 2)
    assert ds[schema.AFP].chunks is not None and ds[schema.AFP].chunks[0][0] == 4
    # small variables are in memory, the fingerprints are not
    assert ds[schema.Z].chunks is None and ds[schema.SPLIT].chunks is None
    assert ds[schema.AFP].chunks is not None
    eager = compute_fingerprints(read.structures, draws=2, seed=4)
    for name in (schema.AFP, schema.R0, schema.DMIN_RATIO, schema.COORDINATION):
        np.testing.assert_array_equal(ds[name].values, eager[name])
    for name, dtype in schema.DTYPES.items():
        if name in ds.variables:
            assert ds[name].dtype == dtype, name
    assert ds[schema.STRUCTURE_ID].values.tolist() == ["nacl", "laas", "srtio3", "zno", "p1"]
    assert ds[schema.WYCKOFF].values[:4].tolist() == ["a", "a", "b", "b"]
    assert ds[schema.REJECT_REASON].values.tolist() == ["r_factor"]
    assert "x.cif" in str(ds[schema.REJECT_MESSAGE].values[0])
    attrs = ds.attrs
    assert FingerprintParams(**attrs["fingerprint"]) == FingerprintParams()
    assert attrs["draws"] == 2 and attrs["seed"] == 4 and attrs["deterministic"] is False
    assert attrs["afpx_version"] == afpx.__version__
    assert attrs["filters"]["r_factor_max"] == 0.1
    assert attrs["split"]["seed"] == 0 and "tetrahedron" in attrs["fingerprint_conventions"]
    assert json.dumps(dict(attrs))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_selections_do_not_read_fingerprints(read: ReadResult, tmp_path: Path) -> None:
    ds = open_cube(build_cube(read, tmp_path / "cube.zarr", draws=2))
    na = select_sites(ds, element="Na")
    assert na.sizes[schema.SITE] == 2 and set(na[schema.Z].values.tolist()) == {11}
    assert na[schema.AFP].chunks is not None  # still lazy
    assert site_mask(ds, element=[11, "Cl"]).sum() == 4
    one = select_sites(ds, structure="srtio3", draw=0)
    assert one.sizes[schema.SITE] == 3
    assert select_sites(ds, structure=[0, "laas"]).sizes[schema.SITE] == 8
    splits = ds[schema.SPLIT].values.tolist()
    for name in schema.SPLITS:
        expected = sum(
            2 * len(s.sites) for s, sp in zip(read.structures, splits, strict=True) if sp == name
        )
        assert site_mask(ds, split=name).sum() == expected
    assert site_mask(ds, split=list(schema.SPLITS)).all()


@pytest.mark.parametrize(
    ("criteria", "match"),
    [
        ({"structure": "nope"}, "no structure with id"),
        ({"structure": 99}, "outside"),
        ({"split": "validation"}, "unknown split"),
        ({"element": "Xx"}, "unknown element"),
    ],
)
def test_bad_selections_raise(read: ReadResult, criteria: dict[str, Any], match: str) -> None:
    ds = fingerprint_dataset(read)
    with pytest.raises(AfpxError, match=match):
        site_mask(ds, **criteria)


def test_existing_output_is_never_lost(read: ReadResult, tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "data.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(AfpxError, match="not an afpx cube"):
            build_cube(read, precious, overwrite=overwrite)
    assert (precious / "data.txt").read_text() == "keep me"
    cube = build_cube(read, tmp_path / "cube.zarr", seed=1)
    with pytest.raises(AfpxError, match="--overwrite"):
        build_cube(read, cube)
    before = open_cube(cube)[schema.AFP].values
    build_cube(read, cube, seed=2, overwrite=True)
    after = open_cube(cube)
    assert after.attrs["seed"] == 2 and not np.array_equal(after[schema.AFP].values, before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cube.zarr", "precious"]


def test_failed_build_leaves_nothing_at_the_target(
    read: ReadResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = build_cube(read, tmp_path / "cube.zarr", seed=1)
    before = open_cube(good)[schema.AFP].values
    original = afpx.cube._compute_block
    calls = {"n": 0}

    def failing(block: Any, options: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk on fire")
        return original(block, options)

    monkeypatch.setattr(afpx.cube, "_compute_block", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        build_cube(read, tmp_path / "new.zarr", chunk_sites=2)
    with pytest.raises(RuntimeError, match="disk on fire"):
        calls["n"] = 0
        build_cube(read, good, chunk_sites=2, overwrite=True, seed=9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cube.zarr"]
    np.testing.assert_array_equal(open_cube(good)[schema.AFP].values, before)


def test_open_cube_refuses_what_is_not_a_complete_cube(read: ReadResult, tmp_path: Path) -> None:
    with pytest.raises(AfpxError, match="no cube at"):
        open_cube(tmp_path / "missing.zarr")
    (tmp_path / "folder").mkdir()
    with pytest.raises(AfpxError, match="not a readable zarr"):
        open_cube(tmp_path / "folder")
    # a store whose build did not finish (as a remote write interrupted midway would be)
    fingerprint_dataset(read).to_zarr(tmp_path / "half.zarr", zarr_format=3, consolidated=False)
    with pytest.raises(AfpxError, match="not a complete afpx cube"):
        open_cube(tmp_path / "half.zarr")
    # complete but not a cube
    xr.Dataset({"x": ("a", [1, 2])}, attrs={afpx.cube.COMPLETE_ATTR: True}).to_zarr(
        tmp_path / "other.zarr", zarr_format=3, consolidated=False
    )
    with pytest.raises(AfpxError, match="afp"):
        open_cube(tmp_path / "other.zarr")


def test_write_cube_checks_the_target(read: ReadResult, tmp_path: Path) -> None:
    ds = fingerprint_dataset(read)
    with pytest.raises(AfpxError, match="does not exist"):
        write_cube(ds, tmp_path / "no" / "such" / "cube.zarr")
    (tmp_path / "file").write_text("x")
    with pytest.raises(AfpxError, match="not an afpx cube"):
        write_cube(ds, tmp_path / "file", overwrite=True)


def test_write_cube_refuses_an_existing_cube(read: ReadResult, tmp_path: Path) -> None:
    cube = build_cube(read, tmp_path / "cube.zarr")
    with pytest.raises(AfpxError, match="--overwrite"):
        write_cube(fingerprint_dataset(read), cube)


def test_output_may_not_be_an_input(tmp_path: Path) -> None:
    with pytest.raises(AfpxError, match="also an input"):
        build_cube([tmp_path / "c.zarr"], tmp_path / "c.zarr")


# -- schedulers ----------------------------------------------------------------------------------
def test_local_cluster_equals_threads_bit_for_bit(tmp_path: Path) -> None:
    # reading and fingerprints both on a 2-process cluster, against threads
    inputs = [str(p) for p in sorted(COD.glob("*.cif"))[:6]]
    threads = build_cube(inputs, tmp_path / "threads.zarr", draws=2, chunk_sites=4)
    cluster = build_cube(inputs, tmp_path / "cluster.zarr", draws=2, chunk_sites=4, workers=2)
    a, b = open_cube(threads).load(), open_cube(cluster).load()
    assert a.sizes[schema.SITE] > 8  # several chunks
    xr.testing.assert_identical(a, b)


def test_progress_bar_only_when_asked(
    read: ReadResult,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import dask.diagnostics

    monkeypatch.setattr(
        dask.diagnostics.ProgressBar, "__init__", _eager_bar(dask.diagnostics.ProgressBar.__init__)
    )
    build_cube(read, tmp_path / "quiet.zarr")  # stderr is not a terminal here
    assert "100%" not in capsys.readouterr().err
    build_cube(read, tmp_path / "bar.zarr", progress=True)
    assert "100%" in capsys.readouterr().err
    # written in several waves: still one bar, of chunks, for the whole build
    monkeypatch.setattr(afpx.cube, "CHUNKS_PER_WAVE", 1)
    monkeypatch.setattr(afpx.cube, "task_slots", lambda client: 0)
    build_cube(read, tmp_path / "waves.zarr", chunk_sites=3, progress=True)
    lines = [line for line in capsys.readouterr().err.split("\n") if "writing" in line]
    assert len(lines) == 1 and "100%" in lines[0] and "Completed" not in lines[0]


def _eager_bar(init: Any) -> Any:
    def patched(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["minimum"] = 0.0  # show the bar even for a build this short
        init(self, *args, **kwargs)

    return patched


# -- summary and CLI -----------------------------------------------------------------------------
def test_summary(read: ReadResult) -> None:
    text = cube_summary(fingerprint_dataset(read, draws=2))
    assert f"sites: {n_sites(read, 2)}" in text and "structures: 5" in text
    assert "Na 2" in text and "r_factor: 1" in text and "kaiser_beta=14.0" in text


def test_summary_counted_a_slice_at_a_time(
    read: ReadResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import afpx.cube

    cube = open_cube(build_cube(read, tmp_path / "cube.zarr", draws=2, progress=False))
    whole = cube_summary(cube)
    split = np.asarray(cube[schema.SPLIT].values.tolist())
    site_split = split[cube[schema.STRUCTURE_INDEX].values]
    for name in schema.SPLITS:
        n, m = int((split == name).sum()), int((site_split == name).sum())
        assert f"  {name}: {n} / {m}" in whole
    monkeypatch.setattr(afpx.cube, "_SUMMARY_SLICE", 3)  # slices across structures
    assert cube_summary(cube) == whole


def test_summary_of_a_cube_opened_without_loading(read: ReadResult, tmp_path: Path) -> None:
    # what build-cube prints: only the variables the summary needs are read
    path = build_cube(read, tmp_path / "cube.zarr", draws=2, progress=False)
    lazy = open_cube(path, load=False)
    assert all(var.chunks for var in lazy.variables.values() if var.ndim)
    assert cube_summary(lazy, path=str(path)) == cube_summary(open_cube(path), path=str(path))


def test_cli_build_cube_and_info(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cod.zarr"
    runner = CliRunner()
    result = runner.invoke(
        main,
        [
            "build-cube",
            str(data_dir / "cod"),
            str(data_dir / "bad" / "garbage.cif"),
            "-o",
            str(out),
            "--draws",
            "2",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "structures:" in result.output and "parse_error" in result.output
    ds = open_cube(out)
    assert ds.attrs["draws"] == 2 and ds.sizes[schema.REJECT] >= 1
    info = runner.invoke(main, ["info", str(out)])
    assert (
        info.exit_code == 0 and "sites per element" in info.output and "size on disk" in info.output
    )
    again = runner.invoke(main, ["build-cube", str(data_dir / "cod"), "-o", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output
    missing = runner.invoke(main, ["info", str(tmp_path / "none.zarr")])
    assert missing.exit_code == 2 and "no cube at" in missing.output
    bad = runner.invoke(
        main,
        ["build-cube", str(data_dir / "cod"), "-o", str(tmp_path / "x.zarr"), "--device", "cuda"],
    )
    if not cupy_available():
        assert bad.exit_code == 2 and "cuda" in bad.output
    assert not (tmp_path / "x.zarr").exists()


# -- splits --------------------------------------------------------------------------------------
def test_splits_are_grouped_by_formula_and_seeded() -> None:
    rng = np.random.default_rng(0)
    formulas = [f"A{i}B" for i in rng.integers(0, 400, 3000)]
    labels = assign_splits(formulas)
    by_formula: dict[str, set[str]] = {}
    for f, lab in zip(formulas, labels, strict=True):
        by_formula.setdefault(f, set()).add(lab)
    assert all(len(v) == 1 for v in by_formula.values())
    # ~60/20/20 of the formulas (400 formulas: binomial sd ~0.025)
    per_formula = [np.mean([v == {s} for v in by_formula.values()]) for s in schema.SPLITS]
    np.testing.assert_allclose(per_formula, [0.6, 0.2, 0.2], atol=0.06)
    # a label depends on the formula alone: adding structures moves none
    more = formulas + [f"C{i}D" for i in range(500)]
    np.testing.assert_array_equal(assign_splits(more)[: len(formulas)], labels)
    big = assign_splits([f"E{i}" for i in range(20000)])
    np.testing.assert_allclose(
        [np.mean(big == s) for s in schema.SPLITS], [0.6, 0.2, 0.2], atol=0.015
    )
    np.testing.assert_array_equal(assign_splits(formulas, params=SplitParams(seed=0)), labels)
    # the same from numpy's text arrays (a cube's formulas) and from objects
    for array in (
        np.array(formulas, dtype=np.dtypes.StringDType()),
        np.array(formulas, dtype=object),
        np.array(formulas),
    ):
        np.testing.assert_array_equal(assign_splits(array), labels)
    assert not np.array_equal(assign_splits(formulas, params=SplitParams(seed=1)), labels)
    # independent of the order of the structures
    order = rng.permutation(len(formulas))
    np.testing.assert_array_equal(assign_splits([formulas[i] for i in order]), labels[order])
    assert assign_splits([]).shape == (0,)
    assert set(assign_splits(["X"] * 5, params=SplitParams(fractions=(0.0, 0.0, 1.0)))) == {"test"}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"fractions": (0.5, 0.5)},
        {"fractions": (0.6, 0.3, 0.3)},
        {"fractions": (1.2, -0.1, -0.1)},
        {"seed": -3},
    ],
)
def test_bad_split_params_raise(kwargs: dict[str, Any]) -> None:
    with pytest.raises(AfpxError, match="split"):
        SplitParams(**kwargs)
