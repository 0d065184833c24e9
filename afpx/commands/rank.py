"""``afpx rank``: rank the compositions of an element set."""

from __future__ import annotations

import json
import math
from typing import Any

import click

from afpx.cli import library_errors

FORMATS = ("table", "csv", "json")


@click.command("rank")
@click.option(
    "--elements",
    "-e",
    default=None,
    help="Element set, comma-separated symbols, e.g. Li,Mn,Ge (at least two).",
)
@click.option(
    "--formula",
    "-f",
    default=None,
    help="Instead of --elements: list the best candidate structures of this composition "
    "(template, assignment, score), e.g. Li2MnGe.",
)
@click.option(
    "--cube",
    type=click.Path(),
    default=None,
    help="Cube with likelihoods; default: the built-in template library.",
)
@click.option("--top", type=int, default=20, show_default=True, help="Rows to show (0: all).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="table",
    show_default=True,
    help="Output format.",
)
@click.option(
    "--export-cif",
    type=click.Path(file_okay=False),
    default=None,
    help="Write each row's best candidate as a CIF into this folder.",
)
@click.option(
    "--scale",
    type=click.Choice(["dls", "radii", "none"]),
    default="dls",
    show_default=True,
    help="Lattice scaling of exported CIFs (see docs/ranking.md).",
)
@click.option("--known", is_flag=True, help="Mark compositions that exist among the structures.")
@click.option("--max-sites", type=int, default=None, help="Skip templates with more unique sites.")
@click.option(
    "--source", "sources", multiple=True, help="Only templates from this source (repeatable)."
)
@click.option(
    "--exclude-own-formula",
    is_flag=True,
    help="Drop candidates whose composition is their template's own.",
)
@click.option(
    "--min-likelihood", type=float, default=None, help="Drop candidates with a lower likelihood."
)
@click.option(
    "--relax",
    "relax",
    type=int,
    default=0,
    show_default=True,
    help="Relax the best candidate of the top N compositions with CHGNet and rank them by "
    "stability (needs afpx[relax]; see docs/relax.md).",
)
@click.option(
    "--order",
    type=click.Choice(["likelihood", "hull"]),
    default="likelihood",
    show_default=True,
    help="With --relax: order rows by likelihood rank or by hull energy.",
)
@click.option("--relax-steps", type=int, default=100, show_default=True, help="Most FIRE steps.")
@click.option(
    "--fmax", type=float, default=0.1, show_default=True, help="Relaxation force bound, eV/Å."
)
@click.option(
    "--max-volume-ratio",
    type=float,
    default=2.0,
    show_default=True,
    help="Stop a relaxation whose volume changes by more than this factor.",
)
@click.option(
    "--relax-max-atoms",
    type=int,
    default=48,
    show_default=True,
    help="Do not relax cells with more atoms.",
)
@click.option(
    "--hull-known/--no-hull-known",
    default=True,
    show_default=True,
    help="With --relax: also relax the library's known compounds of the element set's "
    "chemical system and build the hull with them.",
)
@library_errors
def rank_command(
    elements: str | None,
    formula: str | None,
    cube: str | None,
    top: int,
    fmt: str,
    export_cif: str | None,
    scale: str,
    known: bool,
    max_sites: int | None,
    sources: tuple[str, ...],
    exclude_own_formula: bool,
    min_likelihood: float | None,
    relax: int,
    order: str,
    relax_steps: int,
    fmax: float,
    max_volume_ratio: float,
    relax_max_atoms: int,
    hull_known: bool,
) -> None:
    """Rank the compositions an element set can take in the known structure templates.

    Every assignment of the elements to the unique sites of every template is
    scored exactly (product of site likelihoods, every element used); each
    reduced composition is ranked by its best candidate. Ties get mid-ranks
    (also optimistic and pessimistic ranks); tied rows are listed by formula.

    \b
    Examples:
      afpx rank --elements Mn,Ge
      afpx rank --elements Li,Mn,Ge --top 10 --known
      afpx rank --elements Li,Mn,Ge --cube cube.zarr --format csv > ranks.csv
      afpx rank --formula Li2MnGe --top 5 --export-cif cifs/
      afpx rank --elements Mn,Ge --relax 10 --order hull --export-cif relaxed/
    """
    from afpx import AfpxError
    from afpx.rank import (
        export_cifs,
        load_library,
        parse_elements,
        parse_formula,
        rank_formula,
        rank_table,
    )

    if top < 0:
        raise AfpxError(f"--top must be 0 (all) or positive, got {top}")
    if (elements is None) == (formula is None):
        raise AfpxError("give either --elements (rank compositions) or --formula (rank structures)")
    # bad symbols or formulas fail before any loading
    zs = parse_elements(elements) if elements is not None else parse_formula(str(formula))[0]
    if relax:
        from afpx.relax import require_relax

        if relax < 0 or formula is not None:
            raise AfpxError("--relax takes a positive number of compositions, with --elements")
        require_relax()
        top = max(top, relax) if top else 0
    library = load_library(cube)
    if export_cif is not None and library.geometry is None:
        # checked before ranking, so that a failure leaves no empty output folder
        raise AfpxError(
            f"--export-cif: cube {cube!r} stores no template geometry (built by an older "
            f"afpx); rebuild it with `afpx build-cube`, or rank without --export-cif"
        )
    if export_cif is not None:
        from afpx.store import check_writable_folder, is_url

        if is_url(export_cif):
            raise AfpxError(f"--export-cif writes local files: give a folder, not {export_cif}")
        # a folder that cannot be written fails now, not after ranking (and relaxing)
        check_writable_folder(export_cif, what="the --export-cif folder")
    options: dict[str, Any] = {"exclude_own_formula": exclude_own_formula}
    if max_sites is not None:
        options["max_unique_sites"] = max_sites
    if sources:
        options["sources"] = sources
    if min_likelihood is not None:
        options["min_likelihood"] = min_likelihood
    if formula is not None:
        if known:
            raise AfpxError("--known applies to --elements only")
        table = rank_formula(formula, library=library, top=top or None, **options)
    else:
        table = rank_table(zs, library=library, top=top or None, known=known, **options)
    if relax:
        from afpx.commands.relax import relax_and_render

        text = relax_and_render(
            table,
            library,
            n=relax,
            order=order,
            steps=relax_steps,
            fmax=fmax,
            max_volume_ratio=max_volume_ratio,
            max_atoms=relax_max_atoms,
            known_references=hull_known,
            scale=scale,
            fmt=fmt,
            export_cif=export_cif,
        )
        click.echo(text, nl=False)
        return
    if export_cif is not None:
        paths = export_cifs(table.to_dataset(), library, export_cif, scale=scale)
        click.echo(f"wrote {len(paths)} CIF files to {export_cif}", err=True)
    click.echo(render(table, fmt), nl=False)


