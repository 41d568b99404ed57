"""Fault injection on the patch-file writer (dagan_gn/store/patch_file/, dagan_gn/store/journal.py): a full disk
(injected and real), I/O errors, kill -9 at random instants, damage found by the row digests. Every case asserts one
StoreError naming the file, committed rows intact, and a resumed file equal to a straight write."""

from __future__ import annotations

import errno
import signal

import h5py
import numpy as np
import pytest

import dagan_gn.store.journal as journal_mod
from dagan_gn.store.journal import JournaledFile, JournalError, journal_path
from dagan_gn.store.patch_file import PatchFile, PatchWriter, StoreError, partial_path

from fault_testutils import assert_same_patch_file, black_rows, inject, kill_until_done, small_disk  # noqa: F401

S = 32
BATCHES = 24
COLUMNS = {"patient_pseudonym": "str", "source_index": "int32"}


def _batch(i: int, n: int = 4):
    """Batch ``i``: incompressible patches (so a small disk fills up) and its labels, split and provenance."""
    rng = np.random.default_rng(i)
    patches = rng.integers(0, 65535, (n, 1, S, S), dtype=np.uint16)
    return patches, np.full(n, i % 2), ["train", "val", "test"][i % 3], {
        "patient_pseudonym": [f"P-{i:04d}"] * n, "source_index": np.full(n, i, np.int32)}


def write_batches(out, batches: int = BATCHES, resume: bool = False) -> None:
    """What extract-patches does: one commit per input, resumable, keyed by the input."""
    with PatchWriter(out, patch_size=S, class_names=["a", "b"], provenance=COLUMNS, parameters={"job": "test"},
                     resume=resume) as w:
        for i in range(batches):
            if f"in-{i}" in w.done_sources:
                continue
            patches, labels, split, prov = _batch(i)
            w.add_sources([f"I-{i}"])
            w.append(patches, labels, [split] * len(labels), prov)
            w.commit(f"in-{i}")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "p.h5"
    write_batches(out)
    return out


def _committed_rows(partial) -> int:
    with h5py.File(partial, "r") as f:
        return int(f.attrs["committed_rows"])


@pytest.mark.parametrize("k", [3, 17, 40])
def test_injected_enospc_in_os_writes_then_resume_equals_straight_run(tmp_path, monkeypatch, straight, k):
    out = tmp_path / "p.h5"
    failing = inject(monkeypatch, journal_mod.os, "pwrite", k)
    with pytest.raises(StoreError) as info:
        write_batches(out)
    message = str(info.value)
    assert "no space left on device" in message and str(out) in message and "\n" not in message
    assert not out.exists()  # (a failure while creating the file leaves no .partial either)
    failing.armed = False  # space freed
    write_batches(out, resume=True)
    assert_same_patch_file(out, straight)
    assert black_rows(out) == 0


@pytest.mark.parametrize("target", ["flush", "setitem"])
def test_injected_eio_in_hdf5_calls(tmp_path, monkeypatch, straight, target):
    out = tmp_path / "p.h5"
    owner, name = (h5py.File, "flush") if target == "flush" else (h5py.Dataset, "__setitem__")
    failing = inject(monkeypatch, owner, name, 9, errno.EIO)
    with pytest.raises(StoreError, match="input/output error while .* then resume from the last commit"):
        write_batches(out)
    failing.armed = False
    write_batches(out, resume=True)
    assert_same_patch_file(out, straight)


def test_failed_final_rename_is_finished_by_a_rerun(tmp_path, monkeypatch, straight):
    import os

    out = tmp_path / "p.h5"
    real_replace = os.replace

    def replace(src, dst):  # only the rename of the finished file fails, not the journal's
        if str(dst) == str(out):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(StoreError, match="input/output error while finishing the file"):
        write_batches(out)
    monkeypatch.setattr(os, "replace", real_replace)
    write_batches(out, resume=True)
    assert_same_patch_file(out, straight)
    assert not journal_path(partial_path(out)).exists()


def test_real_full_disk_then_more_space(small_disk, straight):
    disk = small_disk("640k")
    out = disk.path / "p.h5"
    with pytest.raises(StoreError, match="no space left on device"):
        write_batches(out)
    rows = _committed_rows(partial_path(out))
    assert 0 < rows < BATCHES * 4
    disk.grow()
    write_batches(out, resume=True)
    assert_same_patch_file(out, straight)
    assert black_rows(out) == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill9_at_random_instants_resumes_to_the_same_file(tmp_path, straight, seed):
    out = tmp_path / "p.h5"
    kills = kill_until_done(_write_many, (out,), seed, low=0.02, high=0.4,
                            first_kill=(PatchWriter, "commit", BATCHES - 1))
    assert kills >= 1  # never a straight run that only looks like a resume
    if not out.exists():
        write_batches(out, resume=True)
    assert_same_patch_file(out, straight)
    assert black_rows(out) == 0


