"""Tests for dagan_gn/locks.py: one run per output, the holder named, dead holders taken over, forks never keep it."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dagan_gn.locks import OutputLockError, lock_path, locks_output, output_lock

ROOT = Path(__file__).resolve().parents[1]


def _python(script: str) -> subprocess.Popen:
    """A child Python importing this worktree's dagan_gn; its stdout is a pipe."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _holder(out: Path, what: str = "holder-job") -> subprocess.Popen:
    """A live process holding the lock of ``out`` until it is killed; returns once the lock is taken."""
    proc = _python(f"""
        import sys, time
        from dagan_gn.locks import output_lock
        with output_lock({str(out)!r}, what={what!r}):
            print("locked", flush=True)
            time.sleep(60)
    """)
    assert proc.stdout.readline().strip() == "locked", proc.stderr.read()
    return proc


def test_second_holder_is_refused_with_the_holders_pid_and_the_lock_is_removed_after(tmp_path):
    out = tmp_path / "o.h5"
    with output_lock(out, what="extract-patches") as lock:
        assert lock == lock_path(out) == tmp_path / "o.h5.lock" and lock.exists()
        with pytest.raises(OutputLockError, match=rf"o\.h5 is in use by extract-patches \(pid {os.getpid()} on "):
            with output_lock(out, what="merge-patches"):
                pass
    assert not lock_path(out).exists()
    with output_lock(out, what="again"):  # free again
        pass


def test_a_live_process_blocks_and_a_killed_one_is_taken_over(tmp_path, caplog):
    out = tmp_path / "o.h5"
    proc = _holder(out)
    try:
        with pytest.raises(OutputLockError) as err:
            with output_lock(out, what="second"):
                pass
        message = str(err.value)
        assert f"pid {proc.pid}" in message and "holder-job" in message and "\n" not in message
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert lock_path(out).exists()  # kill -9 left the file; the kernel dropped the lock
    with caplog.at_level(logging.WARNING, logger="dagan_gn.locks"):
        with output_lock(out, what="second"):
            pass
    assert any(f"pid {proc.pid}" in r.getMessage() and "no longer running" in r.getMessage() for r in caplog.records)


def test_processes_forked_while_locked_do_not_keep_the_lock(tmp_path):
    """Decoding workers forked by a run that is then killed must not hold the output (and block --resume)."""
    out = tmp_path / "o.h5"
    proc = _python(f"""
        import os, signal, time, multiprocessing as mp
        from dagan_gn.locks import output_lock
        def sleep(ready):
            ready.set()  # the child runs: its at-fork handlers are done
            time.sleep(60)
        with output_lock({str(out)!r}, what="parent"):
            ctx = mp.get_context("fork")
            ready = ctx.Event()
            child = ctx.Process(target=sleep, args=(ready,))
            child.start()
            ready.wait(30)
            print(child.pid, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    child = int(proc.stdout.readline())
    proc.wait(timeout=30)
    try:
        os.kill(child, 0)  # the forked child is still alive...
        with output_lock(out, what="resume"):  # ...and yet the lock is free
            pass
    finally:
        os.kill(child, signal.SIGKILL)


def test_an_unwritable_place_is_one_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(OutputLockError, match=r"cannot write .*a-file/o\.h5: its folder cannot be created"):
        with output_lock(blocker / "o.h5", what="x"):
            pass


def test_locks_output_decorator_locks_the_named_argument(tmp_path):
    seen = []

    @locks_output("out_path", what="job")
    def job(in_path, out_path, *, n=1):
        seen.append(lock_path(out_path).exists())
        return n

    assert job("in", tmp_path / "x.h5", n=3) == 3 and seen == [True]
    assert not lock_path(tmp_path / "x.h5").exists()
    with output_lock(tmp_path / "x.h5", what="other"):
        with pytest.raises(OutputLockError, match="in use by other"):
            job("in", out_path=tmp_path / "x.h5")
    with pytest.raises(TypeError, match="no argument 'out'"):
        locks_output("out", what="job")(job.__wrapped__)


def test_train_and_augment_refuse_an_output_held_by_another_run(tmp_path):
    from dagan_gn.config import ExperimentConfig
    from dagan_gn.jobs.augment import augment
    from dagan_gn.jobs.train import train

    run_dir = tmp_path / "run"
    with output_lock(run_dir, what="train"):
        with pytest.raises(OutputLockError, match=r"run is in use by train"):
            train(ExperimentConfig(), run_dir)
    assert not run_dir.exists()  # refused before anything was written
    out = tmp_path / "synthetic.h5"
    with output_lock(out, what="augment"):
        with pytest.raises(OutputLockError, match=r"synthetic\.h5 is in use by augment"):
            augment(tmp_path / "missing.h5", tmp_path / "no-checkpoint", out)
    assert not out.exists()


def test_extract_and_merge_refuse_an_output_held_by_a_live_process(tmp_path):
    from dagan_gn.jobs.extract_patches import extract_patches
    from dagan_gn.store.patch_file import merge_patch_files, partial_path

    (tmp_path / "in").mkdir()
    out = tmp_path / "o.h5"
    proc = _holder(out, what="extract-patches")
    try:
        with pytest.raises(OutputLockError, match=rf"in use by extract-patches \(pid {proc.pid}"):
            extract_patches([tmp_path / "in"], out, salt="s", progress=False)
        with pytest.raises(OutputLockError, match=rf"pid {proc.pid}"):
            merge_patch_files([tmp_path / "a.h5"], out)
        assert not partial_path(out).exists() and not out.exists()
    finally:
        proc.kill()
        proc.wait(timeout=10)
    # the holder is gone: the same call now gets past the lock
    report = extract_patches([tmp_path / "in"], out, salt="s", progress=False)
    assert report.files_found == 0 and out.exists()
