"""``dagan import-images``: folders/zips of ``class/…/image.png`` → an HDF5 patch file (see ``docs/augment.md``).

    dagan import-images exports/ --out images.h5 --size 64 --split 0.8,0.1,0.1 --seed 0
    dagan import-images images_background_small1.zip images_background_small2.zip --out omniglot.h5 --size 32 \\
        --invert --classes-prefix Greek --classes-prefix Latin

Exit codes: 0 = every image used; 3 = written, but some images were skipped (listed in OUT.report.json);
2 = nothing written (bad option, not a folder or zip, no images, existing output).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from dagan_gn.cli.app import app, fail, reported_errors

#: Values a user may put after a flag by mistake (``--invert true``): click then reads them as a source.
_BOOLEAN_WORDS = {"true", "false", "yes", "no", "on", "off", "1", "0"}


@app.command("import-images")
def import_images_command(
    sources: List[Path] = typer.Argument(..., help="Folders and/or .zip files of <class>/.../<image> (read in "
                                         "place; several are merged, an image's relative path read once)."),
    out: Path = typer.Option(..., "--out", "-o", help="Patch file to write (OUT.partial until complete); a report "
                             "goes to OUT.report.json."),
    size: int = typer.Option(64, "--size", min=4, help="Side of the square output images (anti-aliased resize; "
                             "non-square images are stretched)."),
    invert: bool = typer.Option(False, "--invert", help="Store 1 - v: dark drawings on white (Omniglot) become "
                                "bright on dark."),
    color: bool = typer.Option(False, "--color", help="Keep 3 RGB channels (default: one gray channel)."),
    classes_prefix: Optional[List[str]] = typer.Option(None, "--classes-prefix", help="Only classes at or below "
                                                       "this folder path (repeat, or separate with commas)."),
    split: str = typer.Option("train", "--split", help="One split name for every image (train, val, test), or "
                              "train,val[,test] fractions applied within each class."),
    seed: int = typer.Option(0, "--seed", help="Seed of the within-class split."),
    salt: Optional[str] = typer.Option(None, "--salt", help="Secret salt for the image pseudonyms (default: read "
                                       "or create --salt-file)."),
    salt_file: Optional[Path] = typer.Option(None, "--salt-file", help="File holding the secret salt (default "
                                             "OUT.salt, created once); never share it with the HDF5."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar, no per-file warnings."),
) -> None:
    """Import labelled images (the class is the folder path) into the patch format that train/augment read."""
    import logging

    from dagan_gn.cli.augment import _names
    from dagan_gn.jobs.import_images import import_images

    words = [str(s) for s in sources if str(s).lower() in _BOOLEAN_WORDS and not s.exists()]
    if words:
        fail(f"{words[0]!r} is not a folder or zip: --invert and --color are flags, give them without a value "
             "(--invert, not --invert true)")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.ERROR if quiet else logging.WARNING, format="%(levelname)s %(message)s")
    with reported_errors():
        report = import_images(sources, out, size=size, invert=invert, color=color,
                               class_prefixes=_names(classes_prefix), split=split, seed=seed, salt=salt,
                               salt_file=salt_file, overwrite=overwrite, progress=not quiet)
    typer.echo(report.summary())
    if report.exit_code:
        typer.echo(f"{len(report.skipped)} image(s) skipped; see {out}.report.json", err=True)
        raise typer.Exit(report.exit_code)
