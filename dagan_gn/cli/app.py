"""The typer application object that every command module registers on."""

import typer

app = typer.Typer(
    name="dagan",
    help="dagan-gn: DICOM mammograms → patches → conditional DAGAN → synthetic augmentation, with metrics.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
