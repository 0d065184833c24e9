"""``afpx screen``: rank every element set of one size drawn from a list of elements."""

from __future__ import annotations

import sys
from typing import Any

import click

from afpx.cli import library_errors
from afpx.commands.ingest import echo_warnings, scheduler_option


@click.command("screen")
@click.option(
    "--elements",
    "-e",
    required=True,
    help="The chemical space: comma-separated symbols, e.g. Li,Na,Mn,Fe,Ge,Si.",
)
@click.option(
    "--size", "-k", type=int, required=True, help="Elements per set (2: binaries, 3: ternaries)."
)
@click.option(
    "--output",
    "-o",
    type=click.Path(),
    required=True,
    help="The zarr store to write: a path or a URL such as s3://bucket/screen.zarr.",
)
@click.option(
    "--cube",
    type=click.Path(),
    default=None,
    help="Cube with likelihoods; default: the built-in template library.",
)
@click.option("--top", type=int, default=50, show_default=True, help="Rows kept per set.")
@click.option("--known", is_flag=True, help="Mark compositions that exist among the structures.")
@click.option("--max-sites", type=int, default=None, help="Skip templates with more unique sites.")
@click.option(
    "--exclude-own-formula",
    is_flag=True,
    help="Drop candidates whose composition is their template's own.",
)
@click.option(
    "--batch-size",
    type=int,
    default=8,
    show_default=True,
    help="Element sets per Dask task and per zarr chunk.",
)
@click.option(
    "--workers",
    type=int,
    default=None,
    help="Start a local Dask cluster of N single-threaded processes.",
)
@scheduler_option
@click.option("--overwrite", is_flag=True, help="Replace an existing screen at --output.")
@click.option(
    "--resume",
    is_flag=True,
    help="Continue an interrupted screen at --output (same options), skipping finished sets.",
)
@click.option(
    "--progress/--no-progress", default=None, help="Progress bar (default: on a terminal)."
)
@click.option(
    "--show", type=int, default=10, show_default=True, help="Element sets to list at the end."
)
@library_errors
def screen_command(
    elements: str,
    size: int,
    output: str,
    cube: str | None,
    top: int,
    known: bool,
    max_sites: int | None,
    exclude_own_formula: bool,
    batch_size: int,
    workers: int | None,
    scheduler: str | None,
    overwrite: bool,
    resume: bool,
    progress: bool | None,
    show: int,
) -> None:
    """Rank every element set of --size drawn from --elements into one zarr store.

    Each set is ranked as `afpx rank` ranks it; its --top rows (formula,
    counts, score, ranks, template, assignment) are stored, labelled by
    element set and row. The sets run as Dask tasks on the chosen scheduler
    (ranking is parallel across processes: use --workers or a cluster). A
    killed screen continues with --resume; the finished store equals an
    uninterrupted one byte for byte. At the end, the --show sets with the
    best top score are listed.

    \b
    Examples:
      afpx screen -e Li,Na,K,Mn,Fe,Co,Ge,Si -k 3 -o ternaries.zarr --workers 2
      afpx screen -e Li,Na,K,Mn,Fe,Co,Ge,Si -k 3 -o ternaries.zarr --resume
    """
    from afpx.scheduler import use_scheduler
    from afpx.screen import screen

    if progress is None:
        progress = sys.stderr.isatty()
    with echo_warnings(), use_scheduler(scheduler, workers=workers):
        ds = screen(
            elements,
            size,
            output,
            cube=cube,
            top=top,
            known=known,
            max_sites=max_sites,
            exclude_own_formula=exclude_own_formula,
            batch_size=batch_size,
            overwrite=overwrite,
            resume=resume,
            progress=progress,
        )
    click.echo(summary(ds, output, show=show), nl=False)


def summary(ds: Any, output: str, *, show: int) -> str:
    """The ``show`` sets with the best top score, then one line on the whole screen."""
    import numpy as np

    sets = ds["element_set"].values.astype(object)
    best = ds["score"].isel(row=0).values
    formula = ds["formula"].isel(row=0).values.astype(object)
    template = ds["structure_id"].isel(row=0).values.astype(object)
    order = np.argsort(-np.nan_to_num(best, nan=-np.inf), kind="stable")[: max(show, 0)]
    lines = [["element set", "best formula", "score", "template"]]
    lines += [[str(sets[i]), str(formula[i]), f"{best[i]:.4g}", str(template[i])] for i in order]
    widths = [max(len(r[j]) for r in lines) for j in range(3)]
    out = [
        "  ".join([*(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)), r[3]]) for r in lines
    ]
    out = out if order.size else []
    out.append(f"# {sets.size} element sets ranked into {output}")
    return "\n".join(out) + "\n"


COMMANDS = [screen_command]
