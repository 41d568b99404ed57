"""``dagan train``: train the conditional DAGAN (or a CIFAR-10 GAN) from a YAML config.

    dagan train --config configs/dagan_mammo_256.yaml --data patches.h5 --out runs/exp1 model.g_norm=group:8
    torchrun --nproc_per_node 4 -m dagan_gn.cli train --config ... --data ... --out ...
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer

from dagan_gn.cli.app import app, choices, device_option, reported_errors

#: ``--amp`` choices (``train.amp``).
Amp = choices("Amp", ("none", "bf16", "fp16"))


@app.command("train")
def train_command(
    overrides: Optional[List[str]] = typer.Argument(
        None,
        metavar="[OVERRIDES]...",
        help="Config overrides as section.key=value, e.g. model.g_norm=group:8 optim.n_critic=5 data.batch_size=16.",
    ),
    config: Optional[Path] = typer.Option(
        None, "--config", "-c", help="YAML experiment config (see configs/); the defaults when omitted."
    ),
    data: Optional[Path] = typer.Option(
        None, "--data", help="Training data: an HDF5 patch file (data.kind=patches), a CIFAR-10 archive/folder/zip "
        "(data.kind=cifar10) or class folders/zips of images (data.kind=image_folder). Sets data.path."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder for config.yaml, checkpoints/, samples/, "
                             "tensorboard/, metrics.jsonl and loss_curves.png."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run in --out from its newest checkpoint (refused when the config "
        "differs in anything that changes the result; starts fresh when --out has no checkpoint)."
    ),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Generator steps in total (train.steps)."),
    device: Optional[str] = device_option(None, help="auto, cpu, cuda or cuda:N (sets train.device)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of weights, data order and noise (train.seed)."),
    amp: Optional[Amp] = typer.Option(
        None, "--amp", help="Mixed precision on CUDA (train.amp); the CPU trains in fp32 unless "
        "train.amp_on_cpu=true."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar (train.progress=false)."),
) -> None:
    """Train a GAN as configured; the resolved config is saved in the run folder.

    Errors in the config or the data are reported as one line and exit code 2.
    """
    from dagan_gn.config import load_config
    from dagan_gn.jobs.train import train

    items = list(overrides or [])
    if data is not None:
        items.append(f"data.path={data}")
    if steps is not None:
        items.append(f"train.steps={steps}")
    if device is not None:
        items.append(f"train.device={device}")
    if seed is not None:
        items.append(f"train.seed={seed}")
    if amp is not None:
        items.append(f"train.amp={amp.value}")
    if quiet:
        items.append("train.progress=false")
    with reported_errors():
        cfg = load_config(config, items)
        run_dir = train(cfg, out, resume=resume)
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        typer.echo(f"run folder: {run_dir}")
