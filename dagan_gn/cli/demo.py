"""CLI commands: demo (being written)."""

from dagan_gn.cli.app import app  # noqa: F401
