"""Cubes and likelihoods at s3:// URLs, against a local S3 server (moto)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import xarray as xr
from _s3_helpers import s3_bucket
from click.testing import CliRunner

import afpx.cube
from afpx import AfpxError, schema, store
from afpx.cli import main
from afpx.cube import COMPLETE_ATTR, append_to_cube, build_cube, open_cube, verify_cube

COD = Path(__file__).parent / "data" / "cod"
INPUTS = [str(p) for p in sorted(COD.glob("*.cif"))[:4]]


@pytest.fixture(scope="module")
def bucket() -> Iterator[str]:
    with s3_bucket() as url:
        yield url


def test_cube_at_a_url_equals_the_local_one(bucket: str, tmp_path: Path) -> None:
    local = build_cube(INPUTS, tmp_path / "cube.zarr", chunk_sites=4, progress=False)
    url = f"{bucket}/cli/cube.zarr"
    args = ["build-cube", *INPUTS, "-o", url, "--chunk-sites", "4", "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert store.is_url(url) and store.exists(url)
    assert store.group_attrs(url)[COMPLETE_ATTR] is True  # type: ignore[index]
    xr.testing.assert_identical(open_cube(local).load(), open_cube(url).load())
    again = CliRunner().invoke(main, args)
    assert again.exit_code != 0 and "exists; choose another URL or pass --overwrite" in again.output
    assert CliRunner().invoke(main, [*args, "--overwrite"]).exit_code == 0


def test_a_half_written_cube_at_a_url_is_never_taken_as_complete(
    bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"{bucket}/failed/cube.zarr"
    real = afpx.cube._compute_block
    calls = {"n": 0}

    def fails_on_the_third_block(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("worker lost")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(afpx.cube, "_compute_block", fails_on_the_third_block)
    with pytest.raises(RuntimeError, match="worker lost"):
        build_cube(INPUTS, url, chunk_sites=2, progress=False, scheduler="synchronous")
    monkeypatch.undo()
    assert store.exists(url)  # in place: no rename on an object store
    with pytest.raises(AfpxError, match="not a complete afpx cube"):
        open_cube(url)
    with pytest.raises(AfpxError, match=r"exists \(an unfinished build\)"):
        build_cube(INPUTS, url, chunk_sites=2, progress=False)
    build_cube(INPUTS, url, chunk_sites=2, progress=False, overwrite=True)
    assert open_cube(url).sizes[schema.SITE] > 4


def test_url_refusals(bucket: str, tmp_path: Path) -> None:
    url = f"{bucket}/refusals/cube.zarr"
    with pytest.raises(AfpxError, match="--resume continues local builds only"):
        build_cube(INPUTS, url, resume=True)
    build_cube(INPUTS[:1], url, progress=False)
    with pytest.raises(AfpxError, match="appending works on local cubes only"):
        append_to_cube(INPUTS[1:], url)
    with pytest.raises(AfpxError, match="checksums are recorded for local cubes only"):
        verify_cube(url)
    other = f"{bucket}/refusals/other.zarr"
    store.publish(xr.Dataset({"x": ("i", np.arange(3))}), other, complete_attr="done")
    with pytest.raises(AfpxError, match="is not an afpx cube; refusing to replace it"):
        build_cube(INPUTS, other, overwrite=True)
    with pytest.raises(AfpxError, match="exists; choose another path or overwrite it"):
        store.publish(xr.Dataset(), other, complete_attr="done")
    with pytest.raises(AfpxError, match="no zarr store at"):
        store.open_group(f"{bucket}/refusals/none.zarr")


@pytest.mark.parametrize("where", ["local", "url"])
def test_publish_reads_back_chunks_equal_to_the_fill_value(
    bucket: str, tmp_path: Path, where: str
) -> None:
    # chunk 0 all zeros, chunk 1 all NaN: zarr may skip writing such chunks
    values = np.concatenate([np.zeros(4), np.full(4, np.nan), np.arange(4.0)]).astype(np.float32)
    ds = xr.Dataset({"v": ("i", da.from_array(values, chunks=4))}, attrs={"k": 1})
    target = str(tmp_path / "v.zarr") if where == "local" else f"{bucket}/fill/v.zarr"
    assert store.publish(ds, target, complete_attr="done") == target
    assert store.group_attrs(target) == {"k": 1, "done": True}
    back = xr.open_zarr(target, consolidated=False)
    np.testing.assert_array_equal(back["v"].values, values)
    with pytest.raises(AfpxError, match="exists"):
        store.publish(ds, target, complete_attr="done")
    store.publish(ds * 2, target, complete_attr="done", overwrite=True)
    np.testing.assert_array_equal(xr.open_zarr(target, consolidated=False)["v"].values, values * 2)
    if where == "local":
        assert sorted(p.name for p in tmp_path.iterdir()) == ["v.zarr"]


def test_unknown_protocol_is_a_clear_error() -> None:
    with pytest.raises(AfpxError, match="cannot open nosuch://x"):
        store.filesystem("nosuch://x")


def test_local_refusals_of_the_store_helpers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = xr.Dataset({"v": ("i", da.arange(4, chunks=2))})
    with pytest.raises(AfpxError, match="does not exist"):
        store.publish(ds, tmp_path / "missing" / "v.zarr", complete_attr="done")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("not zarr")
    with pytest.raises(AfpxError, match="is not a readable zarr"):
        store.open_group(tmp_path / "plain")
    assert store.group_attrs(tmp_path / "plain") is None

    def appeared(src: Path, dst: Path) -> None:
        raise FileExistsError(dst)

    monkeypatch.setattr(store, "rename_noreplace", appeared)
    with pytest.raises(AfpxError, match="appeared while it was written; the new store is kept"):
        store.publish(ds, tmp_path / "v.zarr", complete_attr="done")
    (kept,) = tmp_path.glob(".v.zarr.partial-*")
    assert store.group_attrs(kept) == {"done": True}


def test_likelihood_of_a_missing_cube(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from afpx.likelihood import predict

    with pytest.raises(AfpxError, match="does not exist; build it with `afpx build-cube`"):
        predict(tmp_path / "none.zarr", tmp_path / "model")
