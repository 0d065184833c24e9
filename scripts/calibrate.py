"""Calibration of a cube's site likelihoods on the holdout split, and a tempered copy.

Usage (from the repository root)::

    python scripts/calibrate.py CUBE.zarr [--tempered OUT.zarr]

Prints, for the holdout and test splits, the top-1 / top-5 error of the
likelihoods that ranking multiplies, the expected calibration error of the
top-label reliability curve, and the temperature T fitted on the holdout
split (``afpx.calibration.fit_temperature``). With ``--tempered``, copies the
cube to OUT.zarr with ``sigmoid(logit(p) / T)`` as its likelihoods, so that
``afpx evaluate OUT.zarr --baselines ''`` measures whether the temperature
changes Test 1 / Test 2 (the product of site likelihoods assumes calibration).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cube", type=Path)
    parser.add_argument("--tempered", type=Path, default=None)
    args = parser.parse_args()

    import zarr

    from afpx.calibration import apply_temperature, fit_temperature, reliability, topk_errors

    g = zarr.open_group(str(args.cube), mode="r")
    split = np.asarray([str(s) for s in g["split"][:]])[np.asarray(g["structure"][:])]
    z = np.asarray(g["z"][:]).astype(np.int64)
    lik = np.asarray(g["likelihood"][:])
    out: dict[str, object] = {}
    for name in ("holdout", "test"):
        sel = split == name
        rel = reliability(lik[sel], z[sel], bins=10)
        out[name] = {**topk_errors(lik[sel], z[sel]), "ece": rel["ece"], "reliability": rel}
    hold = split == "holdout"
    t = fit_temperature(lik[hold], z[hold])
    tempered = apply_temperature(lik, t)
    out["temperature"] = t
    for name in ("holdout", "test"):
        sel = split == name
        out[f"{name}_tempered_ece"] = reliability(tempered[sel], z[sel], bins=10)["ece"]
    print(json.dumps(out, indent=1))
    if args.tempered is not None:
        shutil.copytree(args.cube, args.tempered)
        w = zarr.open_group(str(args.tempered), mode="r+")
        w["likelihood"][:] = tempered
        w["likelihood"].attrs.update({"temperature": t})
        print(f"wrote {args.tempered} with likelihoods tempered by T = {t:.4f}")


if __name__ == "__main__":
    main()
