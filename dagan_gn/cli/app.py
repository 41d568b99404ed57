"""The typer application object that every command module registers on, and the one way commands report errors."""

from __future__ import annotations

import contextlib
from typing import Iterator, NoReturn

import typer

app = typer.Typer(
    name="dagan",
    help="dagan-gn: DICOM mammograms → patches → conditional DAGAN → synthetic augmentation, with metrics.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def one_line(exc: BaseException | str) -> str:
    """An error message folded onto one line (never empty)."""
    text = exc if isinstance(exc, str) else str(exc)
    return " ".join(text.split()) or (exc.__class__.__name__ if not isinstance(exc, str) else "error")


def fail(error: BaseException | str, code: int = 2) -> NoReturn:
    """Print ``error: <message>`` on stderr and exit with ``code`` (2: bad input or configuration)."""
    typer.echo(f"error: {one_line(error)}", err=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def reported_errors(*known: type[BaseException], interrupted: str = "interrupted") -> Iterator[None]:
    """Turn the ``known`` exceptions into a one-line message and exit code 2, and Ctrl-C into ``interrupted`` and
    exit code 130, so a user never sees a bare traceback for a bad input."""
    try:
        yield
    except KeyboardInterrupt:
        typer.echo(interrupted, err=True)
        raise typer.Exit(130) from None
    except known as exc:
        fail(exc)
