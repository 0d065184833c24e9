"""Markdown tables of one or more ``afpx evaluate`` reports, as quoted in docs/model-card.md.

Usage::

    python scripts/metrics_tables.py evaluation/metrics.json [LABEL=other/metrics.json ...]

The first report gives every model it scored (the model and the baselines of
the same run); each further ``LABEL=path`` adds its ``model`` column under
LABEL (for instance a variant of the model evaluated on the same cube).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _columns(argv: list[str]) -> list[tuple[str, dict[str, Any], str]]:
    first = json.loads(Path(argv[0]).read_text())
    cols = [(name, first, name) for name in first["models"]]
    for extra in argv[1:]:
        label, _, path = extra.partition("=")
        cols.append((label, json.loads(Path(path).read_text()), "model"))
    return cols


def _fmt(v: Any) -> str:
    return "—" if v is None or v != v else f"{v:.3f}"


def main(argv: list[str]) -> None:
    cols = _columns(argv)
    head = "| | " + " | ".join(c[0] for c in cols) + " |"
    rule = "|---|" + "---|" * len(cols)
    print("| per-site, test split | " + " | ".join(c[0] for c in cols) + " |")
    print(rule)
    for key, label in (
        ("error_rate", "softmax top-1 error"),
        ("likelihood_top1_error", "likelihood top-1 error"),
        ("likelihood_top5_error", "likelihood top-5 error"),
        ("likelihood_ece", "likelihood ECE"),
    ):
        vals = [m["softmax"]["test"].get(key) if name == "model" else None for _, m, name in cols]
        print(f"| {label} | " + " | ".join(_fmt(v) for v in vals) + " |")
    print()
    print(head.replace("| |", "| Test 1 (every test structure) |", 1))
    print(rule)
    for key, label in (
        ("top1", "top-1 (mid-rank)"),
        ("top10", "top-10 (mid-rank)"),
        ("mean_reciprocal_rank", "mean reciprocal rank"),
        ("median_rank", "median rank"),
    ):
        vals = [m["test1"][name].get(key) for _, m, name in cols]
        print(f"| {label} | " + " | ".join(_fmt(v) for v in vals) + " |")
    n = cols[0][1]["test1"]["model"]["n_structures"]
    print(f"\n{n} test structures.\n")
    print(head.replace("| |", "| Test 2, all templates |", 1))
    print(rule)
    for size in ("binary", "ternary"):
        for key in ("hit@1", "hit@10", "mean_reciprocal_rank", "os_mean"):
            vals = [m["test2"]["all_templates"][name][size].get(key) for _, m, name in cols]
            print(f"| {size} {key} | " + " | ".join(_fmt(v) for v in vals) + " |")
    t2 = cols[0][1]["test2"]["all_templates"]["model"]
    print(
        f"\nSets: {t2['binary']['n_sets']} binary, {t2['ternary']['n_sets']} ternary "
        "(every set of the test split)."
    )


if __name__ == "__main__":
    main(sys.argv[1:])
