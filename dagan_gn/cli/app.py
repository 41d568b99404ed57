"""The typer application object that every command module registers on, and the one way commands report errors."""

from __future__ import annotations

import contextlib
import enum
import re
from typing import Any, Iterable, Iterator, NoReturn

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


def choices(name: str, values: Iterable[str]) -> type[enum.Enum]:
    """A ``str`` enum of ``values`` for an option, so ``--help`` lists the choices and typer rejects others."""
    return enum.Enum(name, {v: v for v in values}, type=str)


#: What ``--device`` accepts (whether CUDA is present is checked when the command runs).
DEVICE_METAVAR = "[auto|cpu|cuda|cuda:N]"
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def _parse_device(value: str) -> str:
    if not _DEVICE.fullmatch(value):
        raise typer.BadParameter(f"{value!r} is not a device; use auto, cpu, cuda or cuda:N")
    return value


def device_option(default: str | None = "auto", help: str = "Where to run: auto (CUDA when present), cpu, cuda or "
                  "cuda:N.") -> Any:
    """The ``--device`` option of every command: the choices in ``--help``, a usage error for anything else."""
    return typer.Option(default, "--device", parser=_parse_device, metavar=DEVICE_METAVAR, help=help)


def one_line(exc: BaseException | str) -> str:
    """An error message folded onto one line (never empty)."""
    text = exc if isinstance(exc, str) else str(exc)
    return " ".join(text.split()) or (exc.__class__.__name__ if not isinstance(exc, str) else "error")


def fail(error: BaseException | str, code: int = 2) -> NoReturn:
    """Print ``error: <message>`` on stderr and exit with ``code`` (2: bad input or configuration)."""
    typer.echo(f"error: {one_line(error)}", err=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def reported_errors(*, interrupted: str = "interrupted") -> Iterator[None]:
    """The one way commands report errors: a :class:`~dagan_gn.errors.DaganError` (a bad input, config or
    environment that dagan-gn detected) or an ``OSError`` (a missing file, a full disk) becomes one ``error:`` line
    and exit code 2; Ctrl-C becomes ``interrupted`` and exit code 130. Anything else is a bug in dagan-gn or a
    library and keeps its traceback."""
    try:
        yield
    except KeyboardInterrupt:
        typer.echo(interrupted, err=True)
        raise typer.Exit(130) from None
    except (DaganError, OSError) as exc:
        fail(exc)
