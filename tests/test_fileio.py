"""Tests for dagan_gn.fileio: atomic writes never leave a complete-looking file on failure."""

import hashlib

import pytest

from dagan_gn.fileio import atomic_path, atomic_write_text, sha256_file


def test_atomic_path_renames_on_success(tmp_path):
    target = tmp_path / "sub" / "out.bin"
    with atomic_path(target) as tmp:
        assert tmp != target and tmp.parent == target.parent
        tmp.write_bytes(b"hello")
        assert not target.exists()
    assert target.read_bytes() == b"hello"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.bin"]


def test_atomic_path_keeps_old_file_and_cleans_up_on_error(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half-written")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_sha256_file_matches_hashlib(tmp_path):
    data = bytes(range(256)) * 5000
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f", chunk_size=1000) == hashlib.sha256(data).hexdigest()


def test_failed_write_names_the_file_keeps_the_old_one_and_leaves_no_temp(tmp_path, monkeypatch):
    import errno
    import os

    from dagan_gn.fileio import OutputError

    target = tmp_path / "report.json"
    atomic_write_text(target, "old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputError, match=r"cannot write .*report.json: no space left on device") as info:
        atomic_write_text(target, "new")
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_check_writable(tmp_path):
    from dagan_gn.fileio import OutputError, check_writable

    assert check_writable(tmp_path / "new" / "out.json") == tmp_path / "new" / "out.json"
    assert (tmp_path / "new").is_dir() and not list((tmp_path / "new").iterdir())
    with pytest.raises(OutputError, match="is a folder"):
        check_writable(tmp_path / "new", "--out")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="cannot write --out .*file/out.json"):
        check_writable(tmp_path / "file" / "out.json", "--out")


def test_save_figure_writes_a_png_atomically_and_closes_the_figure(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dagan_gn.fileio import save_figure

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = save_figure(fig, tmp_path / "f.png", dpi=50)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.fignum_exists(fig.number)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.png"]  # no temporary file left
