"""The report of an evaluation run: the verdict, a summary table, metrics.json and arrays.zarr."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from afpx import schema
from afpx.evaluate.metrics import as_str_array
from afpx.templates.util import jsonable

if TYPE_CHECKING:
    import xarray as xr

    from afpx.templates.library import TemplateLibrary

__all__ = [
    "EvaluationReport",
    "afpx_version",
    "cube_summary",
    "json_attrs",
    "summary_table",
    "verdict",
    "write_report",
]


@dataclass
class EvaluationReport:
    """Everything an evaluation run measured.

    Attributes
    ----------
    metrics : dict
        Every number (JSON-able), written as ``metrics.json``.
    arrays : xarray.Dataset
        Confusion matrices, likelihood histograms, per-structure Test 1 ranks
        and per-set Test 2 scores, written as ``arrays.zarr``.
    """

    metrics: dict[str, Any]
    arrays: xr.Dataset

    def table(self) -> str:
        """A short plain-text summary (the model next to every baseline)."""
        return summary_table(self.metrics)


def afpx_version() -> str:
    from afpx import __version__

    return __version__


def json_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    import json

    out: dict[str, Any] = {}
    for key, value in attrs.items():
        try:
            json.dumps(value)
            out[str(key)] = value
        except TypeError:
            out[str(key)] = str(value)
    return out


def cube_summary(ds: xr.Dataset, library: TemplateLibrary) -> dict[str, Any]:
    keep = ("fingerprint", "draws", "seed", "deterministic", "afpx_version", "sources", "split")
    split = as_str_array(library.split) if library.split is not None else np.zeros(0, object)
    return {
        "n_sites": int(ds.sizes[schema.SITE]),
        "n_structures": int(ds.sizes[schema.STRUCTURE]),
        "n_templates": int(library.structure_id.size),
        "n_template_sites": int(library.z.size),
        "templates_per_split": {s: int((split == s).sum()) for s in schema.SPLITS},
        "attrs": json_attrs({k: ds.attrs[k] for k in keep if k in ds.attrs}),
    }


#: (section, path, label) of the numbers the verdict compares; higher is better.
VERDICT_METRICS: Final = (
    ("test1", ("top1",), "Test 1 top-1"),
    ("test1", ("top10",), "Test 1 top-10"),
    ("test1", ("mean_reciprocal_rank",), "Test 1 MRR"),
    ("test2", ("all_templates", "binary", "hit@1"), "Test 2 binary hit@1"),
    ("test2", ("all_templates", "binary", "hit@10"), "Test 2 binary hit@10"),
    ("test2", ("all_templates", "binary", "mean_reciprocal_rank"), "Test 2 binary MRR"),
    ("test2", ("all_templates", "binary", "os_mean"), "Test 2 binary mean OS"),
    ("test2", ("all_templates", "ternary", "hit@1"), "Test 2 ternary hit@1"),
    ("test2", ("all_templates", "ternary", "hit@10"), "Test 2 ternary hit@10"),
    ("test2", ("all_templates", "ternary", "mean_reciprocal_rank"), "Test 2 ternary MRR"),
    ("test2", ("all_templates", "ternary", "os_mean"), "Test 2 ternary mean OS"),
)


def _lookup(metrics: Mapping[str, Any], section: str, path: Sequence[str], model: str) -> float:
    node: Any = metrics.get(section, {})
    if section == "test2":
        node = node.get(path[0], {}).get(model, {})
        path = path[1:]
    else:
        node = node.get(model, {})
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return math.nan
        node = node[key]
    return float(node) if isinstance(node, int | float) else math.nan


def verdict(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Does the model beat every baseline, metric by metric?

    Parameters
    ----------
    metrics : mapping
        The ``metrics`` of an :class:`EvaluationReport` (``models`` lists
        ``"model"`` first, then the baselines).

    Returns
    -------
    dict
        ``per_metric``: label to {model value, best baseline, its value,
        beats (bool, None when undefined)}; ``beats_every_baseline``: True only
        when the model beats the best baseline on every defined metric;
        ``not_beaten``: labels where it does not.
    """
    models = [m for m in metrics.get("models", []) if m != "model"]
    per: dict[str, Any] = {}
    losses: list[str] = []
    ties: list[str] = []
    for section, path, label in VERDICT_METRICS:
        value = _lookup(metrics, section, path, "model")
        base = {m: _lookup(metrics, section, path, m) for m in models}
        base = {m: v for m, v in base.items() if not math.isnan(v)}
        if math.isnan(value) or not base:
            per[label] = {"model": value, "beats": None}
            continue
        best = max(base, key=lambda m: base[m])
        beats = value > base[best]
        per[label] = {"model": value, "best_baseline": best, "baseline": base[best], "beats": beats}
        if not beats:
            losses.append(label)
            if value == base[best]:
                ties.append(label)
    defined = [v for v in per.values() if v["beats"] is not None]
    return {
        "per_metric": per,
        "beats_every_baseline": bool(defined) and not losses,
        "not_beaten": losses,
        "tied_with_a_baseline": ties,
    }


