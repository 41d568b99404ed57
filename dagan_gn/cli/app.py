"""The typer application object that every command module registers on, and the one way commands report errors."""

from __future__ import annotations

import contextlib
from typing import Iterator, NoReturn

import typer

from dagan_gn.errors import DaganError

#: ``-h`` and ``--help`` on every command and group (set once here, inherited by every command of an app).
HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}


def command_group(name: str, help: str) -> typer.Typer:
    """A typer app with the project's settings: help when called bare, no shell-completion options, plain
    tracebacks (commands report their own errors through :func:`reported_errors`)."""
    return typer.Typer(name=name, help=help, no_args_is_help=True, add_completion=False,
                       pretty_exceptions_enable=False, context_settings=HELP_OPTIONS)


app = command_group(
    "dagan", "dagan-gn: DICOM mammograms → patches → conditional DAGAN → synthetic augmentation, with metrics."
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
    """Turn a :class:`~dagan_gn.errors.DaganError` (and the ``known`` exceptions) into a one-line message and exit
    code 2, and Ctrl-C into ``interrupted`` and exit code 130, so a user never sees a bare traceback for a bad input;
    any other exception is a bug and keeps its traceback."""
    try:
        yield
    except KeyboardInterrupt:
        typer.echo(interrupted, err=True)
        raise typer.Exit(130) from None
    except (DaganError, *known) as exc:
        fail(exc)
