"""Benchmarks of the model area: streaming rate, training step, likelihood write-back.

Examples per second follow from the timings: ``batch_size / time_train_step``
and ``n_sites / time_stream_epoch``.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

_TESTS = Path(__file__).resolve().parents[2] / "tests"


def _synthetic_cube(path: Path, n_structures: int) -> Path:
    if str(_TESTS) not in sys.path:
        sys.path.insert(0, str(_TESTS))
    from _cube_helpers import make_synthetic_cube

    return make_synthetic_cube(path, n_structures=n_structures, chunk_sites=256)


class Stream:
    """Reading the train split from zarr into batches (no model)."""

    timeout = 300

    def setup(self) -> None:
        self.tmp = Path(tempfile.mkdtemp())
        self.cube = _synthetic_cube(self.tmp / "cube.zarr", 1500)  # ~3,700 sites
        from afpx.train import AFPStream

        self.stream = AFPStream(self.cube, split=None, batch_size=256)

    def teardown(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def time_stream_epoch(self) -> None:
        for _ in self.stream.batches():
            pass

    def time_stream_epoch_oversampled(self) -> None:
        self.stream.oversample = True
        for _ in self.stream.batches():
            pass
        self.stream.oversample = False

    def track_sites(self) -> int:
        return len(self.stream)


class TrainStep:
    """One optimiser step (forward, all loss terms, backward, Adam) on random data."""

    params = (["small", "paper"], [64, 256])
    param_names = ("preset", "batch_size")
    timeout = 300

    def setup(self, preset: str, batch_size: int) -> None:
        import torch

        from afpx.model import AFPNet, ModelConfig

        torch.manual_seed(0)
        self.net = AFPNet(ModelConfig.preset_config(preset)).train()
        self.opt = torch.optim.Adam(self.net.parameters(), lr=1e-4)
        g = torch.Generator().manual_seed(0)
        self.afp = torch.rand(batch_size, 12, 256, generator=g) * 5
        self.r0 = 2 + torch.rand(batch_size, generator=g)
        self.dmin = 0.9 + 0.1 * torch.rand(batch_size, generator=g)
        self.z = torch.randint(1, 119, (batch_size,), generator=g)
        self.net.initialise_standardisation(self.afp, self.r0, self.dmin)

    def time_train_step(self, preset: str, batch_size: int) -> None:
        out = self.net(self.afp, self.r0, self.dmin)
        terms = self.net.loss_terms(out, self.afp, self.z)
        loss: Any = sum(terms.values()) + 5e-4 * self.net.l2_penalty()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()


class Likelihood:
    """Scoring every site of a cube and writing ``likelihood`` back."""

    timeout = 300

    def setup(self) -> None:
        import torch

        from afpx.model import AFPNet, ModelConfig
        from afpx.train import CubeIndex, TrainConfig, TrainedModel

        self.tmp = Path(tempfile.mkdtemp())
        self.cube = _synthetic_cube(self.tmp / "cube.zarr", 1000)
        index = CubeIndex.load(self.cube)
        cfg = ModelConfig.preset_config("small")
        torch.manual_seed(0)
        self.model = TrainedModel(
            net=AFPNet(cfg).eval(),
            config=cfg,
            train_config=TrainConfig.preset_config("small"),
            fingerprint=index.fingerprint,
            path=self.tmp / "model",
            weights_sha256="0" * 64,
            meta={},
        )
        self.n_sites = index.n_sites

    def teardown(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def time_predict(self) -> None:
        from afpx.likelihood import predict

        predict(self.cube, self.model, progress=False)

    def peakmem_predict(self) -> None:
        from afpx.likelihood import predict

        predict(self.cube, self.model, block_sites=1024, progress=False)

    def track_sites(self) -> int:
        return int(np.int64(self.n_sites))
