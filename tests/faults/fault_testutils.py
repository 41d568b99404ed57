"""Shared tools of the fault-injection suite (tests/faults): injected OS errors, a small real filesystem, kill -9 of a
forked worker, whole-file comparison and the one-line-error check.

A plain module, not a conftest.py (``from fault_testutils import ...``), like ``training_testutils``."""

from __future__ import annotations

import errno
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------ injected errors
class FailingCall:
    """Wraps a function so that its ``k``-th call and every later one raise ``OSError(code)`` — a disk that stays
    full — until :attr:`armed` is set False ("space freed"). ``calls`` counts every call."""

    def __init__(self, fn: Callable, k: int, code: int = errno.ENOSPC) -> None:
        self.fn, self.k, self.code = fn, int(k), code
        self.calls = 0
        self.armed = True
        self.raised = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.armed and self.calls >= self.k:
            self.raised += 1
            raise OSError(self.code, os.strerror(self.code))
        return self.fn(*args, **kwargs)


def inject(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, k: int, code: int = errno.ENOSPC) -> FailingCall:
    """Replace ``owner.name`` by a :class:`FailingCall` (undone at the end of the test)."""
    failing = FailingCall(getattr(owner, name), k, code)

    def wrapper(*args: Any, **kwargs: Any) -> Any:  # a function, so it binds like the method it replaces
        return failing(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return failing


# ------------------------------------------------------------------------------------------------ a small real disk
class SmallDisk:
    """A tmpfs of ``size`` mounted on a fresh folder: real ``ENOSPC`` from the kernel. :meth:`grow` remounts it
    bigger ("the operator freed space"); :meth:`unmount` is registered as a finalizer."""

    def __init__(self, root: Path, size: str) -> None:
        self.path = root / f"disk-{uuid.uuid4().hex[:8]}"
        self.path.mkdir(parents=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(self.path)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            self.path.rmdir()
            pytest.skip(f"cannot mount a small tmpfs for a real full-disk test ({done.stderr.strip() or 'not root'})")

    def grow(self, size: str = "256m") -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True)
        shutil.rmtree(self.path, ignore_errors=True)


@pytest.fixture
def small_disk(tmp_path, request):
    """``small_disk(size)`` → a mounted :class:`SmallDisk` (the test is skipped where mounting is not allowed)."""
    disks: list[SmallDisk] = []

    def make(size: str = "1m") -> SmallDisk:
        disk = SmallDisk(tmp_path, size)
        disks.append(disk)
        return disk

    yield make
    for disk in disks:
        disk.unmount()


# ------------------------------------------------------------------------------------------------ kill -9
def _child(target: Callable, args: tuple, env: dict[str, str], kill_after: tuple | None = None) -> None:
    os.environ.update(env)
    if kill_after is not None:  # (owner, name, k): SIGKILL this process right after owner.name's k-th call returns
        owner, name, k = kill_after
        fn, calls = getattr(owner, name), [0]

        def dies_after(*a: Any, **kw: Any) -> Any:
            result = fn(*a, **kw)
            calls[0] += 1
            if calls[0] == k:
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        setattr(owner, name, dies_after)
    try:
        target(*args)
    except BaseException:  # noqa: BLE001 - a child's failure shows as a non-zero exit code
        os._exit(1)
    os._exit(0)


def run_killed(target: Callable, args: tuple, delay: float, env: dict[str, str] | None = None,
               timeout: float = 60.0, kill_after: tuple | None = None) -> int | None:
    """Run ``target(*args)`` in a forked process (this one has torch imported: no start-up cost) and kill it with
    SIGKILL after ``delay`` seconds, or (``kill_after=(owner, name, k)``) right after its k-th call of
    ``owner.name``, an event. Returns its exit code when it ended before the timer (-9: killed at the event), else
    None."""
    ctx = multiprocessing.get_context("fork")
    proc = ctx.Process(target=_child, args=(target, args, env or {}, kill_after))
    proc.start()
    proc.join(delay)
    if proc.is_alive():
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout)
        return None
    return proc.exitcode


