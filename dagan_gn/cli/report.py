"""``dagan report``: one self-contained HTML release card for a synthetic set (see ``docs/report.md``).

    dagan report --real patches.h5 --synthetic synthetic.h5 [--checkpoint RUN] [--assess assess.json] \\
        [--evaluate eval.json] [--downstream downstream.json] --out card/ --seed 0
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dagan_gn.cli.app import app, device_option, reported_errors


@app.command("report")
def report_command(
    real: Path = typer.Option(..., "--real", help="Real patch file the generator was trained on (its train split "
                              "are the members of the membership test; test/val are held out)."),
    synthetic: Path = typer.Option(..., "--synthetic", help="Synthetic patch file from `dagan augment`."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for card.html (self-contained) and card.json."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Run folder or checkpoint file: its hash "
                                              "and step are stated and checked against the synthetic file's."),
    assess: Optional[Path] = typer.Option(None, "--assess", help="assess.json from `dagan assess` (quality "
                                          "section)."),
    evaluate: Optional[Path] = typer.Option(None, "--evaluate", help="JSON from `dagan evaluate --out` (FID/KID)."),
    downstream: Optional[Path] = typer.Option(None, "--downstream", help="downstream.json from `dagan "
                                              "evaluate-augmentation` (usefulness section)."),
    heldout_split: str = typer.Option("test", "--heldout-split", help="Held-out real split: the non-members of the "
                                      "membership tests."),
    reference_split: str = typer.Option("val", "--reference-split", help="Real split for DOMIAS's reference "
                                        "density (half of --heldout-split when it has fewer than 8 patches)."),
    max_members: int = typer.Option(2000, "--max-members", min=2, help="Members and non-members at most (seeded "
                                    "subsets)."),
    max_synthetic: int = typer.Option(5000, "--max-synthetic", min=2, help="Synthetic patches checked at most "
                                      "(seeded subset)."),
    n_bootstrap: int = typer.Option(1000, "--bootstrap", min=10, help="Bootstrap resamples for each AUC's 95 % "
                                    "interval."),
    device: str = device_option(default="cpu"),
    seed: int = typer.Option(0, "--seed", help="Seed of every random choice (tiles, subsets, bootstrap, features)."),
) -> None:
    """Write a release card: what the synthetic set is, how it looks, its quality, usefulness and privacy
    (memorization, membership inference), each with a verdict and its threshold."""
    from dagan_gn.jobs.report import release_card

    with reported_errors():
        card = release_card(real, synthetic, out, checkpoint=checkpoint, assess_json=assess, evaluate_json=evaluate,
                            downstream_json=downstream, heldout_split=heldout_split, reference_split=reference_split,
                            max_members=max_members, max_synthetic=max_synthetic, n_bootstrap=n_bootstrap,
                            device=device, seed=seed)
    typer.echo(card.summary())
    typer.echo(f"card: {card.files['html']} (figures as JSON: {card.files['json'].name})")
