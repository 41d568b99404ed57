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
