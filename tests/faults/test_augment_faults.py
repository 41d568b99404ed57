"""Fault injection on ``dagan augment`` (dagan_gn/jobs/augment.py): the audit's disk-full run on a real small
filesystem, injected ENOSPC/EIO at the k-th write, kill -9 at random instants (several seeds) and right after the
final rename. Each failing run must end in one error line (never a crash), and "run the same command again" must give
a file equal, dataset by dataset, to a straight run — never black patches with valid labels."""

from __future__ import annotations

import errno
import functools
import time

import pytest
from typer.testing import CliRunner

import dagan_gn.jobs.augment as augment_mod
import dagan_gn.store.journal as journal_mod
from dagan_gn.cli import app
from dagan_gn.jobs.augment import augment
from dagan_gn.store.journal import journal_path
from dagan_gn.store.patch_file import PatchWriter, StoreError, partial_path

from factories import make_checkpoint, make_patch_file  # tests/ is on pythonpath
from fault_testutils import (  # noqa: F401
    assert_one_line_error,
    assert_same_patch_file,
    black_rows,
    inject,
    kill_until_done,
    run_cli,
    run_killed,
    small_disk,
)

runner = CliRunner()
N = 4


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("augfaults")
    patches = make_patch_file(root / "patches.h5", n_train=24, n_val=2, n_test=2)
    run = make_checkpoint(root / "run", patches)
    straight = root / "straight.h5"
    start = time.perf_counter()
    augment(patches, run, straight, n=N, batch_size=8, device="cpu", seed=5, progress=False, commit_seconds=0)
    # The last item, the straight run's duration: kill instants are drawn within it.
    return patches, run, straight, time.perf_counter() - start


def _args(patches, run, out):
    return ["augment", "--in", str(patches), "--checkpoint", str(run), "--out", str(out), "--n", str(N),
            "--batch-size", "8", "--seed", "5", "--device", "cpu", "-q"]


@pytest.mark.slow
def test_disk_full_on_a_real_small_filesystem_then_rerun(inputs, small_disk):
    """The audit's reproduction: augment onto a tiny tmpfs. Before the fix the run died with SIGSEGV and the re-run
    exited 0 with all-black patches; now: one error line, exit 2, and after more space the same command finishes with
    the straight run's bytes."""
    patches, run, straight, seconds = inputs
    disk = small_disk("600k")
    out = disk.path / "synthetic.h5"
    first = run_cli(*_args(patches, run, out))
    assert_one_line_error(first.returncode, first.stdout + first.stderr, str(out), "no space left on device")
    assert not out.exists()
    disk.grow()
    again = runner.invoke(app, _args(patches, run, out))
    assert again.exit_code == 0, again.output
    assert_same_patch_file(out, straight)
    assert black_rows(out) == 0


@pytest.mark.parametrize("k, resumed", [(5, 0), (80, 2), (400, 10)])
def test_injected_enospc_at_the_kth_write_then_rerun(inputs, tmp_path, monkeypatch, k, resumed):
    """The command commits after every batch (``commit_batches=1``, a cadence by count: the same commits on a fast
    or a loaded machine), so a disk that fills at the k-th write leaves the same committed sources every time, and
    the re-run continues from them."""
    patches, run, straight, seconds = inputs
    out = tmp_path / "synthetic.h5"
    monkeypatch.setattr(augment_mod, "augment", functools.partial(augment, commit_batches=1))  # what the CLI calls
    failing = inject(monkeypatch, journal_mod.os, "pwrite", k)
    result = runner.invoke(app, _args(patches, run, out))
    assert failing.raised >= 1
    assert_one_line_error(result.exit_code, result.output, str(out), "no space left on device")
    failing.armed = False
    result = runner.invoke(app, _args(patches, run, out))
    assert result.exit_code == 0, result.output
    assert (f"(resumed after {resumed} sources)" in result.output) == (resumed > 0), result.output
    assert_same_patch_file(out, straight)


def test_injected_eio_in_a_dataset_write(inputs, tmp_path, monkeypatch):
    import h5py

    patches, run, straight, seconds = inputs
    out = tmp_path / "synthetic.h5"
    failing = inject(monkeypatch, h5py.Dataset, "__setitem__", 12, errno.EIO)
    with pytest.raises(StoreError, match="input/output error while writing patches"):
        augment(patches, run, out, n=N, batch_size=8, device="cpu", seed=5, progress=False, commit_seconds=0)
    failing.armed = False
    rep = augment(patches, run, out, n=N, batch_size=8, device="cpu", seed=5, progress=False, commit_seconds=0)
    assert rep.n_resumed_sources > 0
    assert_same_patch_file(out, straight)


def _augment_job(patches, run, out) -> None:
    augment(patches, run, out, n=N, batch_size=8, device="cpu", seed=5, progress=False, commit_seconds=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill9_at_random_instants_then_rerun(inputs, tmp_path, seed):
    patches, run, straight, seconds = inputs
    out = tmp_path / "synthetic.h5"
    kills = kill_until_done(_augment_job, (patches, run, out), seed, low=0.2 * seconds, high=1.0 * seconds,
                            max_kills=4, first_kill=(PatchWriter, "commit", 12))  # 1 + 12 batch commits + finalize
    assert kills >= 1  # never a straight run that only looks like a resume
    rep = augment(patches, run, out, n=N, batch_size=8, device="cpu", seed=5, progress=False)
    assert rep.n_written == 24 * N
    assert_same_patch_file(out, straight)
    assert not partial_path(out).exists() and not journal_path(partial_path(out)).exists()


def test_kill9_just_before_the_final_rename_then_rerun(inputs, tmp_path):
    patches, run, straight, seconds = inputs
    out = tmp_path / "synthetic.h5"
    # 1 creation commit + 12 batch commits + the finalize commit, then the rename: die at the finalize commit.
    code = run_killed(_augment_job, (patches, run, out), 60.0, env={"DAGAN_TEST_KILL_AFTER_COMMITS": "14"})
    assert code == -9 and not out.exists() and partial_path(out).exists()
    rep = augment(patches, run, out, n=N, batch_size=8, device="cpu", seed=5, progress=False)
    assert rep.n_resumed_sources == 24 and not rep.already_complete
    assert_same_patch_file(out, straight)


def test_kill9_just_after_the_final_rename_then_rerun_says_complete(inputs, tmp_path):
    patches, run, straight, seconds = inputs
    out = tmp_path / "synthetic.h5"
    _augment_job(patches, run, out)
    # What a kill between the rename and the journal's removal leaves behind:
    journal_path(partial_path(out)).write_bytes(b"stale journal")
    result = runner.invoke(app, _args(patches, run, out))
    assert result.exit_code == 0, result.output
    assert "already complete" in result.output
    assert not journal_path(partial_path(out)).exists()
    assert_same_patch_file(out, straight)
