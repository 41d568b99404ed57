"""Fault injection for ``extract-patches``: kill -9 at seeded points then ``--resume`` (byte-for-byte equal to a
straight run), a decoding worker killed mid-file, the writer failing (ENOSPC), and fatal bad inputs that must each
give one named ``error:`` line, exit code 2 and no traceback."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from dagan_gn.cli import app
from dagan_gn.jobs import extract_patches as job
from dagan_gn.jobs.extract_patches import ExtractError, extract_patches
from dagan_gn.store.patch_file import PatchFile, PatchWriter, partial_path

ROOT = Path(__file__).resolve().parents[2]
S = 64


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    from dagan_gn.phantom.mammogram import make_demo_archive

    return make_demo_archive(tmp_path_factory.mktemp("faults"), n_patients=2, seed=4, size=(384, 256))


def _run(archive, out, **kw):
    dicom_dir, labels_csv = archive
    return extract_patches([dicom_dir], out, labels_csv=labels_csv, salt="fault-salt", patch_size=S, per_image=3,
                           progress=False, **kw)


@pytest.fixture(scope="module")
def straight(archive, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "patches.h5"
    return out, _run(archive, out)


def h5_digest(path: Path) -> dict[str, str]:
    """MD5 of every dataset's values and every attribute, except the ``created`` time stamp."""
    digest: dict[str, str] = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                digest[name] = hashlib.md5(np.ascontiguousarray(obj[()]).tobytes()).hexdigest()
            for key, value in obj.attrs.items():
                digest[f"{name}@{key}"] = hashlib.md5(repr(value).encode()).hexdigest()
        for key, value in f.attrs.items():
            if key != "created":
                digest[f"/@{key}"] = hashlib.md5(repr(value).encode()).hexdigest()
        f.visititems(visit)
    return digest


def _python(script: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=timeout, env=env)


# --------------------------------------------------------------------------------------------- kill -9 and resume


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_9_at_a_seeded_point_then_resume_is_byte_identical(archive, straight, tmp_path, seed):
    """The process is SIGKILLed after the n-th file's patches are appended (uncommitted), n drawn from the seed, with
    1 or 2 workers; ``--resume`` then finishes a file whose every dataset and attribute equals the straight run's."""
    dicom_dir, labels_csv = archive
    kill_at = int(np.random.default_rng(13).permutation(np.arange(1, 9))[seed])  # three distinct files of 8
    workers = 1 + seed % 2
    out = tmp_path / "k.h5"
    proc = _python(f"""
        import os, signal
        from dagan_gn.jobs.extract_patches import extract_patches
        def die(n):
            if n == {kill_at}:
                os.kill(os.getpid(), signal.SIGKILL)
        extract_patches([{str(dicom_dir)!r}], {str(out)!r}, labels_csv={str(labels_csv)!r}, salt="fault-salt",
                        patch_size={S}, per_image=3, workers={workers}, progress=False, _on_file_written=die)
    """)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not out.exists() and partial_path(out).exists()
    report = _run(archive, out, resume=True, workers=workers)
    assert report.resumed and report.files_already_done == kill_at - 1
    assert report.files_used == 8 - (kill_at - 1)
    assert h5_digest(out) == h5_digest(straight[0])


# --------------------------------------------------------------------------------------------- a worker dies


_DIE_ON: str | None = None  # key of the file whose worker kills itself (read in forked workers)
_real_process_file = job.process_file


def _process_file_or_die(key: str, path: str):
    """Module level, so the pool can pickle it by name; forked workers see the monkeypatched module."""
    if key == _DIE_ON:
        os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer does
    return _real_process_file(key, path)


@pytest.fixture
def alarm():
    """Fail instead of hanging: the old multiprocessing.Pool waited forever for a dead worker's result."""
    def expire(signum, frame):
        raise TimeoutError("extract-patches hung after a worker died")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(90)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _rows(path: Path) -> set:
    with PatchFile(path) as pf:
        images, centres = pf.provenance("image_pseudonym"), pf.provenance("center_yx")
        return {(images[i], tuple(centres[i]), int(pf.labels[i]), pf.patches[i].tobytes()) for i in range(len(pf))}


