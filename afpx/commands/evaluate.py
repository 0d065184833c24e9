"""``afpx evaluate``: the paper's tests and the baselines, written as a report folder."""

from __future__ import annotations

import click

from afpx import AfpxError
from afpx.cli import library_errors, require_torch


def _parse_case(items: tuple[str, ...]) -> tuple[tuple[str, ...], ...] | None:
    if not items:
        return None
    out = []
    for item in items:
        symbols = tuple(s.strip() for s in item.split(",") if s.strip())
        if not symbols:
            raise AfpxError(f"--case expects comma-separated element symbols, got {item!r}")
        out.append(symbols)
    return tuple(out)


@click.command("evaluate")
@click.argument("cube")
@click.option(
    "--model",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Score the cube's sites with this model in memory (the cube is not written); "
    "default: the likelihoods stored in the cube by `afpx likelihood`.",
)
@click.option(
    "--split",
    type=click.Choice(["train", "holdout", "test"]),
    default="test",
    show_default=True,
    help="Split whose structures (Test 1) and element sets (Test 2) are evaluated.",
)
@click.option(
    "-o",
    "--output",
    default="evaluation",
    show_default=True,
    help="Report folder (a path or a URL such as s3://bucket/report): metrics.json and "
    "arrays.zarr. Checked for writing before the evaluation starts.",
)
@click.option(
    "--baselines",
    default="constant,random,frequency,coordination,knn,mlp",
    show_default=True,
    help="Comma-separated baselines scored by the same code ('' for none).",
)
@click.option(
    "--case",
    "cases",
    multiple=True,
    metavar="EL,EL[,EL]",
    help="Element set of the case study (repeatable; default Mn,Ge and Li,Mn,Ge).",
)
@click.option(
    "--cap",
    type=int,
    default=100,
    show_default=True,
    help="Test 1: candidates of large templates that beat or tie the true one are counted "
    "up to this many, then the rank is censored (small templates are counted in full).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random baseline.")
@click.option(
    "--test2-sets",
    type=int,
    default=None,
    help="Test 2 on a seeded sample of at most N element sets of each size (default: all).",
)
@click.option(
    "--workers",
    type=int,
    default=None,
    help="Start a local Dask cluster of N processes for the element sets "
    "(with --scheduler threads|processes: N threads or processes). "
    "Results do not depend on it.",
)
@click.option(
    "--scheduler",
    default=None,
    metavar="NAME|ADDRESS",
    help="Dask scheduler of Test 1 and Test 2: threads, processes, synchronous or "
    "tcp://HOST:PORT (default: the current one).",
)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option(
    "--progress/--no-progress", default=None, help="Progress bar (default: on a terminal)."
)
@library_errors
def evaluate_command(
    cube: str,
    model: str | None,
    split: str,
    output: str,
    baselines: str,
    cases: tuple[str, ...],
    cap: int,
    seed: int,
    test2_sets: int | None,
    workers: int | None,
    scheduler: str | None,
    device: str,
    progress: bool | None,
) -> None:
    """Test 1, Test 2, softmax error rate and confusion matrix of CUBE, with baselines.

    Writes OUTPUT/metrics.json (every number) and OUTPUT/arrays.zarr
    (confusion matrices, likelihood histograms, per-structure and per-set
    results) and prints a short table. See docs/evaluation.md.
    """
    import dataclasses
    import sys

    if model is not None:
        require_torch("afpx evaluate --model")
    from afpx.baselines import BaselineParams
    from afpx.evaluate import (
        EvaluateParams,
        evaluate,
        with_model_likelihoods,
        write_report,
    )
    from afpx.store import check_writable_folder

    try:
        from afpx.cube import open_cube
    except ImportError:  # pragma: no cover - the cube module is part of afpx
        import xarray as xr

        def open_cube(path: str) -> xr.Dataset:  # type: ignore[misc]
            return xr.open_zarr(path, consolidated=None)

    names = tuple(b.strip() for b in baselines.split(",") if b.strip())
    case = _parse_case(cases)
    params = EvaluateParams(split=split, test1_cap=cap, baselines=names, test2_max_sets=test2_sets)
    if case is not None:
        params = dataclasses.replace(params, case_study=case)
    ds = open_cube(cube)
    # a folder that cannot be written fails now, not after the work
    check_writable_folder(output, what="the report folder")
    if model is not None:
        ds = with_model_likelihoods(ds, model, device=device)
    show = sys.stderr.isatty() if progress is None else progress
    report = evaluate(
        ds,
        params=params,
        baseline_params=BaselineParams(seed=seed),
        progress=show,
        scheduler=scheduler,
        workers=workers,
    )
    paths = write_report(report, output)
    click.echo(report.table())
    click.echo(f"wrote {paths['metrics']} and {paths['arrays']}")


COMMANDS = [evaluate_command]
