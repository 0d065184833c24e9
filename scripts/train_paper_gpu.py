"""Train the paper's network (``paper`` preset: 42-layer VAE) on a CUDA GPU, in bounded time.

Usage (one command, from the repository root, afpx installed with the train extra and a
CUDA build of torch)::

    python scripts/train_paper_gpu.py CUBE.zarr -o runs/paper-gpu [--minutes 60] [--batch-size 256]

What it does: ``afpx.train.train`` with the ``paper`` preset on ``--device cuda``,
bfloat16 autocast (``mixed_precision``), the batch size scaled from the paper's 16
with its schedule (square-root learning-rate rule, see docs/model.md), the best
holdout epoch kept, and ``time_limit_s`` so the run stops after the first epoch that
ends past ``--minutes`` (the checkpoint is complete; run again with ``--resume`` to
continue). At the end it prints examples per second and the best holdout softmax
error, for the model card.

The paper's schedule warms the learning rate up over 99,000 batches of 16; on two CPU
cores that alone takes about 9 hours, which is why afpx ships the ``context`` preset.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cube", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()

    import torch

    from afpx.model import ModelConfig
    from afpx.train import TrainConfig, train

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this recipe needs a GPU (see docs/model.md for CPU runs)")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    tcfg = TrainConfig.preset_config(
        "paper",
        epochs=args.epochs,
        batch_size=args.batch_size,
        mixed_precision=True,
        keep_best=True,
        time_limit_s=args.minutes * 60.0,
        num_workers=0,
    )
    train(
        args.cube,
        args.output,
        model_config=ModelConfig.preset_config("paper"),
        train_config=tcfg,
        device="cuda",
        resume=args.resume,
        progress=True,
    )
    rows = json.loads((args.output / "metrics.json").read_text())
    best = min(rows, key=lambda r: r["val_softmax_error"])
    rate = sum(r["examples"] for r in rows[-1:]) / max(sum(r["seconds"] for r in rows), 1e-9)
    print(
        json.dumps(
            {
                "epochs": len(rows),
                "examples_per_s": round(rate, 1),
                "best_epoch": best["epoch"],
                "holdout_softmax_error": best["val_softmax_error"],
                "holdout_sigmoid_top5_error": best["val_sigmoid_top5_error"],
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
