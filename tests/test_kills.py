"""Real kills (SIGINT, SIGKILL) of `afpx train` and `afpx likelihood` at seeded random points.

Nothing already done may be lost: a killed training resumes to the weights of
an uninterrupted run, and a killed likelihood write leaves the cube's previous
likelihoods intact (or none) with a lock that does not block the next run.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from _cube_helpers import make_synthetic_cube
from _model_helpers import tiny_train_config, train_tiny_model

from afpx import schema
from afpx.checkpoint import load_model
from afpx.likelihood import lock_path, predict, require_likelihood
from afpx.train import train

ROOT = Path(__file__).resolve().parents[1]

TRAIN = """
import sys
sys.path.insert(0, {tests!r})
from _model_helpers import train_tiny_model
train_tiny_model({cube!r}, {out!r}, epochs={epochs})
"""

LIKELIHOOD = """
from afpx.likelihood import predict
predict({cube!r}, {model!r}, block_sites=4, batch_size=4, progress=False)
"""


def _start(code: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def _wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None or time.monotonic() - t0 > timeout:
            raise AssertionError(f"{path} never appeared: {proc.communicate()[1].decode()[-500:]}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def cube(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_cube(tmp_path_factory.mktemp("kill") / "cube.zarr", n_structures=40)


@pytest.mark.parametrize(("sig", "seed"), [(signal.SIGKILL, 0), (signal.SIGINT, 1)])
def test_killed_training_resumes_to_the_uninterrupted_weights(
    cube: Path, tmp_path: Path, sig: int, seed: int
) -> None:
    torch.set_num_threads(1)
    full = train_tiny_model(cube, tmp_path / "full", epochs=3)
    out = tmp_path / "killed"
    code = TRAIN.format(tests=str(ROOT / "tests"), cube=str(cube), out=str(out), epochs=3)
    proc = _start(code)
    _wait_for(out / "state.pt", proc)  # at least one epoch is safe on disk
    time.sleep(float(np.random.default_rng(seed).uniform(0.0, 0.3)))
    proc.send_signal(sig)
    proc.wait(timeout=60)
    # whatever the kill interrupted, --resume finishes the run
    train(cube, out, train_config=tiny_train_config(epochs=3), resume=True, progress=False)
    rows = json.loads((out / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    a = torch.load(full / "model.pt", weights_only=True)
    b = torch.load(out / "model.pt", weights_only=True)
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)
    load_model(out)  # the manifest matches


@pytest.mark.parametrize(("sig", "seed"), [(signal.SIGKILL, 2), (signal.SIGINT, 3)])
def test_killed_likelihood_keeps_the_previous_values(
    cube: Path, tmp_path: Path, sig: int, seed: int
) -> None:
    import shutil

    torch.set_num_threads(1)
    first = train_tiny_model(cube, tmp_path / "m1", epochs=1)
    second = train_tiny_model(cube, tmp_path / "m2", epochs=2)
    target = tmp_path / "scored.zarr"
    shutil.copytree(cube, target)
    before = predict(target, first, progress=False)[schema.LIKELIHOOD].values
    proc = _start(LIKELIHOOD.format(cube=str(target), model=str(second)))
    _wait_for(Path(lock_path(target)), proc)
    time.sleep(float(np.random.default_rng(seed).uniform(0.0, 0.5)))
    proc.send_signal(sig)
    proc.wait(timeout=60)
    import xarray as xr

    ds = xr.open_zarr(target, consolidated=False)
    sha = str(ds[schema.LIKELIHOOD].attrs["model_sha256"])
    if sha == load_model(first).weights_sha256:  # killed before the swap: untouched
        np.testing.assert_array_equal(ds[schema.LIKELIHOOD].values, before)
    else:  # the write had completed: every variable is the second model's
        assert sha == load_model(second).weights_sha256
    require_likelihood(ds)
    # the lock of the killed writer does not block the next run, which cleans up
    after = predict(target, second, progress=False)
    assert after[schema.LIKELIHOOD].attrs["model_sha256"] == load_model(second).weights_sha256
    assert not Path(lock_path(target)).exists()
    assert not [k for k in zarr.open_group(str(target)).array_keys() if "__" in k]
