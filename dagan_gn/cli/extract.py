"""CLI commands ``dagan extract-patches`` and ``dagan merge-patches`` (see ``docs/extract.md``).

Exit codes: 0 = every input file was used; 3 = finished, but some files were skipped (listed in the log and in
``<out>.report.json``); 2 = fatal (bad options, unreadable labels CSV, a refused or locked output, resume mismatch, a
failed write; nothing written as final, a ``.partial`` file stays resumable); 130 = interrupted (``--resume``
continues).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional

import typer

from dagan_gn.cli.app import app, reported_errors
from dagan_gn.fileio import printable_path


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise typer.BadParameter(f"expected i/n such as 0/4, got {text!r}", param_hint="--shard") from None
    if n < 1 or not 0 <= i < n:
        raise typer.BadParameter(f"need 0 <= i < n, got {text!r}", param_hint="--shard")
    return i, n


def _setup_logging(quiet: bool) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(message)s")


@app.command("extract-patches")
def extract_patches_cmd(
    inputs: List[Path] = typer.Argument(..., help="DICOM files and/or folders (searched recursively; files with or "
                                                  "without .dcm)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output HDF5 patch file (written as OUT.partial, renamed when "
                                                      "complete; a report goes to OUT.report.json)."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Lesion labels CSV (docs/labels-csv.md). Without it "
                                                                 "every patch is class 'tissue'."),
    patch_size: int = typer.Option(256, "--patch-size", help="Patch side S in pixels (after --target-spacing)."),
    per_image: int = typer.Option(8, "--per-image", help="Normal-tissue patches drawn per image."),
    per_lesion: int = typer.Option(1, "--per-lesion", help="Lesion-centred patches per labelled lesion (each "
                                                           "jittered; the lesion stays inside the patch)."),
    stride: Optional[int] = typer.Option(None, "--stride", help="Grid mode: take every qualifying normal patch on "
                                                                "a grid with this step (ignores --per-image)."),
    min_tissue: float = typer.Option(0.9, "--min-tissue", help="Minimum fraction of a normal patch inside the "
                                                               "breast mask (0-1)."),
    target_spacing: Optional[float] = typer.Option(None, "--target-spacing", help="Downsample every image to this "
                                                   "pixel spacing in mm first, so patches mean the same physical "
                                                   "size across scanners."),
    split: str = typer.Option("0.8,0.1,0.1", "--split", help="train,val,test fractions, assigned per patient."),
    workers: int = typer.Option(1, "--workers", "-j", help="Decoding processes (one writer process appends)."),
    seed: int = typer.Option(0, "--seed", help="Seed of patch sampling and of the patient split."),
    salt: Optional[str] = typer.Option(None, "--salt", help="Secret salt for the pseudonyms (default: read or "
                                                            "create --salt-file)."),
    salt_file: Optional[Path] = typer.Option(None, "--salt-file", help="File holding the secret salt (default "
                                             "OUT.salt, created once). Keep it secret; never share it with the "
                                             "HDF5. Shards of one archive must share it."),
    resume: bool = typer.Option(False, "--resume", help="Continue OUT.partial left by a killed run (same options)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT (kept until the new file is "
                                   "complete). Never allowed for an input file or a path inside an input folder."),
    max_pixels: int = typer.Option(100_000_000, "--max-pixels", min=1, help="Skip, before decoding, images whose "
                                   "header declares more pixels (rows x columns x samples x frames); a 4.5k x 2.7k "
                                   "film is 12 M."),
    shard: Optional[str] = typer.Option(None, "--shard", help="i/n: process only the i-th of n deterministic parts "
                                                              "of the archive (job arrays); join with merge-patches."),
    allow_modality: List[str] = typer.Option([], "--allow-modality", help="Also accept this DICOM modality "
                                             "(repeatable; '*' for any). MG is always accepted."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar; only warnings and errors."),
) -> None:
    """Extract S×S patches from DICOM mammograms into one HDF5 file ready for GAN training.

    Exit code 0: all files used; 3: some files were skipped (see OUT.report.json); 2: fatal error."""
    _setup_logging(quiet)
    from dagan_gn.jobs.extract_patches import ExtractionOptions, extract_patches

    try:
        from dagan_gn.ingest.privacy import parse_split_fractions

        fractions = parse_split_fractions(split)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--split") from None
    shard_tuple = _parse_shard(shard) if shard else (0, 1)
    modalities = ("MG", *[m.upper() for m in allow_modality])
    shown = printable_path(out)
    with reported_errors(interrupted=f"interrupted; run the same command with --resume to continue {shown}"):
        options = ExtractionOptions(
            patch_size=patch_size, per_image=per_image, per_lesion=per_lesion, min_tissue=min_tissue, stride=stride,
            target_spacing_mm=target_spacing, split=fractions, workers=workers, seed=seed, shard=shard_tuple,
            allow_modalities=modalities, max_pixels=max_pixels,
        )
        report = extract_patches(inputs, out, options, labels_csv=labels, salt=salt, salt_file=salt_file,
                                 resume=resume, overwrite=overwrite, progress=not quiet)
    duplicates = f", {report.files_duplicate} duplicate(s) written once" if report.files_duplicate else ""
    typer.echo(
        f"{shown}: {report.patches_total} patches ({report.patches_written} new) from {report.files_used} files; "
        f"{report.files_skipped} skipped{duplicates}, {report.files_already_done} already done; "
        f"report {shown}.report.json"
    )
    if report.exit_code and report.patches_total == 0:
        # Nothing usable at all: say so plainly (the empty file stays, so shards of a --shard run still merge).
        typer.echo(f"error: none of the {report.files_skipped} input file(s) gave patches, so {shown} holds none; "
                   f"the reason for each file is in {shown}.report.json", err=True)
    elif report.exit_code:
        typer.echo(f"warning: {report.files_skipped} file(s) skipped; reasons in {shown}.report.json", err=True)
    raise typer.Exit(report.exit_code)


@app.command("merge-patches")
def merge_patches_cmd(
    inputs: List[Path] = typer.Argument(..., help="Patch files to join (e.g. the shards of extract-patches --shard)."),
    out: Path = typer.Option(..., "--out", "-o", help="Merged HDF5 patch file (written atomically)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT (never one of the inputs)."),
    seed: int = typer.Option(0, "--seed", help="Accepted like every command's; merging draws nothing at random, so "
                             "the merged file is the same for every seed (the rows keep their input order)."),
) -> None:
    """Join patch files (same patch size, format and salt) into one; class tables are unified."""
    from dagan_gn.store.patch_file import PatchFile, merge_patch_files

    with reported_errors(interrupted=f"interrupted; {printable_path(out)} was not written"):
        merged = merge_patch_files(inputs, out, overwrite=overwrite)
        with PatchFile(merged) as pf:
            typer.echo(f"{printable_path(merged)}: {len(pf)} patches from {len(inputs)} files, "
                       f"classes {pf.class_names}")
