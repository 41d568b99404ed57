"""``dagan augment``, ``dagan evaluate-augmentation`` and ``dagan check-memorization``.

    dagan augment --in patches.h5 --checkpoint runs/exp1 --out synthetic.h5 --n 10 --seed 0
    dagan evaluate-augmentation --real patches.h5 --synthetic synthetic.h5 --out reports/downstream
    dagan check-memorization --real patches.h5 --synthetic synthetic.h5 --out reports/memorization
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from dagan_gn.cli.app import app, choices, device_option, fail, reported_errors

# The choices of the library functions the commands call, spelled out here so `--help` needs no torch import
# (tests/cli/test_choices.py checks that they match the library).
#: ``evaluate-augmentation --regimes``: ``dagan_gn.metrics.downstream.REGIMES``.
Regime = choices("Regime", ("real", "real+albumentations", "real+dagan", "real+both"))
#: ``--arch``: ``dagan_gn.metrics.downstream.CLASSIFIER_ARCHS`` (MONAI classifiers).
ClassifierArch = choices("ClassifierArch", ("resnet", "densenet"))
#: ``--augmentation``: ``dagan_gn.metrics.downstream.AUGMENTATION_PRESETS``.
AugmentationPreset = choices("AugmentationPreset", ("mammo", "natural", "strokes"))
#: ``check-memorization --feature``: the feature space besides pixels (``dagan_gn.metrics.memorization``).
MemorizationFeature = choices("MemorizationFeature", ("random-conv", "none"))



def _names(values: Optional[List[str]]) -> list[str] | None:
    """``--classes a --classes b`` or ``--classes a,b`` → ``["a", "b"]``."""
    if not values:
        return None
    out = [v.strip() for item in values for v in item.split(",") if v.strip()]
    return out or None


@app.command("augment")
def augment_command(
    in_path: Path = typer.Option(..., "--in", "-i", help="Real patch file (from `dagan extract-patches`)."),
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="Run folder (its newest checkpoint) or a "
                                    "checkpoint file; the EMA generator is used when the checkpoint has one."),
    out: Path = typer.Option(..., "--out", "-o", help="Synthetic patch file to write (same layout as --in, "
                             "synthetic=True, per-patch provenance)."),
    n: int = typer.Option(10, "--n", "-n", min=1, help="Synthetic variants per source patch."),
    split: str = typer.Option("train", "--split", help="Split to augment. val/test are refused (evaluation would "
                              "leak) unless --allow-eval-split."),
    classes: Optional[List[str]] = typer.Option(None, "--classes", help="Only these classes (repeat the option or "
                                                "separate with commas); default all."),
    truncation: float = typer.Option(0.0, "--truncation", min=0.0, help="Noise truncation bound (0: none); "
                                     "smaller values give variants closer to the typical ones."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", min=1, help="Generator batch size."),
    device: str = device_option(),
    seed: int = typer.Option(0, "--seed", help="Base of the per-sample noise seeds; the same seed gives the same "
                             "images."),
    contact_sheet: Optional[Path] = typer.Option(None, "--contact-sheet", help="Also write a PNG: the first sources, "
                                                 "each followed by its variants."),
    allow_eval_split: bool = typer.Option(False, "--allow-eval-split", help="Permit augmenting val/test."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing finished --out file."),
    reject_off_class: bool = typer.Option(False, "--reject-off-class", help="Do not write variants that the "
                                          "checkpoint's critic class head (model.critic_classes) puts in another "
                                          "class than their source's; the share dropped is reported and stored as "
                                          "the output's rejected_share attribute."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Write N synthetic DAGAN variants of every patch of one split.

    An interrupted run leaves OUT.partial; running the same command again finishes it without duplicates (and says
    "already complete" when OUT is finished).
    """
    from dagan_gn.jobs.augment import augment

    with reported_errors(interrupted=f"interrupted; run the same command again to finish {out}"):
        report = augment(in_path, checkpoint, out, n=n, split=split, classes=_names(classes), truncation=truncation,
                         batch_size=batch_size, device=device, seed=seed, contact_sheet=contact_sheet,
                         allow_eval_split=allow_eval_split, overwrite=overwrite, progress=not quiet,
                         reject_off_class=reject_off_class)
    for note in report.notes:
        typer.echo(f"note: {note}", err=True)
    typer.echo(report.summary())
    if report.contact_sheet is not None:
        typer.echo(f"contact sheet: {report.contact_sheet}")