def summary_table(metrics: Mapping[str, Any]) -> str:
    """The model next to every baseline on the main numbers, as plain text."""
    models = list(metrics.get("models", []))
    rows: list[tuple[str, list[float]]] = []
    for section, path, label in VERDICT_METRICS:
        rows.append((label, [_lookup(metrics, section, path, m) for m in models]))
    for size in ("binary", "ternary"):
        rows.append(
            (
                f"Test 2 {size} mean ΔOS vs constant",
                [
                    _lookup(metrics, "test2", ("all_templates", size, "delta_os_mean"), m)
                    for m in models
                ],
            )
        )
    width = max(len(r[0]) for r in rows)
    head = " " * width + "".join(f"{m:>14}" for m in models)
    lines = [head]
    for label, values in rows:
        lines.append(f"{label:<{width}}" + "".join(f"{v:>14.3f}" for v in values))
    soft = metrics.get("softmax", {})
    if soft.get("softmax_available"):
        rates = ", ".join(f"{s} {soft[s]['error_rate']:.3f}" for s in schema.SPLITS if s in soft)
        lines.append(f"softmax error rate: {rates}")
    v = metrics.get("verdict", {})
    if len(models) < 2:
        lines.append("no baselines were scored")
    elif v.get("beats_every_baseline"):
        lines.append("the model beats every baseline on every metric above")
    elif v:
        ties = v.get("tied_with_a_baseline", [])
        lines.append(
            "the model does NOT beat every baseline on: "
            + ", ".join(v.get("not_beaten", []))
            + (f" (ties: {', '.join(ties)})" if ties else "")
        )
    rt = metrics.get("runtime", {})
    if rt:
        lines.append(
            f"Test 2: {rt.get('n_test2_sets', 0)} sets, {rt.get('test2_wall_s', 0):.1f} s; "
            f"total {rt.get('total_s', 0):.1f} s"
        )
    return "\n".join(lines)


def write_report(report: EvaluationReport, out_dir: str | os.PathLike[str]) -> dict[str, str]:
    """Write ``arrays.zarr`` and then ``metrics.json`` into a folder (created).

    ``metrics.json`` comes last, so a report that has it is complete.

    Parameters
    ----------
    report : EvaluationReport
        From :func:`evaluate`.
    out_dir : str or path
        The report folder: a local path or a URL (``s3://bucket/report``).

    Returns
    -------
    dict
        ``metrics`` and ``arrays``: the paths (or URLs) written.
    """
    import json

    from afpx.store import check_writable_folder, filesystem

    where = check_writable_folder(out_dir, what="the report folder").rstrip("/")
    fs, root = filesystem(where)  # fsspec's local filesystem for a path
    fs.makedirs(root, exist_ok=True)
    metrics_path = f"{where}/metrics.json"
    arrays_path = f"{where}/arrays.zarr"
    text = json.dumps(jsonable(report.metrics), indent=2, allow_nan=True) + "\n"
    arrays = report.arrays.copy()
    # variable-length strings: fixed-width unicode has no stable zarr v3 spec
    for name in list(arrays.variables):
        if arrays[name].dtype.kind == "U":
            arrays[name] = arrays[name].astype(object)
    arrays.to_zarr(arrays_path, mode="w", zarr_format=3, consolidated=False)
    fs.pipe_file(f"{root}/metrics.json", text.encode())
    return {"metrics": metrics_path, "arrays": arrays_path}
