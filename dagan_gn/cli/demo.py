"""``dagan demo``: the whole pipeline on a synthetic archive the tool writes itself (no patient data needed)."""

from __future__ import annotations

from pathlib import Path

import typer

from dagan_gn.cli.app import app, device_option, reported_errors


@app.command("demo")
def demo(
    out: Path = typer.Option(Path("dagan-demo"), "--out", help="Folder for the synthetic archive, patches, run and outputs."),
    seed: int = typer.Option(0, "--seed", help="Seed for the archive, extraction, training and augmentation."),
    patients: int = typer.Option(6, "--patients", min=2, help="Number of synthetic patients (4 images each)."),
    patch_size: int = typer.Option(64, "--patch-size", help="Patch side in pixels (64 keeps the CPU demo fast)."),
    steps: int = typer.Option(150, "--steps", min=1, help="Generator steps of the tiny DAGAN."),
    variants: int = typer.Option(4, "--n", min=1, help="Synthetic variants written per training patch."),
    device: str = device_option("cpu"),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Write synthetic DICOM mammograms, extract patches, train a tiny DAGAN and augment — in a few minutes on a CPU.

    Look at OUT/contact_sheet.png (source patches and their synthetic variants) and OUT/run/samples/*.png.
    """
    from dagan_gn.jobs.demo import run_demo

    with reported_errors():
        run_demo(out, seed=seed, n_patients=patients, patch_size=patch_size, steps=steps, n_variants=variants,
                 device=device, progress=not quiet, log=typer.echo)
