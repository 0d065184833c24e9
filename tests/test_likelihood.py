"""Site likelihoods written back into the cube."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from _cube_helpers import make_synthetic_cube
from _model_helpers import train_tiny_model
from click.testing import CliRunner

from afpx import AfpxError, schema
from afpx.checkpoint import load_model
from afpx.cli import main
from afpx.likelihood import (
    _block_ends,
    draw_means,
    predict,
    require_likelihood,
    score_afp,
    site_likelihood,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("lik")
    cube = make_synthetic_cube(base / "train.zarr", n_structures=60)
    return train_tiny_model(cube, base / "model", epochs=6)


def _open(path: Path) -> xr.Dataset:
    return xr.open_zarr(path, consolidated=False)


def test_write_back(model_dir: Path, tmp_path: Path) -> None:
    cube = make_synthetic_cube(tmp_path / "c.zarr", n_structures=20, seed=3)
    before = zarr.open_group(str(cube), mode="r")
    afp_before = before[schema.AFP][:]
    attrs_before = dict(before.attrs)
    ds = predict(cube, model_dir, block_sites=10)
    n = ds.sizes[schema.SITE]
    lik = ds[schema.LIKELIHOOD]
    assert lik.dims == (schema.SITE, schema.ELEMENT) and lik.shape == (n, 118)
    assert lik.dtype == np.float32
    values = lik.values
    assert np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1
    assert list(ds[schema.ELEMENT].values) == list(range(1, 119))
    assert ds[schema.SYMBOL].values[24] == "Mn"
    pred = ds[schema.SOFTMAX_PRED]
    assert pred.dtype == np.int16 and pred.shape == (n,)
    assert pred.values.min() >= 1 and pred.values.max() <= 118
    assert schema.LIKELIHOOD_MEAN not in ds  # one draw
    # afp and the root attributes untouched
    after = zarr.open_group(str(cube), mode="r")
    np.testing.assert_array_equal(after[schema.AFP][:], afp_before)
    assert dict(after.attrs) == attrs_before
    # model identity in the attributes
    m = load_model(model_dir)
    assert lik.attrs["model_sha256"] == m.weights_sha256
    assert lik.attrs["complete"] is True and lik.attrs["used_for_ranking"] is True
    # equals scoring the same fingerprints in memory
    ref, ref_pred = score_afp(m, afp_before, after[schema.R0][:], after[schema.DMIN_RATIO][:])
    np.testing.assert_allclose(values, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(pred.values, ref_pred)
    # the model scores the synthetic elements well on new structures
    z = ds[schema.Z].values
    assert (values.argmax(1) + 1 == z).mean() > 0.6
    # writing again (another model, or the same) replaces the variables
    ds2 = predict(cube, m, block_sites=1000)
    np.testing.assert_allclose(ds2[schema.LIKELIHOOD].values, values, rtol=1e-5, atol=1e-6)


def test_draws_give_likelihood_mean(model_dir: Path, tmp_path: Path) -> None:
    cube = make_synthetic_cube(tmp_path / "d.zarr", n_structures=8, draws=3, seed=5)
    ds = predict(cube, model_dir, block_sites=4)  # blocks never split the draws of a site
    lik = ds[schema.LIKELIHOOD].values
    mean = ds[schema.LIKELIHOOD_MEAN].values
    draw = ds[schema.DRAW].values
    assert ds[schema.LIKELIHOOD_MEAN].attrs["used_for_ranking"] is True
    assert ds[schema.LIKELIHOOD].attrs["used_for_ranking"] is False
    starts = np.flatnonzero(draw == 0)
    for a in starts:
        np.testing.assert_allclose(
            mean[a : a + 3], np.broadcast_to(lik[a : a + 3].mean(0), (3, 118)), rtol=1e-5
        )
    # ranking uses the mean on the sites with draw 0
    chosen = site_likelihood(ds)
    assert chosen.name == schema.LIKELIHOOD_MEAN and chosen.sizes[schema.SITE] == len(starts)


def test_draw_means_of_consecutive_draws() -> None:
    v = np.arange(10, dtype=np.float32).reshape(5, 2)
    out = draw_means(v, np.array([0, 1, 0, 1, 2]))
    np.testing.assert_allclose(out, [[1, 2], [1, 2], [6, 7], [6, 7], [6, 7]])


def test_require_likelihood_names_the_command(model_dir: Path, tmp_path: Path) -> None:
    cube = make_synthetic_cube(tmp_path / "e.zarr", n_structures=4)
    with pytest.raises(AfpxError, match=r"afpx likelihood CUBE --model MODEL"):
        require_likelihood(_open(cube))
    with pytest.raises(AfpxError, match=r"afpx likelihood CUBE --model MODEL"):
        site_likelihood(_open(cube))
    ds = predict(cube, model_dir)
    require_likelihood(ds)
    zarr.open_group(str(cube), mode="r+")[schema.LIKELIHOOD].attrs["complete"] = False
    with pytest.raises(AfpxError, match="not completely written"):
        require_likelihood(_open(cube))


def test_refuses_other_fingerprint_parameters(model_dir: Path, tmp_path: Path) -> None:
    cube = make_synthetic_cube(tmp_path / "f.zarr", n_structures=4)
    g = zarr.open_group(str(cube), mode="r+")
    g.attrs["fingerprint"] = {**g.attrs["fingerprint"], "n_fine_bins": 2048}
    with pytest.raises(AfpxError, match="differ from the model's in n_fine_bins"):
        predict(cube, model_dir)
    assert schema.LIKELIHOOD not in zarr.open_group(str(cube), mode="r")


def test_cube_without_fingerprints(model_dir: Path, tmp_path: Path) -> None:
    cube = make_synthetic_cube(tmp_path / "g.zarr", n_structures=4)
    del zarr.open_group(str(cube), mode="r+")[schema.R0]
    with pytest.raises(AfpxError, match="site likelihoods need r0"):
        predict(cube, model_dir)


def test_score_afp_errors(model_dir: Path) -> None:
    with pytest.raises(AfpxError, match=r"afp has shape \(2, 12, 100\)"):
        score_afp(model_dir, np.zeros((2, 12, 100)), np.ones(2), np.ones(2))
    with pytest.raises(AfpxError, match="afp, r0 and dmin_ratio have 2, 3, 2 sites"):
        score_afp(model_dir, np.zeros((2, 12, 256)), np.ones(3), np.ones(2))


def test_cli_likelihood(model_dir: Path, tmp_path: Path) -> None:
    cube = make_synthetic_cube(tmp_path / "h.zarr", n_structures=6)
    r = CliRunner().invoke(
        main,
        ["likelihood", str(cube), "--model", str(model_dir), "--no-progress", "--threads", "1"],
    )
    assert r.exit_code == 0, r.output
    assert "wrote likelihood, softmax_pred for" in r.output
    bad = tmp_path / "bad-model"
    shutil.copytree(model_dir, bad)
    (bad / "config.json").unlink()
    r = CliRunner().invoke(main, ["likelihood", str(cube), "--model", str(bad)])
    assert r.exit_code == 2 and "is not an afpx model folder" in r.output


def test_score_structures(model_dir: Path) -> None:
    from pymatgen.core import Lattice, Structure

    from afpx.likelihood import score_structures

    nacl = Structure.from_spacegroup(
        "Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]
    )
    cscl = Structure(Lattice.cubic(4.12), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    ds = score_structures([nacl, cscl], model_dir)
    assert ds[schema.LIKELIHOOD].shape == (4, 118)  # two unique sites each
    values = ds[schema.LIKELIHOOD].values
    assert values.min() >= 0 and values.max() <= 1
    assert list(ds[schema.Z].values) == [11, 17, 55, 17]
    assert list(ds[schema.STRUCTURE_INDEX].values) == [0, 0, 1, 1]
    assert ds[schema.LIKELIHOOD].attrs["model_sha256"] == load_model(model_dir).weights_sha256
    from afpx.cube import FingerprintParams

    with pytest.raises(AfpxError, match="differ from the model's in r_max"):
        score_structures([nacl], model_dir, params=FingerprintParams(r_max=5.0))


# -- a second run, a killed run, two writers (nothing lost, provenance right) -------


@pytest.fixture(scope="module")
def second_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("lik2")
    cube = make_synthetic_cube(base / "train.zarr", n_structures=60)
    return train_tiny_model(cube, base / "model", epochs=2, seed=5)


def test_second_run_replaces_values_and_provenance(
    model_dir: Path, second_model: Path, tmp_path: Path
) -> None:
    cube = make_synthetic_cube(tmp_path / "c.zarr", n_structures=20, seed=3)
    first = predict(cube, model_dir, block_sites=10)[schema.LIKELIHOOD].values
    ds = predict(cube, second_model, block_sites=10)
    second_sha = load_model(second_model).weights_sha256
    for name in (schema.LIKELIHOOD, schema.SOFTMAX_PRED):
        assert ds[name].attrs["model_sha256"] == second_sha
        assert ds[name].attrs["model_path"] == str(second_model.resolve())
        assert ds[name].attrs["complete"] is True
    assert not np.allclose(ds[schema.LIKELIHOOD].values, first)
    assert not [k for k in zarr.open_group(str(cube)).array_keys() if "__" in k]
    require_likelihood(ds)


def test_killed_run_keeps_the_previous_likelihoods(
    model_dir: Path, second_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import afpx.likelihood as lk

    cube = make_synthetic_cube(tmp_path / "c.zarr", n_structures=20, seed=3)
    before = predict(cube, model_dir, block_sites=10)[schema.LIKELIHOOD].values
    calls = {"n": 0}
    real = lk.score_afp

    def dies_on_the_second_block(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as a kill would, mid-run
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(lk, "score_afp", dies_on_the_second_block)
    with pytest.raises(KeyboardInterrupt):
        predict(cube, second_model, block_sites=10)
    monkeypatch.undo()
    ds = _open(cube)
    np.testing.assert_array_equal(ds[schema.LIKELIHOOD].values, before)
    assert ds[schema.LIKELIHOOD].attrs["model_sha256"] == load_model(model_dir).weights_sha256
    require_likelihood(ds)
    # the next run cleans the partial arrays up
    predict(cube, second_model, block_sites=10)
    assert not [k for k in zarr.open_group(str(cube)).array_keys() if "__" in k]


def test_a_second_writer_is_refused_and_a_stale_lock_taken_over(
    model_dir: Path, tmp_path: Path
) -> None:
    import os
    import subprocess
    import sys

    from afpx.likelihood import lock_path

    cube = make_synthetic_cube(tmp_path / "c.zarr", n_structures=10, seed=3)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        Path(lock_path(cube)).write_text(str(sleeper.pid))
        with pytest.raises(AfpxError, match="another `afpx likelihood`"):
            predict(cube, model_dir)
        assert schema.LIKELIHOOD not in zarr.open_group(str(cube))
    finally:
        sleeper.kill()
        sleeper.wait()
    predict(cube, model_dir)  # the lock of a process that is gone is stale
    assert not os.path.exists(lock_path(cube))
    assert lock_path(cube) == str(tmp_path / ".c.zarr.afpx-likelihood.lock")


def test_mixed_models_are_refused(model_dir: Path, tmp_path: Path) -> None:
    cube = make_synthetic_cube(tmp_path / "c.zarr", n_structures=10, seed=3)
    predict(cube, model_dir)
    g = zarr.open_group(str(cube), mode="r+")
    g[schema.SOFTMAX_PRED].attrs.update({"model_sha256": "0" * 64})
    with pytest.raises(AfpxError, match="come from different models"):
        require_likelihood(_open(cube))


def test_non_finite_fingerprints_are_an_error_not_nan(model_dir: Path, tmp_path: Path) -> None:
    cube = make_synthetic_cube(tmp_path / "c.zarr", n_structures=10, seed=3)
    g = zarr.open_group(str(cube), mode="r+")
    afp = g[schema.AFP][:]
    afp[3] = np.nan
    g[schema.AFP][:] = afp
    with pytest.raises(AfpxError, match="non-finite likelihoods on sites"):
        predict(cube, model_dir)
    assert schema.LIKELIHOOD not in zarr.open_group(str(cube))


def test_local_cluster_equals_threads_bit_for_bit(model_dir: Path, tmp_path: Path) -> None:
    threads = make_synthetic_cube(tmp_path / "t.zarr", n_structures=20, seed=3, draws=2)
    cluster = Path(shutil.copytree(threads, tmp_path / "c.zarr"))
    a = predict(threads, model_dir, block_sites=10, scheduler="threads", workers=2)
    b = predict(cluster, model_dir, block_sites=10, workers=2)  # a 2-process cluster
    assert schema.LIKELIHOOD_MEAN in a
    for name in (schema.LIKELIHOOD, schema.LIKELIHOOD_MEAN, schema.SOFTMAX_PRED):
        np.testing.assert_array_equal(a[name].values, b[name].values)
    # blocks of one task each: chunk-aligned, draws of a unique site together
    assert _block_ends(np.tile([0, 1], 20), 10, 16) == [(0, 16), (16, 32), (32, 40)]
    assert _block_ends(np.tile([0, 1, 2], 10), 10, 4) == [(0, 12), (12, 24), (24, 30)]


def test_cli_likelihood_on_a_scheduler(model_dir: Path, tmp_path: Path) -> None:
    cube = make_synthetic_cube(tmp_path / "c.zarr", n_structures=10, seed=3)
    args = ["likelihood", str(cube), "--model", str(model_dir), "--scheduler", "synchronous"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "wrote likelihood, softmax_pred" in result.output
    bad = CliRunner().invoke(main, [*args[:4], "--scheduler", "thread"])
    assert bad.exit_code != 0 and "unknown scheduler 'thread'" in bad.output


def test_likelihood_written_back_to_a_url(model_dir: Path, tmp_path: Path) -> None:
    from _s3_helpers import s3_bucket

    from afpx import store

    local = make_synthetic_cube(tmp_path / "c.zarr", n_structures=12, seed=3, draws=2)
    with s3_bucket() as bucket:
        url = f"{bucket}/c.zarr"
        fs, where = store.filesystem(url)
        fs.put(str(local), where, recursive=True)
        expected = predict(local, model_dir, block_sites=10)
        ds = predict(url, model_dir, block_sites=10)
        for name in (schema.LIKELIHOOD, schema.LIKELIHOOD_MEAN, schema.SOFTMAX_PRED):
            np.testing.assert_array_equal(ds[name].values, expected[name].values)
            assert ds[name].attrs["complete"] is True
        require_likelihood(ds)
        # a failed run in place leaves arrays that say so, and ranking refuses them
        g = zarr.open_group(url, mode="r+")
        afp = g[schema.AFP][:]
        afp[20] = np.nan
        g[schema.AFP][:] = afp
        with pytest.raises(AfpxError, match=r"non-finite likelihoods on sites 16\.\.31"):
            predict(url, model_dir, block_sites=10)
        with pytest.raises(AfpxError, match="was not completely written"):
            require_likelihood(xr.open_zarr(url, consolidated=False))


def test_shell_model_scores_a_built_cube_and_structures(tmp_path: Path, data_dir: Path) -> None:
    """A ``context_shell`` model reads the cube's geometry; the two scoring paths agree."""
    from click.testing import CliRunner

    from afpx.cli import main
    from afpx.features import context_width
    from afpx.likelihood import dataset_context, predict, score_afp, score_structures
    from afpx.structures import read_structures

    cifs = sorted((data_dir / "cod").glob("*.cif"))[:6]
    cube = tmp_path / "cube.zarr"
    built = CliRunner().invoke(
        main, ["build-cube", *map(str, cifs), "-o", str(cube), "--no-progress"]
    )
    assert built.exit_code == 0, built.output
    model = train_tiny_model(
        cube,
        tmp_path / "shell",
        model={"architecture": "mlp", "perspective_input": "mean",
               "descriptor_input": "context_shell", "layer_norm": True},
        epochs=1, split_protocol="site", pos_weight=1.0,
    )  # fmt: skip
    m = load_model(model)
    assert m.needs_context and m.needs_shell
    ds = predict(cube, m, progress=False)
    lik = ds[schema.LIKELIHOOD].values
    n = ds.sizes[schema.SITE]
    ctx = dataset_context(ds, m)
    assert ctx is not None and ctx.shape == (n, context_width(256, shell=True))
    afp, r0, dmin = (ds[v].values for v in (schema.AFP, schema.R0, schema.DMIN_RATIO))
    again, _ = score_afp(m, afp, r0, dmin, context=ctx)
    np.testing.assert_allclose(again, lik, rtol=1e-5, atol=1e-6)
    # the shell matters: the same sites with the shell columns zeroed score differently
    blind = ctx.copy()
    blind[:, context_width(256) :] = 0
    assert not np.allclose(score_afp(m, afp, r0, dmin, context=blind)[0], lik, atol=1e-4)
    with pytest.raises(AfpxError, match="reads 526 columns per site: pass shell_pairs"):
        score_afp(m, afp, r0, dmin, context=ctx[:, : context_width(256)])
    # in memory, from the same structures and seed: the same likelihoods
    structures = read_structures(cifs).structures
    scored = score_structures(structures, m)
    np.testing.assert_allclose(scored[schema.LIKELIHOOD].values, lik, rtol=1e-4, atol=1e-5)
