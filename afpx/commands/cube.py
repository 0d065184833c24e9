"""``afpx build-cube`` and ``afpx info``: write the AFP cube, summarise one."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from afpx.cli import library_errors
from afpx.commands.ingest import echo_warnings, filter_options, scheduler_option

if TYPE_CHECKING:
    from afpx.structures import FilterParams


@click.command("build-cube")
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=True, file_okay=True),
    help="The zarr store to write, a path or a URL such as s3://bucket/cube.zarr "
    "(must not exist unless --overwrite).",
)
@click.option("--draws", type=int, default=1, show_default=True, help="Augmented draws per site.")
@click.option("--seed", type=int, default=0, show_default=True, help="Augmentation seed.")
@click.option(
    "--deterministic", is_flag=True, help="No random rotation and no jitter (analysis mode)."
)
@click.option(
    "--chunk-sites",
    type=int,
    default=256,
    show_default=True,
    help="Sites per zarr chunk and per Dask task.",
)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option(
    "--workers",
    type=int,
    default=None,
    help="Start a local Dask cluster of N processes (and read with N processes).",
)
@scheduler_option
@click.option("--split-seed", type=int, default=0, show_default=True, help="Seed of the split.")
@click.option("--overwrite", is_flag=True, help="Replace an existing cube at --output.")
@click.option(
    "--resume",
    is_flag=True,
    help="Continue an interrupted build of --output (same inputs and options) from its chunks.",
)
@click.option(
    "--append",
    is_flag=True,
    help="Add INPUTS to the existing cube at --output, with the cube's own options.",
)
@filter_options
@click.option(
    "--progress/--no-progress", default=None, help="Progress bars (default: on a terminal)."
)
@library_errors
def build_cube_command(
    inputs: tuple[str, ...],
    output: str,
    draws: int,
    seed: int,
    deterministic: bool,
    chunk_sites: int,
    device: str,
    workers: int | None,
    scheduler: str | None,
    split_seed: int,
    overwrite: bool,
    resume: bool,
    append: bool,
    filters: FilterParams,
    max_file_mb: float,
    progress: bool | None,
) -> None:
    """Fingerprint every unique site of INPUTS into a zarr cube.

    INPUTS are CIF files, folders, JSON(-lines) files of pymatgen structures,
    ASE databases, or dataset names such as oqmd-icsd (see `afpx datasets
    list`). The cube appears at --output only once it is complete; a build
    that was killed is continued with --resume (or cleaned up by the next
    build). With --append, the structures of INPUTS are added to the cube:
    the result equals a build of the cube's sources and INPUTS in one go.
    """
    from afpx.cube import append_to_cube, build_cube, cube_summary, open_cube
    from afpx.scheduler import one_malloc_arena
    from afpx.splits import SplitParams

    # before any Dask thread: the reading tasks, the fingerprints and this thread reuse
    # one another's freed memory, and a larger corpus leaves no more of it behind
    one_malloc_arena()
    if append:
        ctx = click.get_current_context()
        fixed = ["draws", "seed", "deterministic", "chunk_sites", "split_seed", "overwrite"]
        given = [
            name
            for name in fixed
            if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT
        ]
        if given:
            options = ", ".join("--" + name.replace("_", "-") for name in given)
            raise click.UsageError(f"--append keeps the cube's own options; drop {options}")
        with echo_warnings():
            path = append_to_cube(
                list(inputs),
                output,
                device=device,
                scheduler=scheduler,
                workers=workers,
                progress=progress,
                max_file_mb=max_file_mb,
                resume=resume,
            )
        click.echo(cube_summary(open_cube(path, load=False), path=str(path)))
        return
    with echo_warnings():
        built = build_cube(
            list(inputs),
            output,
            draws=draws,
            seed=seed,
            deterministic=deterministic,
            chunk_sites=chunk_sites,
            device=device,
            scheduler=scheduler,
            workers=workers,
            filters=filters,
            split=SplitParams(seed=split_seed),
            overwrite=overwrite,
            progress=progress,
            max_file_mb=max_file_mb,
            resume=resume,
        )
    click.echo(cube_summary(open_cube(built, load=False), path=str(built)))


@click.command("info")
@click.argument("cube")
@click.option(
    "--verify",
    is_flag=True,
    help="Check every chunk file against the sha256 recorded when it was written.",
)
@library_errors
def info_command(cube: str, verify: bool) -> None:
    """Summarise a cube: sizes, counts per element and split, parameters, rejections.

    Opening checks that every chunk written is there with its size; --verify
    reads them all and compares checksums (exit status 1 if one differs).
    """
    from afpx.cube import cube_summary, open_cube, verify_cube

    if verify:
        n_files, problems = verify_cube(cube)
        for line in problems:
            click.echo(f"damaged: {line}", err=True)
        if problems:
            raise click.ClickException(
                f"{len(problems)} of {n_files} chunk files of {cube} are damaged;"
                " rebuild the cube (afpx build-cube)"
            )
        click.echo(f"verified: {n_files} chunk files match their sha256")
    click.echo(cube_summary(open_cube(cube), path=cube))


COMMANDS = [build_cube_command, info_command]