def render(table: Any, fmt: str) -> str:
    """A :class:`afpx.rank.RankTable` as text, CSV or JSON (no pandas: a fast cold start)."""
    attrs = table.attrs
    if fmt == "csv":
        return str(table.to_csv())  # written column by column
    if fmt == "json":
        # one compact row per line, encoded column by column
        head = json.dumps({"elements": attrs["elements"], "attrs": _jsonable(attrs)}, indent=1)
        body = table.json_text(",\n")
        return f'{head[:-2]},\n "rows": [\n{body}\n ]\n}}\n'
    cols = {name: values.tolist() for name, values in table.columns().items()}
    rows = list(zip(*cols.values(), strict=True))

    has_known = "known" in cols
    header = ["rank", "formula", "score", "template", "template formula", "sg"]
    header += ["known"] if has_known else []
    header += ["assignment"]
    lines = [header]
    for i in range(len(rows)):
        cells = [
            f"{cols['rank'][i]:g}",
            str(cols["formula"][i]),
            f"{cols['score'][i]:.4g}",
            str(cols["structure_id"][i]),
            str(cols["template_formula"][i]),
            str(cols["spacegroup"][i]),
        ]
        if has_known:
            cells.append("yes" if cols["known"][i] else "")
        cells.append(str(cols["assignment_text"][i]))
        lines.append(cells)
    widths = [max(len(r[i]) for r in lines) for i in range(len(header) - 1)]
    out = []
    for r in lines:
        padded = [c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)]
        out.append("  ".join([*padded, r[-1]]))
    n = attrs.get("n_compositions", len(rows))
    what = (
        f"candidate structures of {attrs['formula']}"
        if "formula" in attrs
        else f"compositions of {'-'.join(attrs['elements'])}"
    )
    out.append(
        f"# {len(rows)} of {n} {what}; "
        f"{attrs.get('n_candidates', 0)} candidates from {attrs.get('n_templates', 0)} "
        f"templates ({attrs.get('library', '')}); ties: mid-rank, listed by "
        + ("template" if "formula" in attrs else "formula")
    )
    return "\n".join(out) + "\n"


def _jsonable(value: Any) -> Any:
    import numpy as np

    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


COMMANDS = [rank_command]
