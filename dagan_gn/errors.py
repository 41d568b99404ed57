"""The root of every error dagan-gn raises on purpose.

Each part raises its own subclass (``ConfigError``, ``StoreError``, ``TrainingError``, ...) with a message that names
the file or key and what to change. The command line turns a :class:`DaganError` into one ``error:`` line and a
non-zero exit; anything else is a bug and shows its traceback. Subclasses also derive from the builtin they replace
(``ValueError``, ``RuntimeError``) so callers that caught those keep working.
"""

from __future__ import annotations

__all__ = ["DaganError"]


class DaganError(Exception):
    """A bad input, configuration or environment that dagan-gn detected and can explain in one line."""
