"""Atomic file writing and hashing: an output either appears complete under its final name or not at all.

``atomic_path`` writes to a temporary file beside the target, fsyncs it, renames it onto the target and fsyncs the
folder, so after a kill, a full disk or a power cut the target is either the old file or the complete new one, and
the temporary file is removed whenever the write fails. A failed write raises :class:`OutputError` — one line that
names the file and says the previous version is untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from dagan_gn.errors import DaganError

__all__ = [
    "OutputError",
    "RecordingWriter",
    "atomic_path",
    "atomic_write_text",
    "check_writable",
    "fsync_dir",
    "output_error",
    "printable_path",
    "save_figure",
    "sha256_file",
]


class OutputError(DaganError, OSError):
    """An output cannot be written (unwritable folder, a directory in the way, full disk, I/O error)."""


def _reason(exc: OSError) -> str:
    return (exc.strerror or str(exc)).rstrip(".").lower()


def output_error(path: str | os.PathLike, exc: OSError, what: str = "cannot write") -> OutputError:
    """The one-line :class:`OutputError` for a failed write of ``path`` (keeps the errno)."""
    err = OutputError(f"{what} {path}: {_reason(exc)}")
    err.errno = exc.errno
    return err


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a folder, so a rename or a new file in it survives a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on normal exit it is fsynced and renamed onto ``path`` (atomic on
    POSIX), on an exception it is removed, so a killed or failed write never leaves a file that looks complete and
    never replaces the previous version with a broken one.

    Raises:
        OutputError: the folder cannot be created or the temporary file cannot be written, synced or renamed
            (``ENOSPC``, ``EIO``, permissions); other exceptions from the body pass through unchanged.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
        os.close(fd)
    except OSError as exc:
        raise output_error(path, exc) from exc
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
            _fsync_file(tmp_path)
            os.replace(tmp_path, path)
        except OSError as exc:
            if isinstance(exc, DaganError):
                raise
            raise output_error(path, exc) from exc
        with contextlib.suppress(OSError):  # the rename happened; a folder that cannot be synced is not an error
            fsync_dir(path.parent)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write a matplotlib figure as a PNG atomically and close it; returns ``path`` (the one way reports save
    their figures)."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return path


class RecordingWriter:
    """A write-only file object over an unbuffered file that never raises from :meth:`write`: the first ``OSError``
    is kept in :attr:`error` and later writes are dropped. For writers that hide the OS error behind their own
    (``torch.save`` turns ``ENOSPC`` into ``RuntimeError: unexpected pos``); check :attr:`error` afterwards."""

    def __init__(self, fh: Any) -> None:
        self._fh = fh
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if self.error is None:
            try:
                done = 0
                while done < len(view):
                    done += self._fh.write(view[done:])
            except OSError as exc:
                self.error = exc
        return len(view)

    def flush(self) -> None:
        """Nothing buffered here."""


def check_writable(path: str | os.PathLike, what: str = "output") -> Path:
    """Fail early — before hours of work — when ``path`` cannot be written: it is a folder, or its folder cannot be
    created or written to. Creates the folder; leaves nothing else behind.

    Raises:
        OutputError: one line naming the path and the reason.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what} {path} is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as exc:
        raise output_error(path, exc, f"cannot write {what}") from exc
    return path


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