@pytest.mark.slow
def test_a_worker_killed_mid_file_is_named_and_the_run_goes_on(archive, straight, tmp_path, monkeypatch, alarm):
    global _DIE_ON
    dicom_dir, _ = archive
    keys = sorted(p.relative_to(dicom_dir).as_posix() for p in dicom_dir.rglob("*") if p.is_file())
    _DIE_ON = keys[3]  # a file in the middle, with others in flight around it
    monkeypatch.setattr(job, "process_file", _process_file_or_die)
    try:
        report = _run(archive, tmp_path / "w.h5", workers=2)
    finally:
        _DIE_ON = None
    assert report.exit_code == 3 and report.files_skipped == 1 and report.files_used == 7
    [skipped] = report.skipped
    assert skipped["file"] == str(dicom_dir / keys[3])
    assert "decoding process died on this file (killed by SIGKILL" in skipped["reason"]
    # every other image is there, exactly as in the straight run
    with PatchFile(straight[0]) as pf:
        lost = {pf.sources[i] for i in range(len(pf.sources))} - set(PatchFile(tmp_path / "w.h5").sources)
    assert len(lost) == 1
    assert _rows(tmp_path / "w.h5") == {r for r in _rows(straight[0]) if r[0] not in lost}
    # and --resume of a run killed before its final rename retries only that file (skipped files are not committed)
    finished: dict = {}

    def commit_then_stop(self):  # killed just before the final rename: the .partial keeps its commits
        self.commit()
        self.close()  # what the death of the process does: the file keeps its commits and the lock is released
        finished["partial"] = Path(self.partial)
        raise KeyboardInterrupt

    _DIE_ON = keys[3]
    monkeypatch.setattr(PatchWriter, "finalize", commit_then_stop)
    out2 = tmp_path / "k.h5"
    try:
        with pytest.raises(KeyboardInterrupt):
            _run(archive, out2, workers=2)
    finally:
        _DIE_ON = None
    monkeypatch.undo()
    assert finished["partial"] == partial_path(out2) and finished["partial"].exists()
    again = _run(archive, out2, workers=2, resume=True)
    assert again.files_already_done == 7 and again.files_used == 1
    assert _rows(out2) == _rows(straight[0])


# --------------------------------------------------------------------------------------------- the writer fails


