"""Streaming, oversampling, schedules, training, checkpoints and resume."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from _cube_helpers import make_synthetic_cube
from _model_helpers import tiny_model_config, tiny_train_config, train_tiny_model
from click.testing import CliRunner

from afpx import AfpxError, schema
from afpx.checkpoint import check_fingerprint, load_model, write_manifest
from afpx.cli import main
from afpx.train import (
    AFPStream,
    CubeIndex,
    TrainConfig,
    balanced_counts,
    make_loader,
    train,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def cube(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_cube(tmp_path_factory.mktemp("cube") / "cube.zarr", n_structures=60)


@pytest.fixture(scope="module")
def trained(cube: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_model(cube, tmp_path_factory.mktemp("model") / "m")


# -- streaming -------------------------------------------------------------------


def test_stream_yields_every_train_site_once_per_epoch(cube: Path) -> None:
    index = CubeIndex.load(cube)
    train_sites = np.flatnonzero(index.site_split == "train")
    stream = AFPStream(cube, split="train", batch_size=5, index=index)
    afp = zarr.open_group(str(cube), mode="r")[schema.AFP][:]
    orders = []
    for epoch in range(2):
        stream.set_epoch(epoch)
        batches = list(stream.batches())
        seen = np.concatenate([b["site"] for b in batches])
        assert np.array_equal(np.sort(seen), train_sites)
        assert all(len(b["site"]) == 5 for b in batches[:-1])
        # every array of a batch belongs to its sites
        for b in batches:
            np.testing.assert_array_equal(b[schema.AFP], afp[b["site"]])
            np.testing.assert_array_equal(b[schema.Z], index.z[b["site"]])
            np.testing.assert_array_equal(b[schema.R0], index.r0[b["site"]])
        orders.append(seen)
    assert not np.array_equal(orders[0], orders[1])  # reshuffled per epoch


def test_stream_shards_chunks_across_workers(cube: Path) -> None:
    stream = AFPStream(cube, split="train", batch_size=4)
    parts = [
        np.concatenate([b["site"] for b in stream.batches(worker=w, n_workers=3)]) for w in range(3)
    ]
    allsites = np.concatenate(parts)
    assert np.array_equal(np.sort(allsites), stream.sites)
    chunk_sets = [set(p // stream.index.chunk_sites) for p in parts]
    assert not (chunk_sets[0] & chunk_sets[1]) and not (chunk_sets[1] & chunk_sets[2])


def test_dataloader_with_a_worker_process(cube: Path) -> None:
    stream = AFPStream(cube, split="holdout", batch_size=8, shuffle=False)
    seen = np.concatenate([b["site"].numpy() for b in make_loader(stream, num_workers=1)])
    assert np.array_equal(np.sort(seen), stream.sites)


def test_unshuffled_stream_is_in_site_order(cube: Path) -> None:
    stream = AFPStream(cube, split=None, batch_size=7, shuffle=False)
    seen = np.concatenate([b["site"] for b in stream.batches()])
    assert np.array_equal(seen, np.arange(stream.index.n_sites))


def test_oversampled_epoch_balances_elements(cube: Path) -> None:
    index = CubeIndex.load(cube)
    stream = AFPStream(cube, split="train", batch_size=8, oversample=True, index=index)
    z_train = index.z[stream.sites]
    elements, natural = np.unique(z_train, return_counts=True)
    assert natural.max() > 3 * natural.min()  # the synthetic cube is imbalanced
    totals = np.zeros(len(elements))
    n_epochs = 30
    for epoch in range(n_epochs):
        stream.set_epoch(epoch)
        seen = np.concatenate([b["site"] for b in stream.batches()])
        assert len(seen) == len(stream.sites)  # epoch size = train size
        assert set(seen) <= set(stream.sites)
        totals += np.array([(index.z[seen] == e).sum() for e in elements])
    share = totals / totals.sum()
    np.testing.assert_allclose(share, 1 / len(elements), atol=0.03)


def test_balanced_counts() -> None:
    rng = np.random.default_rng(0)
    z = np.array([1] * 90 + [2] * 10)
    c = balanced_counts(z, 100_000, rng)
    assert c.sum() == 100_000
    assert abs(c[z == 1].sum() - 50_000) < 1_000
    uniform = balanced_counts(z, 100_000, rng, power=0.0)
    assert abs(uniform[z == 1].sum() - 90_000) < 1_000
    assert balanced_counts(np.zeros(0), 5, rng).size == 0


def test_max_sites_takes_whole_chunks(cube: Path) -> None:
    full = AFPStream(cube, split="train", batch_size=8)
    capped = AFPStream(cube, split="train", batch_size=8, max_sites=20)
    assert 20 <= len(capped) < len(full)
    assert set(capped.sites) <= set(full.sites)


# -- schedules -----------------------------------------------------------------


def test_paper_schedule() -> None:
    cfg = TrainConfig()
    assert cfg.batch_size == 16
    assert cfg.learning_rate(0) == pytest.approx(3e-7)
    assert cfg.learning_rate(16 * 1000) == pytest.approx(3e-7 + 1000 * 3e-10)
    peak_at = (3e-5 - 3e-7) / 3e-10  # 99,000 batches
    assert cfg.learning_rate(int(16 * (peak_at + 10))) == pytest.approx(3e-5)
    assert cfg.learning_rate(int(16 * (peak_at + 4999))) == pytest.approx(3e-5)
    assert cfg.learning_rate(int(16 * (peak_at + 5001))) == pytest.approx(2.25e-5)
    assert cfg.kl_weight(0) == pytest.approx(0.01)
    assert cfg.kl_weight(16 * 100) == pytest.approx(0.11)
    assert cfg.kl_weight(16 * 10_000) == pytest.approx(1.0)
    assert (cfg.adam_betas, cfg.adam_eps, cfg.l2, cfg.pos_weight) == (
        (0.9, 0.999),
        1e-8,
        5e-4,
        118.0,
    )


def test_schedule_scales_with_batch_size() -> None:
    cfg = TrainConfig(batch_size=64)
    # the same number of examples gives the same schedule position
    assert cfg.kl_weight(16 * 100) == pytest.approx(TrainConfig().kl_weight(16 * 100))
    # learning rates times sqrt(64 / 16)
    assert cfg.learning_rate(16 * 1000) == pytest.approx(2 * TrainConfig().learning_rate(16 * 1000))
    linear = TrainConfig(batch_size=64, lr_batch_exponent=1.0)
    assert linear.learning_rate(0) == pytest.approx(4 * 3e-7)


def test_train_config_round_trip_and_errors() -> None:
    for name in ("paper", "small"):
        cfg = TrainConfig.preset_config(name)
        assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(AfpxError, match="unknown training preset"):
        TrainConfig.preset_config("fast")
    with pytest.raises(AfpxError, match="unknown training configuration keys: x"):
        TrainConfig.from_dict({"x": 1})
    with pytest.raises(AfpxError, match="batch_size must be >= 1"):
        TrainConfig(batch_size=0)
    with pytest.raises(AfpxError, match="num_workers must be >= 0"):
        TrainConfig(num_workers=-1)
    with pytest.raises(AfpxError, match="learning rates must be positive"):
        TrainConfig(lr_peak=0)


# -- training --------------------------------------------------------------------


def test_tiny_model_overfits_tiny_separable_cube(trained: Path, cube: Path) -> None:
    rows = json.loads((trained / "metrics.json").read_text())
    first, last = rows[0], rows[-1]
    assert last["train_sigmoid_bce"] < 0.25 * first["train_sigmoid_bce"]
    assert last["train_softmax_ce"] < 0.5 * first["train_softmax_ce"]
    assert last["train_reconstruction"] < first["train_reconstruction"]
    # predictions on the training sites are mostly right
    model = load_model(trained)
    stream = AFPStream(cube, split="train", batch_size=64, shuffle=False)
    right = total = 0
    for b in stream.batches():
        out = model.net(
            *(torch.from_numpy(b[k]) for k in (schema.AFP, schema.R0, schema.DMIN_RATIO))
        )
        right += int((out.sigmoid_logits.argmax(1) + 1 == torch.from_numpy(b[schema.Z])).sum())
        total += len(b["site"])
    assert right / total > 0.9
    # every term is logged for training and validation, per epoch
    for term in (
        "reconstruction",
        "kl",
        "sigmoid_bce",
        "softmax_ce",
        "l2",
        "total",
        "softmax_error",
    ):
        assert f"train_{term}" in last and f"val_{term}" in last
    assert (trained / "metrics.csv").read_text().count("\n") == len(rows) + 1


def test_non_separable_cube_is_not_learned(tmp_path: Path) -> None:
    # control for the overfit test: the same recipe cannot generalise from noise
    noise = make_synthetic_cube(tmp_path / "noise.zarr", n_structures=60, separable=False)
    model_dir = train_tiny_model(noise, tmp_path / "m", epochs=4)
    rows = json.loads((model_dir / "metrics.json").read_text())
    assert rows[-1]["val_sigmoid_error"] > 0.4


def test_checkpoint_loads_with_weights_only_and_round_trips(trained: Path) -> None:
    state = torch.load(trained / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    torch.load(trained / "state.pt", weights_only=True)
    meta = json.loads((trained / "config.json").read_text())
    assert meta["model"]["preset"] == "tiny"
    assert meta["fingerprint"]["r_max"] == 6.0
    a, b = load_model(trained), load_model(trained)
    x = torch.rand(5, 12, 256) * 5
    r0, d = torch.full((5,), 2.0), torch.full((5,), 0.9)
    oa, ob = a.net(x, r0, d), b.net(x, r0, d)
    assert torch.equal(oa.sigmoid_logits, ob.sigmoid_logits)
    assert torch.equal(oa.softmax_logits, ob.softmax_logits)
    assert a.weights_sha256 == b.weights_sha256 and len(a.weights_sha256) == 64


def test_resume_continues_from_saved_step(cube: Path, tmp_path: Path) -> None:
    full = train_tiny_model(cube, tmp_path / "full", epochs=2)
    part = train_tiny_model(cube, tmp_path / "part", epochs=1)
    step1 = json.loads((part / "config.json").read_text())["step"]
    train(cube, part, train_config=tiny_train_config(epochs=2), resume=True, progress=False)
    meta_full = json.loads((full / "config.json").read_text())
    meta_part = json.loads((part / "config.json").read_text())
    assert meta_part["step"] == meta_full["step"] == 2 * step1
    rows = json.loads((part / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2]
    sa = torch.load(full / "model.pt", weights_only=True)
    sb = torch.load(part / "model.pt", weights_only=True)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], msg=k)


def test_training_errors(cube: Path, trained: Path, tmp_path: Path) -> None:
    with pytest.raises(AfpxError, match="already holds a model; use --resume"):
        train_tiny_model(cube, trained)
    with pytest.raises(AfpxError, match="nothing to resume"):
        train(cube, tmp_path / "empty", resume=True)
    with pytest.raises(AfpxError, match="does not exist"):
        train(tmp_path / "nope.zarr", tmp_path / "m")
    (tmp_path / "plain").mkdir()
    with pytest.raises(AfpxError, match="is not a zarr store"):
        train(tmp_path / "plain", tmp_path / "m")
    with pytest.raises(AfpxError, match="unknown device 'tpu'"):
        train(cube, tmp_path / "m2", device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(AfpxError, match="torch sees no CUDA device"):
            train(cube, tmp_path / "m3", device="cuda")


def test_training_diverges_with_a_clear_error(cube: Path, tmp_path: Path) -> None:
    with pytest.raises(AfpxError, match="training diverged"):
        train_tiny_model(cube, tmp_path / "m", lr_start=1e12, lr_peak=1e12, lr_final=1e12, epochs=2)


def test_cube_without_train_split_or_variables(tmp_path: Path) -> None:
    cube = make_synthetic_cube(tmp_path / "c.zarr", n_structures=6)
    g = zarr.open_group(str(cube), mode="r+")
    split = g[schema.SPLIT]
    split[:] = np.array(["test"] * split.shape[0], dtype=object)
    with pytest.raises(AfpxError, match="no sites in the train split"):
        train_tiny_model(cube, tmp_path / "m")
    del g[schema.Z]
    with pytest.raises(AfpxError, match="training needs z, which the cube"):
        CubeIndex.load(cube)


def test_refuses_cube_with_other_fingerprint_parameters(
    cube: Path, trained: Path, tmp_path: Path
) -> None:
    other = make_synthetic_cube(tmp_path / "other.zarr", n_structures=10)
    g = zarr.open_group(str(other), mode="r+")
    fp = dict(g.attrs["fingerprint"])
    fp["r_max"] = 8.0
    fp["kaiser_beta"] = 10.0
    g.attrs["fingerprint"] = fp
    import shutil

    resumed = tmp_path / "resumed"
    shutil.copytree(trained, resumed)
    with pytest.raises(AfpxError, match=r"differ from the model's in kaiser_beta, r_max"):
        train(other, resumed, resume=True)
    with pytest.raises(AfpxError, match="extra"):
        check_fingerprint({"a": 1}, {"a": 1, "extra": 2})
    check_fingerprint({"a": [1, 2]}, {"a": (1, 2)})


def test_load_model_errors(tmp_path: Path, trained: Path) -> None:
    with pytest.raises(AfpxError, match="is not an afpx model folder"):
        load_model(tmp_path)
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(trained, bad)
    meta = json.loads((bad / "config.json").read_text())
    meta["format"] = "other/9"
    (bad / "config.json").write_text(json.dumps(meta))
    # an edited file no longer matches the manifest written last by afpx train
    with pytest.raises(AfpxError, match=r"config\.json' differs from its SHA-256"):
        load_model(bad)
    write_manifest(bad, ["model.pt", "config.json"])
    with pytest.raises(AfpxError, match="has format 'other/9'"):
        load_model(bad)


def test_load_model_refuses_corrupt_folders(tmp_path: Path, trained: Path) -> None:
    import shutil

    flipped = tmp_path / "flipped"
    shutil.copytree(trained, flipped)
    data = bytearray((flipped / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit
    (flipped / "model.pt").write_bytes(bytes(data))
    with pytest.raises(AfpxError, match=r"model\.pt' differs from its SHA-256"):
        load_model(flipped)

    unlisted = tmp_path / "unlisted"
    shutil.copytree(trained, unlisted)
    (unlisted / "manifest.json").unlink()
    with pytest.raises(AfpxError, match=r"has no manifest\.json"):
        load_model(unlisted)

    pickled = tmp_path / "pickled"
    shutil.copytree(trained, pickled)
    torch.save({"weights": AfpxError("not a tensor")}, pickled / "model.pt")
    write_manifest(pickled, ["model.pt", "config.json"])
    with pytest.raises(AfpxError, match="pickled objects are refused"):
        load_model(pickled)

    garbled = tmp_path / "garbled"
    shutil.copytree(trained, garbled)
    (garbled / "config.json").write_text("{not json")
    write_manifest(garbled, ["model.pt", "config.json"])
    with pytest.raises(AfpxError, match="cannot read the model configuration"):
        load_model(garbled)

    truncated = tmp_path / "truncated"
    shutil.copytree(trained, truncated)
    (truncated / "model.pt").write_bytes((trained / "model.pt").read_bytes()[:100])
    write_manifest(truncated, ["model.pt", "config.json"])
    with pytest.raises(AfpxError, match=r"cannot load .* as afpx weights"):
        load_model(truncated)


def test_resume_after_a_kill_between_files_trains_no_epoch_twice(
    cube: Path, tmp_path: Path
) -> None:
    full = train_tiny_model(cube, tmp_path / "full", epochs=2)
    part = train_tiny_model(cube, tmp_path / "part", epochs=1)
    state_after_1 = (part / "state.pt").read_bytes()
    train(cube, part, train_config=tiny_train_config(epochs=2), resume=True, progress=False)
    # a kill after model.pt, config and metrics of epoch 2 but before its state.pt
    (part / "state.pt").write_bytes(state_after_1)
    train(cube, part, train_config=tiny_train_config(epochs=2), resume=True, progress=False)
    rows = json.loads((part / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2]
    sa = torch.load(full / "model.pt", weights_only=True)
    sb = torch.load(part / "model.pt", weights_only=True)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], msg=k)
    load_model(part)  # the manifest matches again


def test_onecycle_schedule() -> None:
    cfg = TrainConfig(
        lr_schedule="onecycle", lr_start=1e-4, lr_peak=1e-2, lr_final=1e-5, warmup_fraction=0.2
    )
    assert cfg.learning_rate(0, 1000) == pytest.approx(1e-4)
    assert cfg.learning_rate(100, 1000) == pytest.approx(0.5 * (1e-4 + 1e-2))
    assert cfg.learning_rate(200, 1000) == pytest.approx(1e-2)
    assert cfg.learning_rate(600, 1000) == pytest.approx(0.5 * (1e-2 + 1e-5))
    assert cfg.learning_rate(1000, 1000) == pytest.approx(1e-5)
    lrs = [cfg.learning_rate(k, 1000) for k in range(200, 1001, 50)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))
    with pytest.raises(AfpxError, match="needs the total number of examples"):
        cfg.learning_rate(10)
    with pytest.raises(AfpxError, match="lr_schedule must be one of"):
        TrainConfig(lr_schedule="cosine")
    with pytest.raises(AfpxError, match="warmup_fraction"):
        TrainConfig(warmup_fraction=1.0)
    with pytest.raises(AfpxError, match="weight_decay and l2"):
        TrainConfig(weight_decay=-1.0)


def test_context_model_trains_keeps_best_and_scores(cube: Path, tmp_path: Path) -> None:
    from afpx.likelihood import predict, score_afp

    out = train_tiny_model(
        cube,
        tmp_path / "ctx",
        model={"architecture": "mlp", "perspective_input": "mean", "descriptor_input": "context",
               "layer_norm": True},
        epochs=4,
        keep_best=True,
        pos_weight=1.0,
    )  # fmt: skip
    meta = json.loads((out / "config.json").read_text())
    rows = json.loads((out / "metrics.json").read_text())
    errors = [r["val_softmax_error"] for r in rows]
    assert meta["model_epoch"] == 1 + int(np.argmin(errors))
    m = load_model(out)
    assert m.needs_context and type(m.net).__name__ == "SiteNet"
    # the weights in model.pt are those of the best epoch, state.pt holds the last
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["epoch"] == 3 and state["best"]["epoch"] == meta["model_epoch"]
    afp = np.random.default_rng(0).random((3, 12, 256), dtype=np.float32)
    with pytest.raises(AfpxError, match="reads the template context"):
        score_afp(m, afp, np.ones(3), np.ones(3))
    with pytest.raises(AfpxError, match="context has 2 rows for 3 sites"):
        score_afp(m, afp, np.ones(3), np.ones(3), context=np.zeros((2, 266), np.float32))
    with pytest.raises(AfpxError, match="reads 266 columns per site: call site_context without"):
        score_afp(m, afp, np.ones(3), np.ones(3), context=np.zeros((3, 526), np.float32))
    import shutil

    scored = tmp_path / "scored.zarr"
    shutil.copytree(cube, scored)
    ds = predict(scored, m, progress=False)
    lik = ds[schema.LIKELIHOOD].values
    assert lik.shape == (ds.sizes[schema.SITE], 118)
    assert np.all((lik >= 0) & (lik <= 1))
    # the likelihoods depend on the rest of the structure, through the context
    from afpx.likelihood import dataset_context

    ctx = dataset_context(ds, m)
    assert ctx is not None
    a = ds[schema.AFP].values[:20]
    r0, dmin = ds[schema.R0].values[:20], ds[schema.DMIN_RATIO].values[:20]
    with_ctx, _ = score_afp(m, a, r0, dmin, context=ctx[:20])
    np.testing.assert_allclose(with_ctx, lik[:20], rtol=1e-5, atol=1e-6)
    shuffled, _ = score_afp(m, a, r0, dmin, context=ctx[::-1][:20])
    assert not np.allclose(shuffled, with_ctx)


# -- command line ------------------------------------------------------------------


def test_cli_train_and_resume(cube: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli-model"
    args = [
        "train", str(cube), "-o", str(out), "--preset", "small", "--epochs", "1",
        "--batch-size", "32",
        "--set", "encoder_channels=[8]", "--set", "classifier_hidden=16", "--set", "latent_dim=4",
        "--set", "standardisation_examples=100", "--no-progress",
    ]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "trained 1 epochs" in result.output
    meta = json.loads((out / "config.json").read_text())
    assert meta["model"]["encoder_channels"] == [8]
    assert meta["train"]["batch_size"] == 32 and meta["train"]["preset"] == "small"
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and "--resume" in again.output
    base = ["train", str(cube), "-o", str(out), "--no-progress", "--resume"]
    refused = CliRunner().invoke(main, [*base, "--batch-size", "64", "--set", "l2=0"])
    assert refused.exit_code == 2 and "not batch_size, set" in refused.output
    resumed = CliRunner().invoke(main, [*base, "--epochs", "2", "--threads", "1"])
    assert resumed.exit_code == 0, resumed.output
    meta = json.loads((out / "config.json").read_text())
    assert meta["epochs_done"] == 2 and meta["train"]["batch_size"] == 32
    # without --epochs, the saved number of epochs stands: nothing more to do
    again = CliRunner().invoke(main, base)
    assert again.exit_code == 0, again.output
    assert json.loads((out / "config.json").read_text())["epochs_done"] == 2


def test_cli_train_bad_set(cube: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(
        main, ["train", str(cube), "-o", str(tmp_path / "m"), "--set", "colour=red"]
    )
    assert r.exit_code == 2 and "unknown --set key(s) colour" in r.output
    r = CliRunner().invoke(main, ["train", str(cube), "-o", str(tmp_path / "m"), "--set", "nokey"])
    assert r.exit_code == 2 and "KEY=VALUE" in r.output


def test_tiny_configs_are_valid() -> None:
    assert tiny_model_config().preset == "tiny"
    assert tiny_train_config(epochs=3).epochs == 3


def test_random_site_split_is_the_papers_protocol() -> None:
    from afpx.splits import random_site_split

    structure = np.repeat(np.arange(2000), 5)
    site_index = np.tile(np.arange(5), 2000)
    split = random_site_split(structure, site_index, seed=3)
    share = {s: float(np.mean(split == s)) for s in ("train", "holdout", "test")}
    assert share == pytest.approx({"train": 0.6, "holdout": 0.2, "test": 0.2}, abs=0.02)
    # sites of one structure are shared between splits (unlike the composition split)
    per_structure = {frozenset(split[structure == s]) for s in range(50)}
    assert any(len(p) > 1 for p in per_structure)
    # draws of one unique site stay together; the seed decides
    twice = random_site_split(np.repeat(structure, 2), np.repeat(site_index, 2), seed=3)
    np.testing.assert_array_equal(twice[::2], twice[1::2])
    assert not np.array_equal(split, random_site_split(structure, site_index, seed=4))
    with pytest.raises(AfpxError, match="summing to 1"):
        random_site_split(structure, site_index, fractions=(0.5, 0.2, 0.2))
    with pytest.raises(AfpxError, match="differ in length"):
        random_site_split(structure, site_index[:3])
    with pytest.raises(AfpxError, match="split_protocol must be"):
        TrainConfig(split_protocol="random")


def test_site_protocol_changes_which_sites_train(cube: Path) -> None:
    by_comp = CubeIndex.load(cube)
    by_site = CubeIndex.load(cube, split_protocol="site", seed=0)
    assert set(by_site.site_split) == {"train", "holdout", "test"}
    assert not np.array_equal(by_comp.site_split, by_site.site_split)


def test_wrong_config_types_are_refused_before_anything_is_written(
    cube: Path, tmp_path: Path
) -> None:
    from afpx.model import ModelConfig

    with pytest.raises(AfpxError, match="'kl_max' must be float, got 'abc'"):
        TrainConfig.preset_config("small", kl_max="abc")
    with pytest.raises(AfpxError, match=r"'classifier_hidden' must be int, got 1\.5"):
        ModelConfig.preset_config("context", classifier_hidden=1.5)
    with pytest.raises(AfpxError, match="'keep_best' must be bool"):
        TrainConfig.from_dict({"keep_best": "yes"})
    assert TrainConfig.from_dict({"lr_peak": 1, "val_max_sites": None}).lr_peak == 1.0
    assert ModelConfig.from_dict({"encoder_channels": [8, 16]}).encoder_channels == (8, 16)
    out = tmp_path / "never"
    result = CliRunner().invoke(main, ["train", str(cube), "-o", str(out), "--set", "kl_max=abc"])
    assert result.exit_code == 2 and "'kl_max' must be float" in result.output
    assert not out.exists()


def test_time_limit_stops_after_an_epoch_and_mixed_precision_runs(
    cube: Path, tmp_path: Path
) -> None:
    out = train_tiny_model(cube, tmp_path / "limited", epochs=5, time_limit_s=0.0)
    rows = json.loads((out / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == [1]
    load_model(out)
    # bfloat16 autocast on the CPU: the loop runs and the losses stay finite
    amp = train_tiny_model(cube, tmp_path / "amp", epochs=1, mixed_precision=True)
    row = json.loads((amp / "metrics.json").read_text())[0]
    assert np.isfinite(row["train_total"])
