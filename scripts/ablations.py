"""Ablations of the site-likelihood model, each row trained and measured in one run.

Usage (from the repository root, afpx installed with the train extra)::

    python scripts/ablations.py --cube runs/default/cube.zarr --workdir runs/ablations \
        [--epochs 6] [--rows name,name,...] [--threads 2]

Every row trains :func:`afpx.train.train` with the overrides listed in
``ROWS`` (on top of the ``context`` preset unless the row names another),
keeps its best holdout epoch, and scores the ``test`` split at its natural
element distribution: softmax top-1 error, and top-1 / top-5 error of the
sigmoid likelihoods that ranking multiplies. The k-nearest-neighbour and
plain-MLP baselines of :mod:`afpx.baselines` are scored on the same split in
the same run. A row whose model folder exists is not trained again, so an
interrupted run continues. Results go to ``<workdir>/ablations.json`` and a
Markdown table on stdout (pasted into docs/model.md), with the breakdown of
the chosen row by structure size and arity.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

#: name -> (preset, model overrides, training overrides)
#: The classifier of the ``context`` preset before it became 4 x 1024 (2026-12-03):
#: the rows measured with it keep it explicitly, so that each row still means what
#: docs/model.md reports for it.
W512: dict[str, Any] = {"classifier_hidden": 512, "classifier_layers": 4}
#: The template context without the coordination shell: what the rows measured before
#: the shell joined the default (2026-12-03) read.
NO_SHELL: dict[str, Any] = {"descriptor_input": "context", **W512}

ROWS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    # the VAE of the paper (small preset), as shipped before, and its variants
    "vae-sample-balanced (previous default)": ("small", {}, {}),
    "vae-mean-balanced": ("small", {"classifier_input": "mean"}, {}),
    "vae-sample-natural": ("small", {}, {"oversample": False}),
    # no VAE: one MLP trunk, both heads side by side
    "mlp dmin (AFP + dmin only)": ("context", {**W512, "descriptor_input": "dmin"}, {}),
    "mlp dmin+r0": ("context", {**W512, "descriptor_input": "dmin_r0"}, {}),
    "mlp context, no absolute size": (
        "context",
        {**W512, "descriptor_input": "context_relative"},
        {},
    ),
    "context (default: coordination shell, 4 x 1024)": ("context", {}, {}),
    "context + coordination shell, 3 x 512 (the previous default)": ("context", W512, {}),
    "context without the coordination shell (3 x 512, the default before)": (
        "context",
        NO_SHELL,
        {},
    ),
    # sampling
    "context, balanced sampling": ("context", NO_SHELL, {"oversample": True, "balance_power": 1.0}),
    "context, tempered sampling (power 0.5)": (
        "context",
        NO_SHELL,
        {"oversample": True, "balance_power": 0.5},
    ),
    # where the likelihoods come from: a sigmoid head beside the softmax head
    "context, sigmoid head, pos_weight 1": (
        "context",
        {**NO_SHELL, "likelihood_head": "sigmoid"},
        {},
    ),
    "context, sigmoid head, pos_weight 118 (paper)": (
        "context",
        {**NO_SHELL, "likelihood_head": "sigmoid"},
        {"pos_weight": 118.0},
    ),
    # schedule
    "context, paper lr schedule (no decay)": (
        "context",
        NO_SHELL,
        {"lr_schedule": "paper", "lr_increment": 1e-5, "lr_peak": 1e-3, "lr_hold": 10**9},
    ),
    # width / depth
    "context, ELU (the paper's activation)": ("context", {**NO_SHELL, "activation": "elu"}, {}),
    "context, 2 x 256": (
        "context",
        {**NO_SHELL, "classifier_hidden": 256, "classifier_layers": 3},
        {},
    ),
    "context, 4 x 1024": (
        "context",
        {**NO_SHELL, "classifier_hidden": 1024, "classifier_layers": 5},
        {},
    ),
    # perspectives
    "context, first perspective only": ("context", {**NO_SHELL, "perspective_input": "first"}, {}),
    "context, all 12 perspectives": ("context", {**NO_SHELL, "perspective_input": "all"}, {}),
    # the coordination shell (the sites around the site) in the context
    "context + coordination shell, 4 x 1024": (
        "context",
        {"descriptor_input": "context_shell", "classifier_hidden": 1024, "classifier_layers": 5},
        {},
    ),
    "context + coordination shell, paper protocol (random site split)": (
        "context",
        {"descriptor_input": "context_shell", **W512},
        {"split_protocol": "site"},
    ),
    "context + coordination shell, 4 x 1024, paper protocol (random site split)": (
        "context",
        {"descriptor_input": "context_shell", "classifier_hidden": 1024, "classifier_layers": 5},
        {"split_protocol": "site"},
    ),
    # the paper's protocol
    "context, paper protocol (random site split)": (
        "context",
        NO_SHELL,
        {"split_protocol": "site"},
    ),
    "context, 4 x 1024, paper protocol (random site split)": (
        "context",
        {**NO_SHELL, "classifier_hidden": 1024, "classifier_layers": 5},
        {"split_protocol": "site"},
    ),
}


def test_metrics(model_dir: Path, cube: str, split_protocol: str, seed: int) -> dict[str, Any]:
    """Softmax and sigmoid errors of a model folder on the test split, with per-site hits."""
    import torch

    from afpx.checkpoint import load_model
    from afpx.train import AFPStream, CubeIndex

    m = load_model(model_dir)
    index = CubeIndex.load(
        cube,
        context=m.needs_context,
        shell=m.needs_shell,
        split_protocol=split_protocol,
        seed=seed,
    )
    stream = AFPStream(cube, split="test", batch_size=4096, shuffle=False, index=index)
    sites, soft, sig1, sig5 = [], [], [], []
    with torch.no_grad():
        for b in stream.batches():
            out = m.net(
                torch.from_numpy(b["afp"]),
                torch.from_numpy(b["r0"]),
                torch.from_numpy(b["dmin_ratio"]),
                torch.from_numpy(b["context"]) if "context" in b else None,
            )
            t = torch.from_numpy(b["z"]) - 1
            top5 = out.sigmoid_logits.topk(5, dim=1).indices
            sites.append(b["site"])
            soft.append((out.softmax_logits.argmax(1) == t).numpy())
            sig1.append((top5[:, 0] == t).numpy())
            sig5.append((top5 == t[:, None]).any(1).numpy())
    hits = {k: np.concatenate(v) for k, v in (("softmax", soft), ("sig1", sig1), ("sig5", sig5))}
    meta = json.loads((model_dir / "config.json").read_text())
    rows = json.loads((model_dir / "metrics.json").read_text())
    return {
        "softmax_error": float(1 - hits["softmax"].mean()),
        "sigmoid_top1_error": float(1 - hits["sig1"].mean()),
        "sigmoid_top5_error": float(1 - hits["sig5"].mean()),
        "holdout_softmax_error": min(r["val_softmax_error"] for r in rows),
        "epoch_kept": meta.get("model_epoch"),
        "train_seconds": round(sum(r["seconds"] for r in rows), 1),
        "n_test_sites": int(hits["softmax"].size),
        "_sites": np.concatenate(sites),
        "_hits": hits["softmax"],
    }


def baseline_rows(cube: str, seed: int) -> dict[str, dict[str, Any]]:
    """kNN and plain-MLP baselines on the composition split's test sites."""
    from afpx.baselines import BaselineParams, SiteFeatures, baseline_likelihoods
    from afpx.checkpoint import open_store
    from afpx.train import CubeIndex

    index = CubeIndex.load(cube)
    g = open_store(cube)
    afp = g["afp"]
    afp_mean = np.empty((index.n_sites, afp.shape[2]), np.float32)
    for a in range(0, index.n_sites, 16384):
        afp_mean[a : a + 16384] = np.asarray(afp[a : a + 16384]).mean(axis=1)
    features = SiteFeatures(afp_mean, index.r0, index.dmin_ratio)
    is_train = index.site_split == "train"
    test = index.site_split == "test"
    out: dict[str, dict[str, Any]] = {}
    for name in ("knn", "mlp", "coordination", "frequency"):
        t0 = time.perf_counter()
        lik = baseline_likelihoods(
            index.z,
            np.asarray(g["coordination"][:]),
            is_train,
            names=[name],
            params=BaselineParams(seed=seed),
            features=features,
        )[name]
        z = index.z[test].astype(np.int64) - 1
        top5 = np.argsort(-lik[test], axis=1)[:, :5]
        out[f"baseline: {name}"] = {
            "softmax_error": float(np.mean(top5[:, 0] != z)),
            "sigmoid_top1_error": float(np.mean(top5[:, 0] != z)),
            "sigmoid_top5_error": float(np.mean((top5 != z[:, None]).all(1))),
            "train_seconds": round(time.perf_counter() - t0, 1),
            "n_test_sites": int(test.sum()),
        }
    return out


