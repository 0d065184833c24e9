"""Rebuild the shipped default from nothing: data, cube, model, likelihoods, evaluation, pack.

Usage (from the repository root, in an environment where afpx is installed)::

    python scripts/train_default.py --workdir runs/default [--epochs N] [--threads 2]

Each step is an ``afpx`` command (printed before it runs, so the sequence can
be repeated by hand); a step whose output already exists is skipped, so an
interrupted run continues where it stopped. The last step packs

Training the ``context`` preset (4 x 1024) takes ~2 minutes for the
coordination shells and 16 epochs of ~70 s on one free core (about 20
minutes); the whole script runs within the 2 hours that a 2-core machine
allows for it (timings.json records each step). A cube or evaluation left by a run with
another model is redone, not skipped (their recorded model SHA-256 is checked).

- ``afpx/data/default_library.{npz,json}``: templates (unique sites,
  multiplicities, provenance, geometry for CIF export) and the per-site
  likelihoods of all 118 elements, quantised and checked to keep rankings;
- ``afpx/data/default_model/``: the model's weights and configuration, so
  that users can score their own structures (``afpx.default.default_model_dir``);

and writes ``<workdir>/timings.json`` with the wall time of every step.

Reproducibility: every step is seeded (augmentation seed 0, split seed 0,
training seed 0). On the same machine and library versions a rerun gives the
same cube bit for bit and the same weights; on another machine, torch's CPU
kernels may differ in the last bits, so weights agree to float32 rounding and
rankings agree except where scores tie within that rounding.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def step(name: str, cmd: list[str], done: Path, timings: dict[str, float]) -> None:
    """Run one afpx command unless its output exists; record its wall time."""
    if done.exists():
        print(f"[{name}] skipped: {done} exists", flush=True)
        return
    print(f"[{name}] $ {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    timings[name] = round(time.perf_counter() - t0, 1)
    print(f"[{name}] {timings[name]} s", flush=True)


def model_sha256(model: Path) -> str:
    """SHA-256 of a model folder's weights (what likelihoods and evaluations record)."""
    return hashlib.sha256((model / "model.pt").read_bytes()).hexdigest()


def stale(name: str, path: Path, recorded: str | None, sha: str) -> Path:
    """``path`` if it holds the current model's output; else remove it and return a missing path.

    A cube copied from an earlier run keeps that run's likelihoods, and an
    evaluation its metrics: skipping their steps would pack one model's
    likelihoods with another model's weights.
    """
    if not path.exists() or recorded == sha:
        return path
    print(f"[{name}] {path} comes from another model ({recorded}); redoing it", flush=True)
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
    return path


def likelihood_model(cube: Path) -> str | None:
    """The model SHA-256 that a cube's likelihoods record (None without likelihoods)."""
    meta = cube / "likelihood" / "zarr.json"
    if not meta.is_file():
        return None
    return json.loads(meta.read_text()).get("attributes", {}).get("model_sha256")


def evaluation_model(report: Path) -> str | None:
    """The model SHA-256 of the likelihoods an ``afpx evaluate`` report scored."""
    metrics = report / "metrics.json"
    if not metrics.is_file():
        return None
    return json.loads(metrics.read_text()).get("likelihood", {}).get("model_sha256")


def pack(cube: Path, model: Path, out: Path) -> dict[str, object]:
    """Pack the template library with likelihoods, and the model, into ``out``."""
    from afpx.default import pack_default_library, pack_default_model
    from afpx.rank import load_library

    # templates, likelihoods and the geometry that CIF export needs, all from the cube
    library = load_library(cube)
    library.attrs.pop("cube", None)  # a local path: the package says "built-in default"
    if library.geometry is None:
        raise SystemExit(f"{cube} stores no structure geometry: rebuild it with afpx build-cube")
    # uint16 log-likelihoods (steps of 2.8e-4 in log, floor 1e-8): 31.4 MB with
    # the geometry, and the top 20 of the 40 sampled element sets unchanged but
    # for one near-tie at position 20 (scores 1e-4 apart). A floor of 1e-6 (22.1
    # MB) reordered the top 20 of 3 sets whose every composition is improbable
    # (scores ~1e-7: the 4 x 1024 model puts many sites below 1e-6); 1e-9 changes
    # none, for 36.9 MB. The manifest's rank_check records the comparison.
    manifest = pack_default_library(library, out, quantise="uint16", floor=1e-8, check_sets=40)
    model_manifest = pack_default_model(model, out / "default_model")
    return {"library": manifest, "model": model_manifest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/default"))
    parser.add_argument("--dataset", default="oqmd-icsd")
    parser.add_argument("--preset", default="context")
    parser.add_argument("--epochs", type=int, default=None, help="default: the preset's")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=ROOT / "afpx" / "data")
    args = parser.parse_args()

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    cube, model, report = work / "cube.zarr", work / "model", work / "evaluation"
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    afpx = [sys.executable, "-m", "afpx"]
    timings: dict[str, float] = {}

    step("fetch", [*afpx, "datasets", "fetch", args.dataset], work / ".no-such-file", timings)
    step(
        "build-cube",
        [
            *afpx,
            "build-cube",
            args.dataset,
            "-o",
            str(cube),
            "--seed",
            "0",
            "--split-seed",
            "0",
            # the current scheduler (threads): a 2-process cluster (--workers 2)
            # gives the same cube and peaks as low (~0.5 GB), but used more CPU
            # (277 s against 162 s on this corpus; docs/scaling.md)
            "--no-progress",
        ],
        cube,
        timings,
    )
    step(
        "train",
        [
            *afpx,
            "train",
            str(cube),
            "-o",
            str(model),
            "--preset",
            args.preset,
            *(["--epochs", str(args.epochs)] if args.epochs else []),
            "--seed",
            "0",
            "--no-progress",
        ],
        model / "model.pt",
        timings,
    )
    sha = model_sha256(model)
    step(
        "likelihood",
        [*afpx, "likelihood", str(cube), "--model", str(model), "--no-progress"],
        # the likelihoods of this model, not those of a cube copied from another run
        cube / "likelihood" if likelihood_model(cube) == sha else work / ".no-such-file",
        timings,
    )
    step(
        "evaluate",
        [
            *afpx,
            "evaluate",
            str(cube),
            "-o",
            str(report),
            "--workers",
            str(args.threads),
            "--no-progress",
        ],
        stale("evaluate", report, evaluation_model(report), sha) / "metrics.json",
        timings,
    )

    t0 = time.perf_counter()
    print(f"[pack] into {args.out}", flush=True)
    manifests = pack(cube, model, args.out)
    timings["pack"] = round(time.perf_counter() - t0, 1)
    check = manifests["library"].get("rank_check")  # type: ignore[union-attr]
    print(f"[pack] rank check of the quantised library: {check}", flush=True)
    (work / "timings.json").write_text(json.dumps(timings, indent=1) + "\n")
    shutil.copy(report / "metrics.json", work / "metrics.json")
    print(json.dumps(timings, indent=1))


if __name__ == "__main__":
    main()