def _write_many(out) -> None:
    write_batches(out, resume=True)


def test_kill9_right_after_a_commit_hook(tmp_path, straight):
    from fault_testutils import run_killed

    out = tmp_path / "p.h5"
    code = run_killed(_write_many, (out,), 30.0, env={"DAGAN_TEST_KILL_AFTER_COMMITS": "5"})
    assert code == -signal.SIGKILL and not out.exists()
    assert _committed_rows(partial_path(out)) == 4 * 4  # the creation commit + 4 inputs
    write_batches(out, resume=True)
    assert_same_patch_file(out, straight)


def _open_writer_with(out, batches: int, committed: int) -> PatchWriter:
    """A writer that appended ``batches`` inputs and committed the first ``committed`` of them."""
    w = PatchWriter(out, patch_size=S, class_names=["a", "b"], provenance=COLUMNS)
    for i in range(batches):
        patches, labels, split, prov = _batch(i)
        w.append(patches, labels, [split] * 4, prov)
        if i < committed:
            w.commit(f"in-{i}")
    return w


def test_damaged_committed_row_is_detected_not_trusted(tmp_path):
    out = tmp_path / "p.h5"
    w = _open_writer_with(out, 3, committed=3)
    offset = w._file["patches"].id.get_chunk_info_by_coord((5, 0, 0, 0)).byte_offset
    w.close()
    with open(partial_path(out), "r+b") as fh:  # bit rot in a committed chunk
        fh.seek(offset + 10)
        byte = fh.read(1)
        fh.seek(offset + 10)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(StoreError, match="committed row 5 does not match the digest"):
        PatchWriter(out, patch_size=S, class_names=["a", "b"], provenance=COLUMNS, resume=True)


def test_uncommitted_rows_are_dropped_and_never_committed_partial_restarts(tmp_path):
    out = tmp_path / "p.h5"
    _open_writer_with(out, 2, committed=1).close()  # the second input is never committed
    w2 = PatchWriter(out, patch_size=S, class_names=["a", "b"], provenance=COLUMNS, resume=True)
    assert w2.resumed and w2.num_patches == 4 and w2.done_sources == {"in-0"}
    w2.close()
    journal_path(partial_path(out)).unlink()  # as if killed before the creation commit
    w3 = PatchWriter(out, patch_size=S, class_names=["a", "b"], provenance=COLUMNS, resume=True)
    assert not w3.resumed and w3.num_patches == 0 and "never been committed" in w3.recovery_note
    w3.close()


def test_journal_replays_a_commit_killed_while_copying_pages(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    jf = JournaledFile(path, create=True)
    jf.write(b"a" * 10000)
    jf.commit()
    jf.seek(100)
    jf.write(b"B" * 5000)  # overwrites committed bytes: held in the overlay until the commit
    assert path.read_bytes() == b"a" * 10000
    monkeypatch.setattr(JournaledFile, "_apply", lambda self, *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):  # killed after the journal's rename, before the pages were copied
        jf.commit()
    jf.close()
    monkeypatch.undo()
    again = JournaledFile(path, create=False)
    expected = b"a" * 100 + b"B" * 5000 + b"a" * 4900
    assert path.read_bytes() == expected and again.read(-1) == expected
    again.close()


def test_journal_refuses_damage_and_missing(tmp_path):
    path = tmp_path / "f.bin"
    jf = JournaledFile(path, create=True)
    jf.write(b"x" * 100)
    jf.commit()
    jf.close()
    data = bytearray(journal_path(path).read_bytes())
    data[30] ^= 1
    journal_path(path).write_bytes(bytes(data))
    with pytest.raises(JournalError, match="damaged"):
        JournaledFile(path, create=False)
    journal_path(path).unlink()
    with pytest.raises(JournalError) as info:
        JournaledFile(path, create=False)
    assert info.value.errno == errno.ENOENT


def test_reader_sees_a_finished_file_only(tmp_path):
    out = tmp_path / "p.h5"
    write_batches(out, batches=2)
    with PatchFile(out) as pf:
        assert len(pf) == 8 and pf.labels.tolist() == [0] * 4 + [1] * 4
    assert not partial_path(out).exists() and not journal_path(partial_path(out)).exists()


def test_a_second_writer_of_the_same_file_is_refused(tmp_path):
    """h5py's fileobj driver has no file locking; the journaled storage takes an exclusive lock instead, so two runs
    writing the same output can never interleave (nor can the second one delete the first one's work)."""
    out = tmp_path / "p.h5"
    first = _open_writer_with(out, 1, committed=1)
    for resume in (False, True):
        with pytest.raises(StoreError, match="being written by another process"):
            PatchWriter(out, patch_size=S, class_names=["a", "b"], provenance=COLUMNS, resume=resume,
                        overwrite_partial=True)
    assert first.num_patches == 4
    first.finalize()
    with PatchFile(out) as pf:
        assert len(pf) == 4