def kill_until_done(target: Callable, args: tuple, seed: int, *, low: float, high: float,
                    max_kills: int = 5, first_kill: tuple | None = None) -> int:
    """Kill a job at seeded random instants, restarting it each time (a resume), until it finishes or ``max_kills``
    kills happened; the caller then finishes it in-process. Returns the number of kills (the tests assert >= 1).

    ``first_kill=(owner, name, calls)``: the first run is killed by an event instead — right after its k-th call of
    ``owner.name``, k drawn from the seed in ``1..calls`` — so at least one kill happens on a fast machine too; the
    later ones come at random instants (which may also fall mid-write)."""
    rng = random.Random(seed)
    kills = 0
    while kills < max_kills:
        if kills == 0 and first_kill is not None:
            owner, name, calls = first_kill
            code = run_killed(target, args, 600.0, kill_after=(owner, name, rng.randint(1, calls)))
            assert code == -9, f"the job was to be killed after a call of {name}, but ended with exit code {code}"
            kills += 1
            continue
        code = run_killed(target, args, rng.uniform(low, high))
        if code is not None:
            assert code == 0, f"the job failed (exit code {code}) after {kills} kill(s)"
            break
        kills += 1
    return kills


# ------------------------------------------------------------------------------------------------ comparisons
#: Attributes that legitimately differ between two runs of the same job.
VOLATILE_ATTRS = frozenset({"created", "committed_done"})


def patch_file_content(path: Path, skip: frozenset[str] = frozenset({"/_resume/done_sources"})) -> dict[str, Any]:
    """Every dataset's bytes (and the file attributes) of an HDF5 file, for byte-for-byte comparison. Resume keys
    differ between a straight and an interrupted run (they name the commits), so they are left out."""
    out: dict[str, Any] = {}
    with h5py.File(path, "r") as f:
        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset) and "/" + name not in skip:
                out["/" + name] = (obj.dtype.str, obj.shape, np.ascontiguousarray(obj[()]).tobytes())
        f.visititems(visit)
        out["attrs"] = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in f.attrs.items()
                        if k not in VOLATILE_ATTRS}
    return out


def assert_same_patch_file(a: Path, b: Path) -> None:
    ca, cb = patch_file_content(a), patch_file_content(b)
    assert sorted(ca) == sorted(cb), f"datasets differ: {sorted(set(ca) ^ set(cb))}"
    for key in ca:
        if key == "attrs":
            diff = sorted(k for k in set(ca[key]) | set(cb[key]) if ca[key].get(k) != cb[key].get(k))
            assert not diff, f"attributes {diff} differ between {a} and {b}"
        assert ca[key] == cb[key], f"{key} differs between {a} and {b}"


def black_rows(path: Path) -> int:
    """Patches that are all zero (what a chunk that never reached the disk reads back as)."""
    with h5py.File(path, "r") as f:
        x = f["patches"][()]
    return int((x.reshape(len(x), -1).max(axis=1) == 0).sum()) if len(x) else 0


# ------------------------------------------------------------------------------------------------ CLI checks
def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def assert_one_line_error(exit_code: int, output: str, *fragments: str) -> str:
    """Non-zero exit, exactly one ``error:`` line, no traceback, and every fragment in that line; returns it."""
    assert exit_code not in (0, None), f"expected a failure, got exit code {exit_code}:\n{output}"
    assert exit_code > 0, f"killed by signal {-exit_code} (a crash, not an error message):\n{output}"
    assert "Traceback" not in output, output
    lines = error_lines(output)
    assert len(lines) == 1, f"expected one error line, got {len(lines)}:\n{output}"
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def run_cli(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """``python -m dagan_gn.cli ARGS`` in a fresh interpreter importing this worktree (for crashes at exit, which an
    in-process runner cannot see)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", NO_ALBUMENTATIONS_UPDATE="1",
               MPLBACKEND="Agg")
    return subprocess.run([sys.executable, "-m", "dagan_gn.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)
