"""CLI commands: augment (being written)."""

from dagan_gn.cli.app import app  # noqa: F401