def breakdown(cube: str, sites: np.ndarray, hits: np.ndarray) -> dict[str, dict[str, float]]:
    """Test error by unique sites per structure and by number of elements."""
    from afpx.checkpoint import open_store

    g = open_store(cube)
    structure = np.asarray(g["structure"][:])
    z = np.asarray(g["z"][:])
    n_unique = np.asarray(g["n_unique_sites"][:])[structure]
    pairs = np.unique(np.stack([structure, z], 1), axis=0)  # (structure, element) once each
    site_arity = np.bincount(pairs[:, 0], minlength=int(structure.max()) + 1)[structure]
    out: dict[str, dict[str, float]] = {"unique sites": {}, "elements": {}}
    for label, lo, hi in (("1-2", 1, 2), ("3-5", 3, 5), ("6-13", 6, 13), (">=14", 14, 10**9)):
        sel = (n_unique[sites] >= lo) & (n_unique[sites] <= hi)
        if sel.any():
            out["unique sites"][label] = round(float(1 - hits[sel].mean()), 3)
    for k in (1, 2, 3, 4):
        sel = site_arity[sites] == k if k < 4 else site_arity[sites] >= 4
        if sel.any():
            out["elements"][str(k) if k < 4 else ">=4"] = round(float(1 - hits[sel].mean()), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cube", required=True)
    parser.add_argument("--workdir", type=Path, default=Path("runs/ablations"))
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--rows", default="", help="row names separated by ; (default: all)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--baselines-only", action="store_true")
    args = parser.parse_args()

    import torch

    from afpx.model import ModelConfig
    from afpx.train import TrainConfig, train

    torch.set_num_threads(args.threads)
    wanted = [r.strip() for r in args.rows.split(";") if r.strip()] or list(ROWS)
    args.workdir.mkdir(parents=True, exist_ok=True)
    results_file = args.workdir / "ablations.json"
    results: dict[str, Any] = json.loads(results_file.read_text()) if results_file.is_file() else {}
    for name in [] if args.baselines_only else wanted:
        preset, model_over, train_over = ROWS[name]
        folder = args.workdir / name.replace(" ", "_").replace("/", "-")
        tcfg = TrainConfig.preset_config(
            preset, **{"epochs": args.epochs, "seed": args.seed, "keep_best": True, **train_over}
        )
        if not (folder / "manifest.json").is_file():
            print(f"[{name}] training", flush=True)
            train(
                args.cube,
                folder,
                model_config=ModelConfig.preset_config(preset, **model_over),
                train_config=tcfg,
                progress=False,
                resume=(folder / "state.pt").is_file(),
            )
        row = test_metrics(folder, args.cube, tcfg.split_protocol, args.seed)
        sites, hits = row.pop("_sites"), row.pop("_hits")
        row["breakdown"] = breakdown(args.cube, sites, hits)
        results[name] = row
        results_file.write_text(json.dumps(results, indent=1))
        print(f"[{name}] {row}", flush=True)
    if not args.no_baselines:
        results.update(baseline_rows(args.cube, args.seed))
        results_file.write_text(json.dumps(results, indent=1))
    print(
        "| row | test softmax error | sigmoid top-1 error | sigmoid top-5 error "
        "| holdout error | epoch kept | train s |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['softmax_error']:.3f} | {r['sigmoid_top1_error']:.3f} "
            f"| {r['sigmoid_top5_error']:.3f} | {r.get('holdout_softmax_error', float('nan')):.3f} "
            f"| {r.get('epoch_kept', '')} | {r['train_seconds']} |"
        )
    default = "context (default: coordination shell, 4 x 1024)"
    if default in results and "breakdown" in results[default]:
        print(json.dumps(results[default]["breakdown"], indent=1))


if __name__ == "__main__":
    main()
