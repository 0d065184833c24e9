"""A tiny network and a quick training schedule, for tests of the model area and others.

``train_tiny_model(cube, out)`` trains in a few seconds on a cube from
:func:`tests._cube_helpers.make_synthetic_cube` and returns the model folder,
which :func:`afpx.likelihood.predict` (``afpx likelihood``) accepts.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from afpx.model import ModelConfig
from afpx.train import TrainConfig


def tiny_model_config(**overrides: Any) -> ModelConfig:
    """A 4-layer VAE (2 convolutions each way) with 3-layer classifiers."""
    cfg = ModelConfig(
        preset="tiny",
        latent_dim=8,
        encoder_channels=(8, 16),
        convs_per_stage=1,
        kernel_size=3,
        first_stride=4,
        classifier_hidden=32,
        classifier_layers=3,
        dropout=0.0,
    )
    return replace(cfg, **overrides)


def tiny_train_config(**overrides: Any) -> TrainConfig:
    """Batch 16, a constant learning rate of 3e-3 and a small constant KL weight."""
    cfg = TrainConfig(
        preset="tiny",
        epochs=12,
        batch_size=16,
        reference_batch_size=16,
        lr_start=3e-3,
        lr_increment=0.0,
        lr_peak=3e-3,
        lr_hold=10**9,
        lr_final=3e-3,
        kl_start=0.01,
        kl_increment=0.0,
        kl_max=0.01,
        recon_weight=0.01,
        standardisation_examples=500,
        shuffle_chunks=4,
    )
    return replace(cfg, **overrides)


def train_tiny_model(
    cube: str | Path, out: str | Path, *, model: dict[str, Any] | None = None, **train: Any
) -> Path:
    """Train the tiny network on ``cube`` into folder ``out`` and return it."""
    import torch

    from afpx.train import train as run

    torch.set_num_threads(1)
    return run(
        cube,
        out,
        model_config=tiny_model_config(**(model or {})),
        train_config=tiny_train_config(**train),
        progress=False,
    )