def test_a_full_disk_is_one_error_and_the_partial_file_resumes(archive, straight, tmp_path, monkeypatch):
    real_append = PatchWriter.append
    calls = {"n": 0}

    def append_until_the_disk_is_full(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_append(self, *args, **kwargs)

    monkeypatch.setattr(PatchWriter, "append", append_until_the_disk_is_full)
    out = tmp_path / "full.h5"
    with pytest.raises(ExtractError) as err:
        _run(archive, out)
    message = str(err.value)
    assert "full.h5.partial failed" in message and "No space left on device" in message and "--resume" in message
    assert "\n" not in message
    assert not out.exists() and partial_path(out).exists()
    monkeypatch.setattr(PatchWriter, "append", real_append)
    report = _run(archive, out, resume=True)
    assert report.files_already_done == 3
    assert h5_digest(out) == h5_digest(straight[0])


# --------------------------------------------------------------------------------------------- fatal inputs


def _cli(args):
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.output  # stdout and stderr, interleaved


def test_fatal_inputs_give_one_named_line_and_exit_2(archive, straight, tmp_path):
    """Each bad invocation: exit 2, exactly one ``error:`` line that names the culprit, no traceback, nothing
    written. Counted in docs/extract.md (Reliability)."""
    dicom_dir, labels_csv = archive
    common = ["--patch-size", str(S), "--salt", "fault-salt", "--quiet"]
    first_dicom = sorted(p for p in dicom_dir.rglob("*") if p.is_file())[0]
    before = first_dicom.read_bytes()
    finished = tmp_path / "finished.h5"
    finished.write_bytes(straight[0].read_bytes())
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    latin1_csv = tmp_path / "latin1.csv"
    latin1_csv.write_bytes("image,class,center_x,center_y,radius\ndicom/x.dcm,bénin,1,2,3\n".encode("latin-1"))
    bad_row = tmp_path / "bad_row.csv"
    bad_row.write_text("image,class,center_x,center_y,radius\ndicom/x.dcm,benign,1,2,-4\n")
    interrupted = tmp_path / "interrupted.h5"
    partial_path(interrupted).write_bytes(b"")
    cases = {
        "out is a folder": ([str(dicom_dir), "--out", str(tmp_path)], "is a folder"),
        "out under a file": ([str(dicom_dir), "--out", str(a_file / "o.h5")], "a-file/o.h5: its folder cannot be"),
        "out inside the inputs": ([str(dicom_dir), "--out", str(dicom_dir / "p.h5"), "--overwrite"],
                                  "is inside the input folder"),
        "out is an input DICOM": ([str(first_dicom), "--out", str(first_dicom), "--overwrite"],
                                  "is one of the input files"),
        "out exists": ([str(dicom_dir), "--out", str(finished)], "finished.h5 already exists; pass --overwrite"),
        "labels not UTF-8": ([str(dicom_dir), "--out", str(tmp_path / "l.h5"), "--labels", str(latin1_csv)],
                             "latin1.csv: not a UTF-8 text CSV"),
        "labels bad row": ([str(dicom_dir), "--out", str(tmp_path / "r.h5"), "--labels", str(bad_row)],
                           "bad_row.csv:2: radius must be positive"),
        "missing input": ([str(tmp_path / "nothing"), "--out", str(tmp_path / "m.h5")], "input not found"),
        "partial without --resume": ([str(dicom_dir), "--out", str(interrupted)],
                                     "interrupted.h5.partial exists"),
        "resume with other options": ([str(dicom_dir), "--out", str(finished), "--resume", "--salt", "other"],
                                      "written with another salt"),
        "bad --max-pixels": ([str(dicom_dir), "--out", str(tmp_path / "x.h5"), "--max-pixels", "0"],
                             "--max-pixels"),
    }
    handled = 0
    for name, (args, named) in cases.items():
        code, out = _cli(["extract-patches", *common, *args])
        lines = [line for line in out.splitlines() if line.strip()]
        assert code == 2, (name, out)
        assert "Traceback" not in out, (name, out)
        errors = [line for line in lines if line.startswith("error:") or "Error" in line]
        assert len(errors) == 1 and named in out, (name, out)
        handled += 1
    assert handled == len(cases) == 11
    assert first_dicom.read_bytes() == before and h5_digest(finished) == h5_digest(straight[0])
    assert not any(dicom_dir.rglob("*.h5*"))
    # merge-patches: an existing --out, and --out among its inputs
    code, out = _cli(["merge-patches", str(straight[0]), "--out", str(finished)])
    assert code == 2 and "finished.h5 already exists; pass --overwrite" in out and "Traceback" not in out
    code, out = _cli(["merge-patches", str(finished), "--out", str(finished), "--overwrite"])
    assert code == 2 and "is also an input" in out and h5_digest(finished) == h5_digest(straight[0])
    code, out = _cli(["merge-patches", str(straight[0]), "--out", str(finished), "--overwrite"])
    assert code == 0, out
    with PatchFile(finished) as pf:
        assert len(pf) == straight[1].patches_total


def test_report_json_is_valid_with_a_non_utf8_file_name(archive, tmp_path):
    """Issue 13.4: one Latin-1 name used to abort the whole run (and --resume) with UnicodeEncodeError."""
    import shutil

    dicom_dir, _ = archive
    work = tmp_path / "in"
    shutil.copytree(dicom_dir, work)
    victim = sorted(p for p in work.rglob("*") if p.is_file())[2]
    latin1 = victim.with_name(os.fsdecode(b"r\xe9sum\xe9_" + os.fsencode(victim.name)))
    victim.rename(latin1)
    (work / os.fsdecode(b"cass\xe9.dcm")).write_bytes(b"")  # a broken one too: it must be named in the report
    out = tmp_path / "o.h5"

    def die(n):
        if n == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract_patches([work], out, salt="s", patch_size=S, per_image=2, progress=False, _on_file_written=die)
    report = extract_patches([work], out, salt="s", patch_size=S, per_image=2, progress=False, resume=True)
    assert report.files_used == 4 + 4 - report.files_already_done and report.files_skipped == 1
    saved = json.loads(Path(str(out) + ".report.json").read_text(encoding="utf-8"))
    assert saved["skipped"][0]["file"].endswith("cass\\xe9.dcm")
    with PatchFile(out) as pf:
        assert len(pf.sources) == 8