@app.command("evaluate-augmentation")
def evaluate_augmentation_command(
    real: Path = typer.Option(..., "--real", help="Real patch file: its train split trains the classifier, its "
                              "test split (held-out patients) evaluates it."),
    synthetic: Optional[Path] = typer.Option(None, "--synthetic", help="Synthetic patch file from `dagan augment` "
                                             "(needed for the real+dagan and real+both regimes)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for downstream.md, downstream.json, downstream.png."),
    regimes: Optional[List[Regime]] = typer.Option(None, "--regimes", help="Regimes to run (repeat the option; "
                                                   "default: all four, only the first two without --synthetic)."),
    train_split: str = typer.Option("train", "--train-split", help="Split to train on."),
    test_split: str = typer.Option("test", "--test-split", help="Held-out split to evaluate on."),
    classes: Optional[List[str]] = typer.Option(None, "--classes", help="Only these classes (default all)."),
    arch: ClassifierArch = typer.Option("resnet", "--arch", help="Classifier: resnet (MONAI ResNet, basic "
                                        "blocks) or densenet (MONAI DenseNet121)."),
    width: int = typer.Option(16, "--width", min=1, help="Classifier base width (small for CPUs)."),
    epochs: int = typer.Option(10, "--epochs", min=1, help="Passes over the real training set (same number of "
                               "optimizer steps in every regime)."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", min=1, help="Classifier batch size."),
    lr: float = typer.Option(1e-3, "--lr", help="AdamW learning rate."),
    synthetic_ratio: str = typer.Option("0.5", "--synthetic-ratio", help="Fraction of synthetic items in the "
                                        "DAGAN regimes, or 'balance' to top every class up to the largest one."),
    augmentation: AugmentationPreset = typer.Option("mammo", "--augmentation", help="Classical augmentation "
                                                    "preset: mammo (flips, 90° turns, affine, contrast), natural "
                                                    "(flip, small shifts) or strokes (affine, no flips: "
                                                    "handwriting)."),
    bn_batches: int = typer.Option(50, "--bn-batches", min=0, help="Batches of training data the classifier's "
                                   "batch-norm statistics are recomputed on after training (precise BN; 0 keeps "
                                   "the running averages)."),
    synthetic_weight: float = typer.Option(1.0, "--synthetic-weight", min=0.0, help="Loss weight of a synthetic "
                                           "item relative to a real one (< 1 trusts the variants less)."),
    reject_off_class: bool = typer.Option(False, "--reject-off-class/--keep-off-class", help="Drop the variants "
                                          "whose embedding lies nearest another class's prototype (embedding of a "
                                          "classifier trained on the real items with classical augmentation); the "
                                          "rejected share is reported per run."),
    seeds: int = typer.Option(3, "--seeds", min=1, help="Number of seeds per regime (for the 95 % CIs)."),
    seed: int = typer.Option(0, "--seed", help="First seed; runs use seed, seed+1, ..."),
    device: str = device_option(),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Train the same classifier on real / +albumentations / +DAGAN / +both data and compare test accuracy and AUC."""
    from dagan_gn.jobs.downstream import evaluate_augmentation_files
    from dagan_gn.metrics.downstream import DownstreamConfig

    chosen = ([r.value for r in regimes] if regimes else
              [r.value for r in Regime if synthetic is not None or "dagan" not in r.value and "both" not in r.value])
    try:
        ratio: float | str = synthetic_ratio if synthetic_ratio == "balance" else float(synthetic_ratio)
    except ValueError:
        fail(f"--synthetic-ratio must be a number in [0, 1] or 'balance', got {synthetic_ratio!r}")
    cfg = DownstreamConfig(arch=arch.value, width=width, epochs=epochs, batch_size=batch_size, lr=lr,
                           synthetic_ratio=ratio, augmentation=augmentation.value,
                           seeds=list(range(seed, seed + seeds)), device=device, bn_recalibration_batches=bn_batches,
                           synthetic_weight=synthetic_weight, reject_off_class=reject_off_class)
    with reported_errors():
        report = evaluate_augmentation_files(real, synthetic, out, train_split=train_split, test_split=test_split,
                                             classes=_names(classes), config=cfg, regimes=chosen,
                                             progress=not quiet)
    typer.echo(report.to_markdown())
    typer.echo(f"report: {out / 'downstream.md'}, chart: {out / 'downstream.png'}")


@app.command("check-memorization")
def check_memorization_command(
    real: Path = typer.Option(..., "--real", help="Real patch file the generator was trained on."),
    synthetic: Path = typer.Option(..., "--synthetic", help="Synthetic patch file from `dagan augment`."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for memorization.md and memorization.json."),
    train_split: str = typer.Option("train", "--train-split", help="Split the generator was trained on."),
    heldout_splits: Optional[List[str]] = typer.Option(None, "--heldout-splits", help="Held-out splits for the "
                                                       "real-to-real baseline (default val,test)."),
    percentile: float = typer.Option(1.0, "--percentile", min=0.0, max=100.0, help="Percentile of held-out "
                                     "nearest-neighbour distances below which a synthetic patch is a near-copy."),
    copy_factor: float = typer.Option(0.5, "--copy-factor", min=0.0, help="A near-copy of another patient's patch "
                                      "closer than this × the smallest held-out distance is a patient copy."),
    feature: MemorizationFeature = typer.Option("random-conv", "--feature", help="Feature space besides pixels: "
                                                "random-conv (a seeded frozen conv net) or none."),
    max_train: Optional[int] = typer.Option(None, "--max-train", min=1, help="Subsample the training patches "
                                            "(seeded) to bound memory; sources of checked patches are kept."),
    max_synthetic: Optional[int] = typer.Option(None, "--max-synthetic", min=1, help="Subsample synthetic patches."),
    chunk_size: int = typer.Option(1024, "--chunk-size", min=1, help="Rows per distance chunk (memory bound)."),
    device: str = device_option(),
    seed: int = typer.Option(0, "--seed", help="Seed of the feature network and of subsampling."),
    strict: bool = typer.Option(False, "--strict", help="Exit with code 3 when the check fails (for release "
                                "pipelines)."),
) -> None:
    """Nearest-training-patch distances of synthetic patches vs the held-out baseline: near-copies, patient copies."""
    from dagan_gn.jobs.memorization import check_memorization_files

    with reported_errors():
        report = check_memorization_files(
            real, synthetic, out, train_split=train_split, heldout_splits=_names(heldout_splits) or ("val", "test"),
            max_train=max_train, max_synthetic=max_synthetic, percentile=percentile, copy_factor=copy_factor,
            feature_extractor=None if feature.value == "none" else feature.value, chunk_size=chunk_size, device=device,
            seed=seed,
        )
    typer.echo(report.to_markdown())
    if strict and not report.passed():
        raise typer.Exit(3)
