"""Make the figures of the shipped default for the documentation (docs/figures/).

Usage (from the repository root)::

    python scripts/make_figures.py                      # model- and structure-based figures
    python scripts/make_figures.py --cube oqmd.zarr     # + element histogram of the cube
    python scripts/make_figures.py --evaluation report/ # + confusion matrix, likelihoods,
                                                        #   exact Test 1 curve

Without ``--evaluation`` the Test 1 and Test 2 figures come from the model
card's ``docs/evaluation-default/metrics.json`` (Test 1 at the bin edges of
its rank distribution). Needs the ``plot`` and ``train`` extras.
"""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL_CARD_METRICS = Path("docs/evaluation-default")
DPI = 110


def main(argv: list[str] | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")

    from afpx import plots
    from afpx.default import default_model_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "figures")
    parser.add_argument("--cube", type=Path, default=None, help="cube for the element histogram")
    parser.add_argument("--evaluation", type=Path, default=None, help="`afpx evaluate` folder")
    parser.add_argument("--split", default="test", help="split of the evaluation figures")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(fig: object, name: str) -> None:
        written.append(plots.save_figure(fig, args.out / name, dpi=DPI))  # type: ignore[arg-type]
        print(f"wrote {written[-1]}")

    model = default_model_dir()
    model_name = "built-in default model (afpx/data/default_model)"
    fp = plots.rocksalt_fingerprints()
    save(plots.afp_figure(fp["afp"], fp["r0"], fp["r"], list(fp["label"])), "afp-rocksalt.png")
    frame = plots.read_training_metrics(model)
    save(plots.training_curves_figure(frame, source=model_name), "training-curves.png")
    xy = plots.tsne_embedding(plots.element_weights(model), perplexity=15.0, seed=0)
    save(plots.tsne_figure(xy, source=f"{model_name}; perplexity 15, seed 0"), "tsne-elements.png")

    evaluation = args.evaluation or ROOT / MODEL_CARD_METRICS
    label = (
        f"afpx evaluate output {args.evaluation.name}/"
        if args.evaluation
        else f"model card ({MODEL_CARD_METRICS})"
    )
    metrics = plots.read_evaluation_metrics(evaluation)
    split = metrics.get("params", {}).get("split", "?")
    curves, exact = plots.rank_curves(evaluation)
    source = f"{split} split, {label}"
    save(plots.rank_curve_figure(curves, source=source, exact=exact), "test1-rank-curve.png")
    save(plots.test2_figure(plots.test2_summaries(metrics), source=source), "test2.png")
    if args.evaluation is not None:
        counts = plots.evaluation_confusion(args.evaluation, args.split)
        save(plots.confusion_figure(counts, source=f"{args.split} split, {label}"), "confusion.png")
        hist, edges = plots.evaluation_likelihood_histogram(args.evaluation, args.split)
        fig = plots.likelihood_histogram_figure(hist, edges, source=label, split=args.split)
        save(fig, "likelihood-histograms.png")

    if args.cube is not None:
        from afpx.cube import open_cube

        attrs = open_cube(args.cube).attrs
        sources = ", ".join(map(str, attrs.get("sources", []))) or "?"
        counts = plots.cube_element_counts(args.cube)
        fig = plots.element_histogram_figure(counts, source=f"cube of {sources}")
        save(fig, "element-histogram.png")
    return written


if __name__ == "__main__":
    main()
