"""CLI commands: extract (being written)."""

from dagan_gn.cli.app import app  # noqa: F401
