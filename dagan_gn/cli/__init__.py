"""Command-line interface: ``dagan <command>``. Each command lives in its own module, parses its options,
builds a config and calls one library function; heavy imports happen inside the commands so ``--help`` is fast."""

from dagan_gn.cli.app import app

# Importing the command modules registers their commands on ``app``.
from dagan_gn.cli import extract as _extract  # noqa: F401,E402
from dagan_gn.cli import train as _train  # noqa: F401,E402
from dagan_gn.cli import augment as _augment  # noqa: F401,E402
from dagan_gn.cli import evaluate as _evaluate  # noqa: F401,E402
from dagan_gn.cli import demo as _demo  # noqa: F401,E402
from dagan_gn.cli import assess as _assess  # noqa: F401,E402
from dagan_gn.cli import images as _images  # noqa: F401,E402
from dagan_gn.cli import report as _report  # noqa: F401,E402


def main() -> None:
    """Console-script entry point."""
    app()


__all__ = ["app", "main"]
