"""``afpx train`` and ``afpx likelihood``: train the network, write site likelihoods."""

from __future__ import annotations

import json
from typing import Any

import click

from afpx import AfpxError
from afpx.cli import library_errors, require_torch
from afpx.commands.ingest import scheduler_option


def _parse_overrides(items: tuple[str, ...]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; VALUE is read as JSON when it parses, else as a string."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise AfpxError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def build_configs(
    preset: str, overrides: dict[str, Any], train_options: dict[str, Any]
) -> tuple[Any, Any]:
    """Model and training configurations of a preset with overrides applied.

    ``overrides`` (from ``--set``) go to whichever configuration has the field;
    a key known to neither is an error. ``train_options`` (dedicated CLI
    options) go to the training configuration.
    """
    from dataclasses import fields

    from afpx.model import ModelConfig
    from afpx.train import TrainConfig

    model_keys = {f.name for f in fields(ModelConfig)} - {"preset"}
    train_keys = {f.name for f in fields(TrainConfig)} - {"preset"}
    m_over = {k: v for k, v in overrides.items() if k in model_keys}
    t_over = {k: v for k, v in overrides.items() if k in train_keys and k not in model_keys}
    unknown = sorted(set(overrides) - model_keys - train_keys)
    if unknown:
        raise AfpxError(
            f"unknown --set key(s) {', '.join(unknown)}; "
            f"model keys: {', '.join(sorted(model_keys))}; "
            f"training keys: {', '.join(sorted(train_keys))}"
        )
    t_over.update({k: v for k, v in train_options.items() if v is not None})
    return ModelConfig.preset_config(preset, **m_over), TrainConfig.preset_config(preset, **t_over)


@click.command("train")
@click.argument("cube")
@click.option(
    "-o",
    "--output",
    "output",
    required=True,
    type=click.Path(file_okay=False),
    help="Model folder to write (weights, config, metrics).",
)
@click.option(
    "--preset",
    type=click.Choice(["context", "small", "paper"]),
    default="context",
    show_default=True,
    help="Network and schedule: 'context' (the default: MLP on the AFP and template context), "
    "'small' (CPU-sized VAE) or 'paper' (42-layer VAE, batch 16).",
)
@click.option("--epochs", type=int, default=None, help="Epochs (default: the preset's).")
@click.option(
    "--batch-size",
    type=int,
    default=None,
    help="Batch size; the schedules scale with it (see docs/model.md).",
)
@click.option(
    "--lr-peak", type=float, default=None, help="Peak learning rate at the reference batch size."
)
@click.option("--seed", type=int, default=None, help="Seed (default 0).")
@click.option(
    "--workers",
    "num_workers",
    type=int,
    default=None,
    help="DataLoader worker processes (default 0: read in the main process).",
)
@click.option("--no-oversample", is_flag=True, help="Uniform sampling instead of element-balanced.")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Any model or training configuration field, e.g. --set kl_max=0.5 (repeatable).",
)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="CPU threads for torch (default: torch's choice, all cores). Use 1 when the cores "
    "are shared with other jobs: oversubscribed threads slow training down many times.",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the run saved in the output folder (its configuration; --epochs may raise it).",
)
@click.option(
    "--progress/--no-progress", default=None, help="Progress bar (default: on a terminal)."
)
@library_errors
def train_command(
    cube: str,
    output: str,
    preset: str,
    epochs: int | None,
    batch_size: int | None,
    lr_peak: float | None,
    seed: int | None,
    num_workers: int | None,
    no_oversample: bool,
    overrides: tuple[str, ...],
    device: str,
    threads: int | None,
    resume: bool,
    progress: bool | None,
) -> None:
    """Train the network on the train split of CUBE; write the model folder OUTPUT.

    Validation uses the holdout split. Metrics per epoch go to OUTPUT/metrics.csv
    and OUTPUT/metrics.json; the weights to OUTPUT/model.pt.
    """
    from dataclasses import replace

    require_torch("afpx train")
    import torch

    from afpx.train import TrainConfig, train

    if threads is not None:
        torch.set_num_threads(threads)

    options: dict[str, Any] = {
        "epochs": epochs,
        "batch_size": batch_size,
        "lr_peak": lr_peak,
        "seed": seed,
        "num_workers": num_workers,
        "oversample": False if no_oversample else None,
    }
    if resume:
        given = [k for k, v in options.items() if v is not None and k != "epochs"]
        if overrides:
            given.append("set")
        if given:
            raise AfpxError(
                "--resume continues with the saved configuration; only --epochs "
                f"(and --device) may be given, not {', '.join(given)}"
            )
        # only a new number of epochs is taken from the command line
        mcfg, tcfg = None, (replace(TrainConfig(), epochs=epochs) if epochs else None)
    else:
        mcfg, tcfg = build_configs(preset, _parse_overrides(overrides), options)
    out = train(
        cube,
        output,
        model_config=mcfg,
        train_config=tcfg,
        device=device,
        resume=resume,
        progress=progress,
    )
    rows = json.loads((out / "metrics.json").read_text())
    if rows:
        last = rows[-1]
        val = last.get("val_softmax_error")
        extra = f", holdout softmax error {val:.3f}" if isinstance(val, float) else ""
        click.echo(
            f"trained {last['epoch']} epochs ({last['step']} steps, "
            f"{last['examples_per_s']:.0f} examples/s){extra}; model in {out}"
        )


@click.command("likelihood")
@click.argument("cube")
@click.option(
    "--model",
    "model",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Model folder written by `afpx train`.",
)
@click.option(
    "--block-sites",
    type=int,
    default=8192,
    show_default=True,
    help="Sites scored at a time (bounds the memory).",
)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for torch.")
@click.option(
    "--workers",
    type=int,
    default=None,
    help="Score the blocks on a local Dask cluster of N processes.",
)
@scheduler_option
@click.option(
    "--progress/--no-progress", default=None, help="Progress bar (default: on a terminal)."
)
@library_errors
def likelihood_command(
    cube: str,
    model: str,
    block_sites: int,
    device: str,
    threads: int | None,
    workers: int | None,
    scheduler: str | None,
    progress: bool | None,
) -> None:
    """Write the site likelihoods of MODEL for every site into CUBE.

    Adds `likelihood` (site x element), `softmax_pred` (site) and, when the cube
    has several draws per site, `likelihood_mean`; `afp` is not touched. CUBE
    may be a URL (s3://...; written in place). Blocks of --block-sites sites
    are Dask tasks, run on --scheduler or --workers.
    """
    require_torch("afpx likelihood")
    import torch

    from afpx import schema
    from afpx.likelihood import predict

    if threads is not None:
        torch.set_num_threads(threads)

    ds = predict(
        cube,
        model,
        block_sites=block_sites,
        device=device,
        progress=progress,
        scheduler=scheduler,
        workers=workers,
    )
    names = [n for n in (schema.LIKELIHOOD, schema.LIKELIHOOD_MEAN, schema.SOFTMAX_PRED) if n in ds]
    click.echo(f"wrote {', '.join(names)} for {ds.sizes[schema.SITE]} sites into {cube}")


COMMANDS = [train_command, likelihood_command]
