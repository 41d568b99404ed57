"""One lock per output, so two runs never write the same file or run folder at once.

``with output_lock(out, what="extract-patches"):`` takes an exclusive ``fcntl.flock`` on ``<out>.lock`` (beside the
output file, or beside the run folder) and records in it who holds it: the job, pid, host and start time. A second
run on the same output gets one :class:`OutputLockError` line naming that process instead of touching a file the
first one is writing. The kernel drops the lock when the holder exits or is killed (``kill -9``, OOM killer), so a
crashed run never blocks the next one: its lock file is taken over with a note naming the dead run. The lock file is
removed on a normal exit.

Decoding workers forked while a lock is held do not keep it: the lock is the parent's alone, so worker processes
orphaned by a killed parent cannot block the ``--resume``.

``flock`` works on local file systems and on NFSv4 (Linux maps it onto POSIX byte-range locks there); on a share that
does not support locks the error says so.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import functools
import inspect
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from dagan_gn.errors import DaganError
from dagan_gn.fileio import printable_path

__all__ = ["OutputLockError", "lock_path", "output_lock", "locks_output"]

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


class OutputLockError(DaganError, OSError):
    """An output is held by another live run, or its lock file cannot be created (unwritable place)."""


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of an output: ``<path>.lock`` beside it (for a run folder, beside the folder)."""
    return Path(os.path.normpath(os.fspath(path)) + ".lock")


#: File descriptors of the locks this process holds (closed in forked children; see the module docstring).
_HELD: dict[int, Path] = {}


def _drop_inherited_locks() -> None:
    # A forked child shares the parent's open lock file; closing the child's descriptor leaves the parent's lock in
    # place (flock belongs to the open file, which the parent still has open) but means the child never keeps it.
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_inherited_locks)


def _holder_record(what: str) -> dict[str, Any]:
    return {
        "what": what,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def _read_record(fd: int) -> dict[str, Any] | None:
    try:
        data = os.pread(fd, 4096, 0)
        record = json.loads(data.decode("utf-8")) if data.strip() else None
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _describe(record: dict[str, Any] | None) -> str:
    if not record:
        return "another process (it has not written its name into the lock file yet)"
    return (f"{record.get('what', 'another run')} (pid {record.get('pid', '?')} on {record.get('host', '?')}, "
            f"started {record.get('started', '?')})")


def _open_locked(lock: Path, target: Path) -> int:
    """Open ``lock`` and hold an exclusive flock on it; raise OutputLockError naming the holder when it is taken."""
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise OutputLockError(
                f"cannot write {printable_path(target)}: its lock file {printable_path(lock)} cannot be created "
                f"({exc.strerror or exc})"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_record(fd)
            os.close(fd)
            raise OutputLockError(
                f"{printable_path(target)} is in use by {_describe(holder)}; wait for that run to finish or stop "
                f"it, then run again (lock file {printable_path(lock)})"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise OutputLockError(
                f"cannot lock {printable_path(lock)} ({exc.strerror or exc}): the file system may not support "
                "locks; write the output to a local disk"
            ) from None
        # The previous holder removes the file just before it unlocks: if that happened between our open and our
        # flock, we hold a lock on a file that no longer has a name. Start again on the current file.
        try:
            on_disk, ours = os.stat(lock), os.fstat(fd)
            if (on_disk.st_dev, on_disk.st_ino) == (ours.st_dev, ours.st_ino):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextlib.contextmanager
def output_lock(path: str | os.PathLike, *, what: str) -> Iterator[Path]:
    """Hold the lock of the output ``path`` (a file or a run folder) for the duration of the block.

    Args:
        path: the output the block writes (its parent folder is created if needed).
        what: the job, recorded in the lock file and quoted to a second run (e.g. ``"extract-patches"``).

    Yields:
        The lock file path.

    Raises:
        OutputLockError: another live process holds the lock (the message names its job, pid, host and start
            time), or the lock file cannot be created (an unwritable folder, or a file where a folder should be).
    """
    target = Path(path)
    lock = lock_path(target)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputLockError(
            f"cannot write {printable_path(target)}: its folder cannot be created ({exc.strerror or exc})"
        ) from None
    fd = _open_locked(lock, target)
    try:
        previous = _read_record(fd)
        if previous is not None:
            log.warning("%s: taking over the lock of %s, which is no longer running", printable_path(target),
                        _describe(previous))
        record = json.dumps(_holder_record(what)).encode("utf-8")
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
    except BaseException:
        os.close(fd)
        raise
    _HELD[fd] = lock
    try:
        yield lock
    finally:
        _HELD.pop(fd, None)
        # Remove the name before unlocking, so no other run can open a file that is about to vanish.
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


def locks_output(argument: str, *, what: str) -> Callable[[F], F]:
    """Decorator: run the function under :func:`output_lock` on its argument named ``argument`` (the output path).

    For job entry functions whose whole body writes one output, e.g. ``@locks_output("out_path", what="augment")``.
    """

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)
        if argument not in signature.parameters:
            raise TypeError(f"{fn.__qualname__} has no argument {argument!r} to lock")

        @functools.wraps(fn)
        def locked(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            with output_lock(bound.arguments[argument], what=what):
                return fn(*args, **kwargs)

        return locked  # type: ignore[return-value]

    return decorate
