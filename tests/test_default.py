"""Packing and loading of the built-in template library (afpx.default)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from _rank_helpers import GE, LI, MN, OX, hand_library, random_library
from click.testing import CliRunner

import afpx.default
from afpx import AfpxError
from afpx.cli import main
from afpx.default import (
    MANIFEST_DIGEST_KEY,
    compare_rankings,
    load_default_library,
    load_library,
    manifest_digest,
    pack_default_library,
    pack_library,
)
from afpx.rank import rank
from afpx.templates import TemplateLibrary


@pytest.fixture(scope="module")
def library() -> TemplateLibrary:
    from afpx.structures import read_structures

    data = Path(__file__).parent / "data" / "cod"
    structures = read_structures([data]).structures
    rng = np.random.default_rng(0)
    n = sum(len(s.sites) for s in structures)
    lik = rng.random((n, 118)).astype(np.float32)
    lib = TemplateLibrary.from_structures(structures, likelihood=lik, attrs={"model": "test"})
    return lib


def _same(a: TemplateLibrary, b: TemplateLibrary) -> None:
    for name in ("site_template", "multiplicity", "z", "spacegroup", "site_index"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    for name in ("structure_id", "formula", "source", "wyckoff"):
        assert list(getattr(a, name)) == list(getattr(b, name)), name
    assert a.geometry is not None and b.geometry is not None
    assert np.allclose(a.geometry.lattice, b.geometry.lattice, atol=1e-5)
    assert np.allclose(a.geometry.frac_coords, b.geometry.frac_coords, atol=1e-6)
    assert np.array_equal(a.geometry.numbers, b.geometry.numbers)


def test_roundtrip_lossless(library: TemplateLibrary, tmp_path: Path) -> None:
    manifest = pack_library(library, tmp_path, quantise="float32", check_sets=5)
    loaded = load_library(tmp_path / "default_library.json")
    _same(library, loaded)
    assert np.array_equal(loaded.log_likelihood, library.log_likelihood)
    assert loaded.attrs["model"] == "test"
    check = manifest["rank_check"]
    assert check["n_sets"] == 5 and check["n_sets_changed"] == 0
    # never pickled: no object arrays in the archive, loadable without pickle
    with np.load(tmp_path / "default_library.npz", allow_pickle=False) as data:
        assert all(data[k].dtype != object for k in data.files)
    on_disk = json.loads((tmp_path / "default_library.json").read_text())
    assert (
        on_disk["files"]["default_library.npz"]["sha256"]
        == manifest["files"]["default_library.npz"]["sha256"]
    )


def test_uint16_quantisation_error_and_ranks(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    lib = random_library(rng, 200, max_sites=5)
    manifest = pack_library(lib, tmp_path, quantise="uint16", floor=1e-3, check_sets=None)
    loaded = load_library(tmp_path / "default_library.json")
    step = -np.log(1e-3) / 65535
    clipped = np.maximum(lib.log_likelihood, np.log(1e-3))
    assert np.abs(loaded.log_likelihood - clipped).max() <= step / 2 + 1e-6
    assert manifest["layout"]["log_likelihood"]["kind"] == "uint16"
    sets = [[MN, GE], [LI, OX], [LI, MN, GE]]
    check = compare_rankings(lib, loaded, sets)
    assert check["n_sets"] == 3 and check["n_compositions"] > 0
    # ranks of a coarse uint8 packing do move on random likelihoods: the check sees it
    pack_library(lib, tmp_path / "u8", quantise="uint8", floor=1e-3, check_sets=None)
    coarse = load_library(tmp_path / "u8" / "default_library.json")
    assert compare_rankings(lib, coarse, sets)["n_sets_changed"] > 0


def test_quantised_ranks_unchanged_when_gaps_exceed_the_step(tmp_path: Path) -> None:
    # the hand-made Mn-Ge library: its score gaps (>= 0.04 in log) are far larger
    # than the uint16 step (2e-4), and its ties are bitwise (identical sites)
    manifest = pack_library(hand_library(), tmp_path, quantise="uint16", check_sets=[[MN, GE]])
    assert manifest["rank_check"]["n_sets_changed"] == 0
    assert manifest["rank_check"]["n_sets_top_changed"] == 0


def test_corrupted_file_is_detected(library: TemplateLibrary, tmp_path: Path) -> None:
    pack_library(library, tmp_path, check_sets=None)
    npz = tmp_path / "default_library.npz"
    data = bytearray(npz.read_bytes())
    data[len(data) // 2] ^= 0xFF
    npz.write_bytes(bytes(data))
    with pytest.raises(AfpxError, match=r"checksum mismatch.*reinstall afpx"):
        load_library(tmp_path / "default_library.json")
    npz.unlink()
    with pytest.raises(AfpxError, match="is missing; reinstall afpx"):
        load_library(tmp_path / "default_library.json")


def test_manifest_errors(library: TemplateLibrary, tmp_path: Path) -> None:
    with pytest.raises(AfpxError, match="does not exist"):
        load_library(tmp_path / "nothing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(AfpxError, match="cannot read manifest"):
        load_library(bad)
    bad.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(AfpxError, match="not an afpx template library"):
        load_library(bad)
    pack_library(library, tmp_path, check_sets=None)
    meta = json.loads((tmp_path / "default_library.json").read_text())
    meta["files"]["extra.npz"] = {"sha256": "0"}
    meta[MANIFEST_DIGEST_KEY] = manifest_digest(meta)
    bad.write_text(json.dumps(meta))
    with pytest.raises(AfpxError, match="exactly one data file"):
        load_library(bad)


def test_edited_manifest_is_refused(library: TemplateLibrary, tmp_path: Path) -> None:
    pack_library(library, tmp_path, check_sets=None)
    manifest = tmp_path / "default_library.json"
    meta = json.loads(manifest.read_text())
    assert meta[MANIFEST_DIGEST_KEY] == manifest_digest(meta)
    # re-indenting changes nothing: the digest is of the canonical JSON
    manifest.write_text(json.dumps(meta, indent=4))
    load_library(manifest)
    meta["layout"]["arrays"]["multiplicity"]["dtype"] = "<u4"  # the edit of issue 12
    manifest.write_text(json.dumps(meta))
    with pytest.raises(AfpxError, match=r"was changed since it was packed.*reinstall afpx"):
        load_library(manifest)
    del meta[MANIFEST_DIGEST_KEY]
    manifest.write_text(json.dumps(meta))
    with pytest.raises(AfpxError, match="has no manifest_sha256"):
        load_library(manifest)
    manifest.write_text("[1, 2]")
    with pytest.raises(AfpxError, match="is not a JSON object"):
        load_library(manifest)


def test_shipped_manifest_carries_its_digest() -> None:
    shipped = Path(afpx.default.__file__).parent / "data" / "default_library.json"
    meta = json.loads(shipped.read_text())
    assert meta[MANIFEST_DIGEST_KEY] == manifest_digest(meta)


def test_unreadable_or_incomplete_archive(library: TemplateLibrary, tmp_path: Path) -> None:
    pack_library(library, tmp_path, check_sets=None)
    manifest = tmp_path / "default_library.json"
    meta = json.loads(manifest.read_text())
    npz = tmp_path / "default_library.npz"
    # an archive without one of the arrays, with a matching checksum
    with zipfile.ZipFile(npz) as zin:
        names = [n for n in zin.namelist() if not n.startswith("formula")]
        blobs = {n: zin.read(n) for n in names}
    with zipfile.ZipFile(npz, "w") as zout:
        for n, b in blobs.items():
            zout.writestr(n, b)
    meta["files"]["default_library.npz"]["sha256"] = afpx.datasets.sha256_of(npz)
    meta[MANIFEST_DIGEST_KEY] = manifest_digest(meta)
    manifest.write_text(json.dumps(meta))
    with pytest.raises(AfpxError, match="lacks"):
        load_library(manifest)
    npz.write_bytes(b"not a zip")
    meta["files"]["default_library.npz"]["sha256"] = afpx.datasets.sha256_of(npz)
    meta[MANIFEST_DIGEST_KEY] = manifest_digest(meta)
    manifest.write_text(json.dumps(meta))
    with pytest.raises(AfpxError, match="cannot read"):
        load_library(manifest)


def test_pack_option_errors(library: TemplateLibrary, tmp_path: Path) -> None:
    with pytest.raises(AfpxError, match="unknown quantisation"):
        pack_library(library, tmp_path, quantise="int4")
    with pytest.raises(AfpxError, match="floor must lie"):
        pack_library(library, tmp_path, floor=2.0)


def test_default_library_absent_then_present(
    library: TemplateLibrary, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(afpx.default, "default_data_dir", lambda: tmp_path)
    afpx.default._load_default_cached.cache_clear()
    with pytest.raises(AfpxError, match="not installed"):
        load_default_library()
    pack_default_library(library, check_sets=None)
    lib = load_default_library()
    assert lib is load_default_library()  # loaded once
    assert lib.attrs["default"] == "default_library.json"
    ds = rank("Ca,Ti,O", top=5)  # no cube: the default
    assert ds.sizes["composition"] == 5
    assert ds.attrs["library"].startswith("built-in default")
    res = CliRunner().invoke(
        main, ["rank", "--elements", "Ca,Ti,O", "--export-cif", str(tmp_path / "c")]
    )
    assert res.exit_code == 0, res.output
    n = len(list((tmp_path / "c").glob("*.cif")))
    assert n > 0 and f"wrote {n} CIF files" in res.output
    afpx.default._load_default_cached.cache_clear()


def test_default_does_not_ship_a_stale_or_partial_pair() -> None:
    # if package data ships, it must load (checksum, format) — a test that can fail
    manifest = afpx.default.default_data_dir() / "default_library.json"
    if not manifest.exists():
        pytest.skip("no default library packed yet")
    lib = load_library(manifest)
    assert lib.n_templates > 0
    ds = rank("Li,Mn,Ge", library=lib, top=10)
    assert ds.sizes["composition"] >= 10
    assert ((ds.score > 0) & (ds.score <= 1)).all()
    assert (ds.counts > 0).all()


def test_float16_keeps_the_top_exact_on_the_hand_library(tmp_path: Path) -> None:
    manifest = pack_library(hand_library(), tmp_path, quantise="float16", check_sets=[[MN, GE]])
    check = manifest["rank_check"]
    assert check["n_sets_changed"] == 0 and check["same_compositions"]
    loaded = load_library(tmp_path / "default_library.json")
    rel = np.abs(loaded.log_likelihood - hand_library().log_likelihood)
    assert (rel <= np.abs(hand_library().log_likelihood) * 2.0**-11 + 1e-12).all()


def _fake_model_folder(path: Path) -> Path:
    path.mkdir()
    (path / "model.pt").write_bytes(b"weights")
    (path / "config.json").write_text('{"format": "afpx-model/1"}')
    return path


def test_default_model_pack_verify_and_corruption(tmp_path: Path) -> None:
    src = _fake_model_folder(tmp_path / "model")
    out = tmp_path / "packed"
    manifest = afpx.default.pack_default_model(src, out)
    assert set(manifest["files"]) == {"model.pt", "config.json"}
    assert afpx.default.default_model_dir(out) == out
    (out / "model.pt").write_bytes(b"weightz")
    with pytest.raises(AfpxError, match=r"model\.pt.*does not match its SHA-256"):
        afpx.default.default_model_dir(out)
    (out / "model.pt").unlink()
    with pytest.raises(AfpxError, match="is missing"):
        afpx.default.default_model_dir(out)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(AfpxError, match="cannot read"):
        afpx.default.default_model_dir(out)


def test_default_model_errors(tmp_path: Path) -> None:
    with pytest.raises(AfpxError, match="default model is not installed"):
        afpx.default.default_model_dir(tmp_path)
    with pytest.raises(AfpxError, match=r"not a model folder: model\.pt, config\.json missing"):
        afpx.default.pack_default_model(tmp_path, tmp_path / "out")


def test_shipped_default_model_verifies_and_loads() -> None:
    folder = afpx.default.default_data_dir() / "default_model"
    if not folder.exists():
        pytest.skip("no default model packed yet")
    from afpx.checkpoint import load_model

    model = load_model(afpx.default.default_model_dir())
    assert model.config.n_elements == 118


def test_float16_mantissa_rounding_bounds_the_error(tmp_path: Path) -> None:
    lib = hand_library()
    pack_library(lib, tmp_path, quantise="float16", mantissa_bits=7, check_sets=None)
    loaded = load_library(tmp_path / "default_library.json")
    x = np.maximum(lib.log_likelihood, np.log(1e-6))
    err = np.abs(loaded.log_likelihood - x)
    # 7 mantissa bits: relative error at most 2^-8 of the value (plus float16 rounding)
    assert (err <= np.abs(x) * (2.0**-8 + 2.0**-11) + 1e-12).all()
    with pytest.raises(AfpxError, match="mantissa_bits must lie"):
        pack_library(lib, tmp_path, quantise="float16", mantissa_bits=11)


def test_shipped_default_ranks_li_mn_ge_from_the_command_line() -> None:
    manifest = afpx.default.default_data_dir() / "default_library.json"
    if not manifest.exists():
        pytest.skip("no default library packed yet")
    res = CliRunner().invoke(main, ["rank", "--elements", "Li,Mn,Ge", "--format", "json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)["rows"]
    assert len(rows) >= 10
    for row in rows:
        assert 0 < row["score"] <= 1
        assert all(el in row["formula"] for el in ("Li", "Mn", "Ge"))
        assert row["structure_id"] and row["template_formula"] and row["spacegroup"] > 0
    # the packing check recorded how far the quantised ranks moved from the cube's
    check = json.loads(manifest.read_text())["rank_check"]
    # same compositions; the top 20 kept in all but a few of the sampled sets (moves
    # deeper in the top 100 are runs of compositions tied within the uint16 step)
    assert check["same_compositions"] and check["n_sets_top_changed"] <= 2
    assert check["max_rank_change_head"] <= 100


# -----------------------------------------------------------------------------
# format 2: one likelihood array per element, read when a ranking needs it
# -----------------------------------------------------------------------------
def _as_format_1(directory: Path) -> Path:
    """Turn a packed (format 2) library into format 1: one (n_sites, 118) array."""
    manifest = directory / "default_library.json"
    meta = json.loads(manifest.read_text())
    npz = directory / "default_library.npz"
    qinfo = meta["layout"]["log_likelihood"]
    with np.load(npz) as data:
        raw = {k: data[k] for k in data.files}
    cols = [raw.pop(qinfo["columns"].format(z=z)) for z in range(1, 119)]
    if qinfo["shuffled"]:
        cols = [afpx.default._unshuffle(c, qinfo["dtype"], [qinfo["n_sites"]]) for c in cols]
    q = np.stack(cols, axis=1)
    raw["log_likelihood"] = afpx.default._shuffle(q)
    np.savez_compressed(npz, **raw)
    meta["layout"]["arrays"]["log_likelihood"] = {
        "dtype": q.dtype.str,
        "shape": list(q.shape),
        "shuffled": True,
    }
    meta["layout"]["log_likelihood"] = {
        k: v for k, v in qinfo.items() if k not in ("columns", "dtype", "n_sites", "shuffled")
    }
    meta["format_version"] = 1
    meta["files"] = {npz.name: {"sha256": afpx.datasets.sha256_of(npz), "bytes": 0}}
    meta[MANIFEST_DIGEST_KEY] = manifest_digest(meta)
    manifest.write_text(json.dumps(meta))
    return manifest


def test_format_1_is_refused_and_repacked_with_the_same_values(
    library: TemplateLibrary, tmp_path: Path
) -> None:
    from afpx.default import repack_library

    pack_library(library, tmp_path / "v2", quantise="uint16", check_sets=None)
    want = np.asarray(load_library(tmp_path / "v2" / "default_library.json").log_likelihood)
    pack_library(library, tmp_path / "v1", quantise="uint16", check_sets=None)
    manifest = _as_format_1(tmp_path / "v1")
    with pytest.raises(AfpxError, match=r"format version 1.*repack_library\("):
        load_library(manifest)
    meta = repack_library(manifest, tmp_path / "again")
    assert meta["format_version"] == 2 and meta["repacked_from"]["format_version"] == 1
    got = load_library(tmp_path / "again" / "default_library.json")
    _same(library, got)
    assert np.array_equal(np.asarray(got.log_likelihood), want)
    # in place, and only format 1
    repack_library(manifest)
    load_library(manifest)
    with pytest.raises(AfpxError, match="only format 1 is repacked"):
        repack_library(manifest)
    with pytest.raises(AfpxError, match="cannot read manifest"):
        repack_library(tmp_path / "none.json")
    (tmp_path / "x.json").write_text("[]")
    with pytest.raises(AfpxError, match="not an afpx template library manifest"):
        repack_library(tmp_path / "x.json")
    meta = json.loads(manifest.read_text())
    meta["format_version"] = 1
    manifest.write_text(json.dumps(meta))
    with pytest.raises(AfpxError, match="was changed since it was packed"):
        repack_library(manifest)


@pytest.mark.filterwarnings("ignore::afpx.AfpxWarning")  # elements the test library lacks
def test_a_ranking_reads_only_its_elements_columns(
    library: TemplateLibrary, tmp_path: Path
) -> None:
    from afpx.templates.library import LazyLogLikelihood

    pack_library(library, tmp_path, quantise="uint16", check_sets=None)
    loaded = load_library(tmp_path / "default_library.json")
    lazy = loaded.log_likelihood
    assert isinstance(lazy, LazyLogLikelihood) and lazy.shape == (loaded.n_sites, 118)
    rank([MN, GE], library=loaded, top=3)
    assert "columns read=2)" in repr(lazy)
    # columns equal the same columns of the whole array, read once
    part = lazy[:, [GE - 1, MN - 1]]
    assert lazy[:, MN - 1].shape == (loaded.n_sites,)
    whole = np.asarray(lazy)
    assert np.array_equal(part, whole[:, [GE - 1, MN - 1]])
    assert np.array_equal(lazy[3:5], whole[3:5]) and len(lazy) == loaded.n_sites
    assert np.array_equal(lazy.astype(np.float64), whole.astype(np.float64))
    assert np.array_equal(lazy - whole, np.zeros_like(whole))
    assert np.array_equal(whole - lazy, np.zeros_like(whole))
    assert "columns read=118" in repr(lazy)


@pytest.mark.filterwarnings("ignore::afpx.AfpxWarning")  # elements the test library lacks
def test_a_loaded_library_pickles_for_process_workers(
    library: TemplateLibrary, tmp_path: Path
) -> None:
    import pickle

    pack_library(library, tmp_path, quantise="uint16", check_sets=None)
    loaded = load_library(tmp_path / "default_library.json")
    rank([MN, GE], library=loaded, top=3)  # some columns read, some not
    again = pickle.loads(pickle.dumps(loaded))
    assert "columns read=2)" in repr(again.log_likelihood)
    assert np.array_equal(np.asarray(again.log_likelihood), np.asarray(loaded.log_likelihood))
    a = rank([MN, GE, OX], library=again, top=5)
    b = rank([MN, GE, OX], library=loaded, top=5)
    assert a.identical(b)


def test_bad_likelihood_columns_are_refused(library: TemplateLibrary, tmp_path: Path) -> None:
    from afpx.templates.library import LazyLogLikelihood

    short = LazyLogLikelihood(5, lambda z: np.zeros(4, dtype=np.float32))
    with pytest.raises(AfpxError, match=r"column of Z = 3 has shape \(4,\), expected \(5,\)"):
        short[:, 2]
    pack_library(library, tmp_path, quantise="uint16", check_sets=None)
    manifest = tmp_path / "default_library.json"
    meta = json.loads(manifest.read_text())
    meta["layout"]["log_likelihood"]["n_sites"] += 1
    meta[MANIFEST_DIGEST_KEY] = manifest_digest(meta)
    manifest.write_text(json.dumps(meta))
    with pytest.raises(AfpxError, match="log_likelihood columns have"):
        load_library(manifest)
    # a column missing from the archive is named at load
    meta["layout"]["log_likelihood"]["n_sites"] -= 1
    meta["layout"]["log_likelihood"]["columns"] = "likelihood_of_{z}"
    meta[MANIFEST_DIGEST_KEY] = manifest_digest(meta)
    manifest.write_text(json.dumps(meta))
    with pytest.raises(AfpxError, match=r"lacks \['likelihood_of_1"):
        load_library(manifest)


def test_train_default_redoes_outputs_of_another_model(tmp_path: Path) -> None:
    """A cube or report left by another model's run is not skipped as done."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "train_default.py"
    spec = importlib.util.spec_from_file_location("train_default", path)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    model = tmp_path / "model"
    model.mkdir()
    (model / "model.pt").write_bytes(b"weights")
    sha = script.model_sha256(model)
    cube = tmp_path / "cube.zarr"
    assert script.likelihood_model(cube) is None
    (cube / "likelihood").mkdir(parents=True)
    meta = {"attributes": {"model_sha256": "old"}}
    (cube / "likelihood" / "zarr.json").write_text(json.dumps(meta))
    assert script.likelihood_model(cube) == "old" != sha
    report = tmp_path / "evaluation"
    report.mkdir()
    (report / "metrics.json").write_text(json.dumps({"likelihood": {"model_sha256": sha}}))
    # the current model's report stays
    assert script.stale("evaluate", report, script.evaluation_model(report), sha).exists()
    # another model's report is removed, so the step runs again
    (report / "metrics.json").write_text(json.dumps({"likelihood": {"model_sha256": "old"}}))
    assert not script.stale("evaluate", report, script.evaluation_model(report), sha).exists()
    assert not report.exists()
