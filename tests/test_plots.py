"""``afpx plot`` and :mod:`afpx.plots`: figures from small fixtures, clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from afpx import AfpxError, plots, schema
from afpx.cli import main

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

MAGIC = {".png": b"\x89PNG\r\n\x1a\n", ".pdf": b"%PDF", ".svg": b"<?xml"}


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ``afpx evaluate`` folder of a small synthetic cube with known likelihoods."""
    import xarray as xr
    import zarr
    from _cube_helpers import make_synthetic_cube

    from afpx.cube import COMPLETE_ATTR

    tmp = tmp_path_factory.mktemp("evaluation")
    cube = make_synthetic_cube(tmp / "cube.zarr", n_structures=24, seed=3)
    z = np.asarray(xr.open_zarr(cube, consolidated=False)[schema.Z].values).astype(int)
    lk = (0.3 * np.random.default_rng(0).random((z.size, schema.N_ELEMENTS))).astype(np.float32)
    lk[np.arange(z.size), z - 1] = 0.9
    pred = z.copy()
    pred[::3] = 26  # some wrong predictions, so that the matrix is not diagonal
    xr.Dataset(
        {
            schema.LIKELIHOOD: ((schema.SITE, schema.ELEMENT), lk),
            schema.SOFTMAX_PRED: ((schema.SITE,), pred.astype(np.int16)),
        }
    ).to_zarr(cube, mode="a", zarr_format=3, consolidated=False)
    zarr.open_group(cube, mode="r+").attrs.update({COMPLETE_ATTR: True})
    out = tmp / "report"
    result = CliRunner().invoke(
        main, ["evaluate", str(cube), "-o", str(out), "--baselines", "constant,random"]
    )
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder with a sigmoid classifier's weights and per-epoch metrics."""
    torch = pytest.importorskip("torch")
    folder = tmp_path_factory.mktemp("model")
    gen = torch.Generator().manual_seed(0)
    state = {
        "sigmoid_classifier.0.weight": torch.randn(16, 65, generator=gen),
        "sigmoid_classifier.3.weight": torch.randn(schema.N_ELEMENTS, 16, generator=gen),
        "sigmoid_classifier.3.bias": torch.zeros(schema.N_ELEMENTS),
    }
    torch.save(state, folder / "model.pt")
    rows = [
        {"epoch": e, "lr": 1e-3, "kl_weight": min(1.0, 0.2 * e), "train_total": 10.0 / e}
        | {"val_total": 11.0 / e, "train_softmax_error": 0.9 / e, "val_softmax_error": 0.95 / e}
        for e in range(1, 5)
    ]
    (folder / "metrics.json").write_text(json.dumps(rows))
    return folder


