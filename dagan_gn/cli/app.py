"""The typer application object that every command module registers on, and the one way commands report errors."""

from __future__ import annotations

import contextlib
import enum
import re
from typing import Any, Iterable, Iterator, NoReturn

import typer
from typer.core import TyperGroup

from dagan_gn.errors import DaganError

#: ``-h`` and ``--help`` on every command and group (set once here, inherited by every command of an app).
HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}


def _bare_flags(params: Iterable[Any]) -> None:
    for param in params:
        if getattr(param, "param_type_name", "") == "option" and getattr(param, "is_flag", False) \
                and param.metavar is None:
            param.metavar = ""


def show_flags_as_flags(command: Any, ctx: Any) -> Any:
    """Give every on/off option of ``command`` (``--invert``, ``--quiet``, ``--help``) an empty metavar, so its help
    line shows the bare flag: typer would print ``--invert <bool>``, which reads as if it took a value (and
    ``--invert true`` then makes ``true`` an argument)."""
    _bare_flags(command.get_params(ctx))
    return command


class DaganGroup(TyperGroup):
    """The command group of ``dagan``: its commands' flags are shown as flags (:func:`show_flags_as_flags`)."""

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        return None if command is None else show_flags_as_flags(command, ctx)

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)
        _bare_flags(params)
        return params


def command_group(name: str, help: str) -> typer.Typer:
    """A typer app with the project's settings: help when called bare, no shell-completion options, plain
    tracebacks (commands report their own errors through :func:`reported_errors`), flags shown as flags."""
    return typer.Typer(name=name, help=help, no_args_is_help=True, add_completion=False,
                       pretty_exceptions_enable=False, context_settings=HELP_OPTIONS, cls=DaganGroup)


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
