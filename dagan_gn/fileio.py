"""Atomic file writing and hashing: an output either appears complete under its final name or not at all."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path", "atomic_write_text", "printable_path", "sha256_file"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on normal exit it is renamed onto ``path`` (atomic on POSIX),
    on an exception it is removed, so a killed or failed write never leaves a file that looks complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(chunk_size), b""):
            h.update(chunk)
    return h.hexdigest()


def printable_path(path: str | os.PathLike) -> str:
    """``path`` as text that can always be printed or written to JSON: bytes of a name that are not valid UTF-8
    (e.g. a Latin-1 ``caf\\xe9.dcm`` from an old export) are shown as ``\\xe9`` escapes instead of making the
    output stream raise ``UnicodeEncodeError``. Valid UTF-8 names come back unchanged."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")