def _assert_figure_file(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000
    assert data.startswith(MAGIC[path.suffix])


@pytest.mark.parametrize(
    ("args", "suffix"),
    [
        (["afp", "{out}"], ".png"),
        (["confusion", "{eval}", "{out}"], ".svg"),
        (["likelihood", "{eval}", "{out}", "--split", "train"], ".pdf"),
        (["rank-curve", "{eval}", "{out}"], ".png"),
        (["test2", "{eval}", "{out}", "--variant", "no_own_formula"], ".svg"),
        (["elements", "{cube}", "{out}"], ".png"),
        (["training", "{out}", "--model", "{model}"], ".pdf"),
        (["tsne", "{out}", "--model", "{model}", "--perplexity", "5"], ".png"),
    ],
)
def test_each_plot_command_writes_its_format(
    tmp_path: Path, evaluation: Path, model_dir: Path, args: list[str], suffix: str
) -> None:
    out = tmp_path / f"figure{suffix}"
    cube = evaluation.parent / "cube.zarr"
    argv = [a.format(eval=evaluation, cube=cube, model=model_dir, out=out) for a in args]
    result = CliRunner().invoke(main, ["plot", *argv])
    assert result.exit_code == 0, result.output
    _assert_figure_file(out)


def test_training_and_tsne_default_to_the_shipped_model(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    for name in ("training", "tsne"):
        out = tmp_path / f"{name}.png"
        result = CliRunner().invoke(main, ["plot", name, str(out)])
        assert result.exit_code == 0, result.output
        _assert_figure_file(out)


def test_bad_suffix_and_bad_folders_are_one_line_errors(tmp_path: Path, model_dir: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["plot", "afp", str(tmp_path / "afp.jpg")], "unknown figure format '.jpg'"),
        (["plot", "afp", str(tmp_path / "no" / "afp.png")], "does not exist"),
        (["plot", "confusion", str(empty), str(tmp_path / "c.png")], "afpx evaluate CUBE -o DIR"),
        (["plot", "test2", str(empty), str(tmp_path / "t.png")], "afpx evaluate CUBE -o DIR"),
        (["plot", "training", str(tmp_path / "t.png"), "--model", str(empty)], "afpx train"),
        (["plot", "tsne", str(tmp_path / "t.png"), "--model", str(empty)], "model.pt not found"),
    ]
    for argv, words in cases:
        result = CliRunner().invoke(main, argv)
        assert result.exit_code == 2, (argv, result.output)
        assert words in result.output
        assert len(result.output.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*.png"))


def test_unknown_split_is_an_error(tmp_path: Path, evaluation: Path) -> None:
    with pytest.raises(AfpxError, match="split 'validation' not in the evaluation"):
        plots.evaluation_confusion(evaluation, "validation")


# -- physics and numbers behind the figures ---------------------------------------------------


def test_rocksalt_afps_agree_when_normalised_and_scale_with_the_lattice() -> None:
    fp = plots.rocksalt_fingerprints()
    afp, r0 = fp["afp"], fp["r0"]
    assert list(fp["label"]) == ["Na in NaCl", "Cl in NaCl", "La in LaAs", "As in LaAs"]
    # rock salt: r0 = a / 2, and every site sees the same geometry in units of r0
    np.testing.assert_allclose(r0, [2.820, 2.820, 6.137 / 2, 6.137 / 2], rtol=1e-6)
    for i in range(1, 4):
        np.testing.assert_allclose(afp[i], afp[0], atol=1e-4 * afp.max())


def test_rank_curves_match_the_reported_top_k(evaluation: Path) -> None:
    metrics = plots.read_evaluation_metrics(evaluation)
    curves, exact = plots.rank_curves(evaluation)
    assert exact
    assert list(curves) == metrics["models"]
    for model, (k, frac) in curves.items():
        assert np.all(np.diff(frac) >= 0) and frac[-1] <= 1.0
        for top in (1, 10):
            at = frac[np.searchsorted(k, top, side="right") - 1] if k[0] <= top else 0.0
            assert at == pytest.approx(metrics["test1"][model][f"top{top}"])


def test_rank_curves_from_metrics_json_alone_use_the_bin_edges(
    tmp_path: Path, evaluation: Path
) -> None:
    shutil.copy(evaluation / "metrics.json", tmp_path / "metrics.json")
    metrics = plots.read_evaluation_metrics(tmp_path)
    curves, exact = plots.rank_curves(tmp_path)
    assert not exact
    k, frac = curves["model"]
    assert k[0] == 1 and frac[0] == pytest.approx(metrics["test1"]["model"]["top1"])
    assert frac[list(k).index(10)] == pytest.approx(metrics["test1"]["model"]["top10"])
    del metrics["test1"]["model"]["rank_distribution"]
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(AfpxError, match="no Test 1 rank distribution for 'model'"):
        plots.rank_curves(tmp_path)


def test_test2_summaries_are_the_metrics(evaluation: Path) -> None:
    metrics = plots.read_evaluation_metrics(evaluation)
    summaries = plots.test2_summaries(metrics)
    for size, per_model in summaries.items():
        for model, values in per_model.items():
            row = metrics["test2"]["all_templates"][model][size]
            assert values["os_mean"] == pytest.approx(row["os_mean"])
            assert values["hit@1"] == pytest.approx(row["hit@1"])
    with pytest.raises(AfpxError, match="no Test 2 results for variant 'other'"):
        plots.test2_summaries(metrics, variant="other")
    no_sets = json.loads(json.dumps(metrics))
    for model_rows in no_sets["test2"]["all_templates"].values():
        for row in model_rows.values():
            row["n_sets"] = 0
    with pytest.raises(AfpxError, match="no Test 2 element sets"):
        plots.test2_summaries(no_sets)


def test_confusion_and_histograms_count_every_site(evaluation: Path) -> None:
    metrics = plots.read_evaluation_metrics(evaluation)
    counts = plots.evaluation_confusion(evaluation, "test")
    assert counts.sum() == metrics["softmax"]["test"]["n_sites"]
    assert 1 - np.trace(counts) / counts.sum() == pytest.approx(
        metrics["softmax"]["test"]["error_rate"]
    )
    hist, edges = plots.evaluation_likelihood_histogram(evaluation, "test")
    assert hist[0].sum() == counts.sum()  # one true-element likelihood per site
    assert hist[1].sum() == counts.sum() * (schema.N_ELEMENTS - 1)
    assert edges[0] == 0.0 and edges[-1] == 1.0


def test_element_weights_are_the_last_sigmoid_layer(tmp_path: Path, model_dir: Path) -> None:
    torch = pytest.importorskip("torch")
    weights = plots.element_weights(model_dir)
    expected = torch.load(model_dir / "model.pt")["sigmoid_classifier.3.weight"].numpy()
    np.testing.assert_array_equal(weights, expected)
    torch.save({"encoder.0.weight": torch.zeros(2, 2)}, tmp_path / "model.pt")
    with pytest.raises(AfpxError, match="no sigmoid_classifier layer"):
        plots.element_weights(tmp_path)


def test_cube_element_counts_count_unique_sites(evaluation: Path) -> None:
    import xarray as xr

    cube = evaluation.parent / "cube.zarr"
    z = xr.open_zarr(cube, consolidated=False)[schema.Z].values
    counts = plots.cube_element_counts(cube)
    assert counts.sum() == z.size
    assert counts[25] == int((z == 26).sum())  # iron, index z - 1


# -- every error of the figure functions ------------------------------------------------------


def test_figure_functions_reject_bad_arrays() -> None:
    n = schema.N_ELEMENTS
    with pytest.raises(AfpxError, match="does not match 2 labels"):
        plots.afp_figure(np.zeros((3, 12, 8)), np.ones(3), np.arange(8.0), ["a", "b"])
    with pytest.raises(AfpxError, match="confusion counts of shape"):
        plots.confusion_figure(np.zeros((3, 4)), source="x")
    with pytest.raises(AfpxError, match="no element has 1 or more sites"):
        plots.confusion_figure(np.zeros((n, n)), source="x")
    with pytest.raises(AfpxError, match="at least 3 weight vectors"):
        plots.tsne_embedding(np.zeros((2, 4)))
    with pytest.raises(AfpxError, match="t-SNE coordinates of shape"):
        plots.tsne_figure(np.zeros((5, 2)), source="x")
    with pytest.raises(AfpxError, match="element counts of shape"):
        plots.element_histogram_figure(np.ones(5), source="x")
    with pytest.raises(AfpxError, match="no sites to histogram"):
        plots.element_histogram_figure(np.zeros(n), source="x")
    with pytest.raises(AfpxError, match="does not fit 4 edges"):
        plots.likelihood_histogram_figure(np.ones((2, 5)), np.linspace(0, 1, 4), source="x")
    with pytest.raises(AfpxError, match="histogram is empty"):
        plots.likelihood_histogram_figure(np.zeros((2, 3)), np.linspace(0, 1, 4), source="x")
    with pytest.raises(AfpxError, match="no Test 1 curves"):
        plots.rank_curve_figure({}, source="x")
    with pytest.raises(AfpxError, match="no Test 2 summaries"):
        plots.test2_figure({}, source="x")


def test_training_metrics_errors(tmp_path: Path) -> None:
    import pandas as pd

    with pytest.raises(AfpxError, match=r"no metrics\.csv or metrics\.json"):
        plots.read_training_metrics(tmp_path)
    (tmp_path / "metrics.json").write_text("[]")
    with pytest.raises(AfpxError, match="training metrics have no epochs"):
        plots.read_training_metrics(tmp_path)
    with pytest.raises(AfpxError, match="need an 'epoch' column"):
        plots.training_curves_figure(pd.DataFrame({"lr": [1.0]}), source="x")


def test_training_curves_leave_out_terms_the_network_lacks() -> None:
    import pandas as pd

    rows = {"epoch": [1, 2], "lr": [1e-3, 1e-4], "kl_weight": [0.5, 1.0],
            "train_total": [2.0, 1.5], "val_total": [2.1, 1.8],
            "train_reconstruction": [0.0, 0.0], "train_kl": [0.0, 0.0]}  # fmt: skip
    fig = plots.training_curves_figure(pd.DataFrame(rows), source="x")
    loss, _, _, kl = fig.axes[:4]
    labels = [t.get_text() for t in loss.get_legend().get_texts()]
    assert labels == ["train total", "holdout total"]  # no zero reconstruction curve
    assert not kl.lines and "no KL term (not a VAE)" in [t.get_text() for t in kl.texts]
    with_kl = plots.training_curves_figure(
        pd.DataFrame({**rows, "train_kl": [3.0, 2.0]}), source="x"
    )
    assert len(with_kl.axes[3].lines) == 1


def test_evaluation_reader_errors(tmp_path: Path, evaluation: Path) -> None:
    (tmp_path / "metrics.json").write_text("{not json")
    with pytest.raises(AfpxError, match="is not JSON"):
        plots.read_evaluation_metrics(tmp_path)
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(AfpxError, match="no 'models'"):
        plots.read_evaluation_metrics(tmp_path)
    with pytest.raises(AfpxError, match=r"arrays\.zarr not found"):
        plots.read_evaluation_arrays(tmp_path, "confusion")
    with pytest.raises(AfpxError, match="has no nothing_here"):
        plots.read_evaluation_arrays(evaluation, "nothing_here")


def test_rank_curves_need_test1_structures(tmp_path: Path, evaluation: Path) -> None:
    import xarray as xr

    shutil.copy(evaluation / "metrics.json", tmp_path / "metrics.json")
    ds = xr.open_zarr(evaluation / "arrays.zarr", consolidated=False).load()
    empty = ds[["test1_rank"]].isel(test1_structure=slice(0, 0))
    empty.to_zarr(tmp_path / "arrays.zarr", zarr_format=3, consolidated=False)
    with pytest.raises(AfpxError, match="Test 1 has no structures"):
        plots.rank_curves(tmp_path)


def test_element_weights_of_an_mlp_network_are_its_likelihood_head(tmp_path) -> None:
    import torch

    from afpx.model import ModelConfig, build_net
    from afpx.plots import element_weights

    net = build_net(ModelConfig.preset_config("context", classifier_hidden=16))
    torch.save(net.state_dict(), tmp_path / "model.pt")
    w = element_weights(tmp_path)
    assert w.shape == (118, 16)
    np.testing.assert_array_equal(w, net.softmax_head.weight.detach().numpy())
