"""``afpx rank --relax N``: relax the top compositions, rank them by stability, write once."""

from __future__ import annotations

import csv
import io
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import click
import numpy as np

from afpx import AfpxError


def relax_and_render(
    table: Any,
    library: Any,
    *,
    n: int,
    order: str,
    steps: int,
    fmax: float,
    max_volume_ratio: float,
    max_atoms: int,
    known_references: bool,
    scale: str,
    fmt: str,
    export_cif: str | None,
) -> str:
    """Relax the first ``n`` rows of a ranking, export relaxed CIFs if asked; the output text."""
    from afpx.relax import RelaxParams, relax_ranking

    params = RelaxParams(
        steps=steps, fmax=fmax, max_volume_ratio=max_volume_ratio, max_atoms=max_atoms
    )
    relaxed = relax_ranking(
        table,
        library,
        n=n,
        params=params,
        order=order,
        known_references=known_references,
        scale=scale,
        progress=sys.stderr.isatty(),
    )
    if export_cif is not None:
        paths = write_relaxed_cifs(relaxed, export_cif)
        click.echo(
            f"wrote {len(paths)} relaxed CIF files to {export_cif} "
            f"({len(relaxed) - len(paths)} relaxations failed)",
            err=True,
        )
    return render_relaxed(relaxed, fmt)


def write_relaxed_cifs(relaxed: Any, directory: str) -> list[Path]:
    """One CIF per relaxed row, named ``<position>_<formula>_<template>_relaxed.cif``."""
    from pymatgen.io.cif import CifWriter

    from afpx import __version__

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    cols = relaxed.columns
    paths = []
    for i, structure in enumerate(relaxed.structures):
        if structure is None:
            continue
        formula = str(cols["formula"][i])
        sid = str(cols["structure_id"][i])
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{i + 1:03d}_{formula}_{sid}_relaxed")
        header = [
            f"# afpx {__version__} relaxed candidate structure ({relaxed.attrs['potential']})",
            f"# element set: {'-'.join(relaxed.attrs['elements'])}",
            f"# formula: {formula}",
            f"# likelihood rank: {float(cols['likelihood_rank'][i]):g}, stability rank: "
            f"{float(cols['stability_rank'][i]):g} (rows ordered by {relaxed.order})",
            f"# hull energy: {float(cols['hull_energy'][i]):.6f} eV/atom; energy above hull "
            f"{float(cols['e_above_hull'][i]):.6f}; formation energy "
            f"{float(cols['formation_energy'][i]):.6f} eV/atom",
            f"# template: {sid} ({cols['template_formula'][i]}, space group "
            f"{cols['spacegroup'][i]}); assignment: {cols['assignment_text'][i]}",
            f"# relaxation: {int(cols['n_steps'][i])} FIRE steps, converged "
            f"{bool(cols['converged'][i])}, volume ratio {float(cols['volume_ratio'][i]):.4f}",
        ]
        path = out / f"{safe}.cif"
        path.write_text("\n".join(header) + "\n" + str(CifWriter(structure)))
        paths.append(path)
    return paths


def _cell(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def render_relaxed(relaxed: Any, fmt: str) -> str:
    """A :class:`afpx.relax.RelaxTable` as text, CSV or JSON."""
    cols = relaxed.columns
    names = list(cols)
    rows = [[_cell(v) for v in r] for r in zip(*cols.values(), strict=True)]
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(names)
        writer.writerows(rows)
        return buf.getvalue()
    if fmt == "json":
        attrs = {k: v for k, v in relaxed.attrs.items() if k != "ranking"}
        doc = {
            "elements": relaxed.attrs["elements"],
            "order": relaxed.order,
            "attrs": attrs,
            "references": relaxed.references,
            "known_references": relaxed.known_references,
            "rows": [dict(zip(names, r, strict=True)) for r in rows],
        }
        return json.dumps(doc, indent=1, default=_cell) + "\n"
    if fmt != "table":
        raise AfpxError(f"unknown format {fmt!r}")

    def num(v: Any, spec: str) -> str:
        v = _cell(v)
        return "-" if v is None else format(v, spec)

    has_known = "known" in cols
    header = ["rank", "stability", "formula", "score", "hull", "e_form", "vol", "steps"]
    header += ["known"] if has_known else []
    header += ["template", "status"]
    lines = [header]
    for i in range(len(relaxed)):
        cells = [
            num(cols["likelihood_rank"][i], "g"),
            num(cols["stability_rank"][i], "g"),
            str(cols["formula"][i]),
            num(cols["score"][i], ".4g"),
            num(cols["hull_energy"][i], ".3f"),
            num(cols["formation_energy"][i], ".3f"),
            num(cols["volume_ratio"][i], ".2f"),
            f"{int(cols['n_steps'][i])}{'' if cols['converged'][i] else '*'}",
        ]
        if has_known:
            cells.append("yes" if cols["known"][i] else "")
        cells.append(str(cols["structure_id"][i]))
        status = str(cols["relax_status"][i])
        cells.append(status if status == "ok" else f"{status}: {cols['relax_message'][i]}")
        lines.append(cells)
    widths = [max(len(r[j]) for r in lines) for j in range(len(header) - 1)]
    out = [
        "  ".join([*(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)), r[-1]])
        for r in lines
    ]
    refs = ", ".join(
        f"{s} {v['energy_per_atom']:.3f} ({v['reference']})" for s, v in relaxed.references.items()
    )
    a = relaxed.attrs
    out.append(
        f"# {len(relaxed)} compositions of {'-'.join(a['elements'])} relaxed with "
        f"{a['potential']} ({a['n_failed']} failed), ordered by {relaxed.order}; "
        f"hull and e_form in eV/atom; * = not converged in {a['params']['steps']} steps; "
        f"{a['n_structures']} structures in {a['wall_seconds']:.1f} s"
    )
    out.append(f"# elemental references (eV/atom): {refs}")
    if relaxed.known_references:
        out.append(f"# hull includes {len(relaxed.known_references)} known library compounds")
    return "\n".join(out) + "\n"


#: No command of its own: ``afpx rank --relax`` calls :func:`relax_and_render`.
COMMANDS: list[click.Command] = []
