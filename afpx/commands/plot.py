"""``afpx plot``: one subcommand per figure, written as PNG, SVG or PDF by suffix."""

from __future__ import annotations

import os
from typing import Any

import click

from afpx.cli import library_errors, require_modules, require_torch

_OUT = click.argument("output", type=click.Path(dir_okay=False))
_EVAL = click.argument("evaluation")
_SPLIT = click.option(
    "--split",
    type=click.Choice(["train", "holdout", "test"]),
    default="test",
    show_default=True,
    help="Split of the evaluation to show.",
)
_MODEL = click.option(
    "--model",
    "model",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Model folder written by `afpx train` (default: the built-in model).",
)


def _write(fig: Any, output: str) -> None:
    from afpx.plots import save_figure

    click.echo(f"wrote {save_figure(fig, output)}")


def _model_dir(model: str | None) -> tuple[str, str]:
    """The model folder and its caption name."""
    if model is not None:
        return model, f"model folder {model}"
    from afpx.default import default_model_dir

    return os.fspath(default_model_dir()), "built-in default model (afpx/data/default_model)"


@click.group("plot")
def plot_group() -> None:
    """Figures of the paper from a cube, a model folder or an `afpx evaluate` folder.

    Each subcommand writes OUTPUT as PNG, SVG or PDF, chosen by its suffix.
    The `plot` extra is needed (matplotlib, scikit-learn); `plot tsne` also
    needs torch to read the model weights.

    \b
    Examples:
      afpx plot afp afp.png
      afpx plot training training.svg
      afpx plot tsne tsne.pdf --model model/
      afpx plot confusion report/ confusion.png
      afpx plot rank-curve report/ test1.png
    """
    require_modules("afpx plot", ("matplotlib", "sklearn"), "pip install 'afpx[plot]'")


@plot_group.command("afp")
@_OUT
@library_errors
def plot_afp(output: str) -> None:
    """AFPs of rock-salt NaCl and LaAs, raw and normalised (paper Figure 2)."""
    from afpx import plots

    plots.check_output(output)
    fp = plots.rocksalt_fingerprints()
    _write(plots.afp_figure(fp["afp"], fp["r0"], fp["r"], list(fp["label"])), output)


@plot_group.command("confusion")
@_EVAL
@_OUT
@_SPLIT
@click.option(
    "--min-sites",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Leave out elements with fewer true sites.",
)
@library_errors
def plot_confusion(evaluation: str, output: str, split: str, min_sites: int) -> None:
    """Element confusion matrix of the softmax classifier (paper Figure 4).

    EVALUATION is a folder written by `afpx evaluate`.
    """
    from afpx import plots

    plots.check_output(output)
    counts = plots.evaluation_confusion(evaluation, split)
    fig = plots.confusion_figure(
        counts, source=f"{split} split of the evaluation {evaluation}", min_sites=min_sites
    )
    _write(fig, output)


@plot_group.command("tsne")
@_OUT
@_MODEL
@click.option("--perplexity", type=float, default=15.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the embedding.")
@library_errors
def plot_tsne(output: str, model: str | None, perplexity: float, seed: int) -> None:
    """t-SNE map of the element weights of the likelihood layer (paper Figure 5)."""
    from afpx import plots

    plots.check_output(output)
    require_torch("afpx plot tsne")
    folder, name = _model_dir(model)
    xy = plots.tsne_embedding(plots.element_weights(folder), perplexity=perplexity, seed=seed)
    _write(plots.tsne_figure(xy, source=f"{name}; perplexity {perplexity:g}, seed {seed}"), output)


@plot_group.command("elements")
@click.argument("cube", type=click.Path(exists=True, file_okay=False))
@_OUT
@library_errors
def plot_elements(cube: str, output: str) -> None:
    """Unique sites per element in CUBE (paper S1)."""
    from afpx import plots

    plots.check_output(output)
    counts = plots.cube_element_counts(cube)
    _write(plots.element_histogram_figure(counts, source=f"cube {cube}"), output)


@plot_group.command("training")
@_OUT
@_MODEL
@library_errors
def plot_training(output: str, model: str | None) -> None:
    """Training curves from a model folder's metrics (paper S2)."""
    from afpx import plots

    plots.check_output(output)
    folder, name = _model_dir(model)
    frame = plots.read_training_metrics(folder)
    _write(plots.training_curves_figure(frame, source=name), output)


@plot_group.command("likelihood")
@_EVAL
@_OUT
@_SPLIT
@library_errors
def plot_likelihood(evaluation: str, output: str, split: str) -> None:
    """Histograms of true-element and other-element likelihoods (paper S5).

    EVALUATION is a folder written by `afpx evaluate`.
    """
    from afpx import plots

    plots.check_output(output)
    hist, edges = plots.evaluation_likelihood_histogram(evaluation, split)
    fig = plots.likelihood_histogram_figure(
        hist, edges, split=split, source=f"evaluation {evaluation}"
    )
    _write(fig, output)


@plot_group.command("rank-curve")
@_EVAL
@_OUT
@library_errors
def plot_rank_curve(evaluation: str, output: str) -> None:
    """Test 1: fraction of structures with rank <= k, model vs baselines.

    EVALUATION is a folder written by `afpx evaluate` (or its metrics.json:
    then the curve is known at the bin edges only).
    """
    from afpx import plots

    plots.check_output(output)
    curves, exact = plots.rank_curves(evaluation)
    metrics = plots.read_evaluation_metrics(evaluation)
    split = metrics.get("params", {}).get("split", "?")
    source = f"{split} split of the evaluation {evaluation}"
    _write(plots.rank_curve_figure(curves, source=source, exact=exact), output)


@plot_group.command("test2")
@_EVAL
@_OUT
@click.option(
    "--variant",
    type=click.Choice(["all_templates", "no_own_formula"]),
    default="all_templates",
    show_default=True,
    help="Every template, or none whose own formula is the candidate's composition.",
)
@library_errors
def plot_test2(evaluation: str, output: str, variant: str) -> None:
    """Test 2: hit@k, MRR and optimality score of the known compositions, per model.

    EVALUATION is a folder written by `afpx evaluate` (or its metrics.json).
    """
    from afpx import plots

    plots.check_output(output)
    metrics = plots.read_evaluation_metrics(evaluation)
    summaries = plots.test2_summaries(metrics, variant=variant)
    split = metrics.get("params", {}).get("split", "?")
    source = f"{split} split of the evaluation {evaluation}; {variant.replace('_', ' ')}"
    _write(plots.test2_figure(summaries, source=source), output)


COMMANDS = [plot_group]
