"""Hostile and broken CIFAR-10 python batches (issue 13.2: the reader used plain ``pickle.load``, so an archive ran
arbitrary code). Each must be refused with one :class:`Cifar10FormatError` line naming the file, before any of its
code runs; genuine batches (Python 2 and 3 pickles, numpy 1 and 2 names) still load. Counted in docs/extract.md."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dagan_gn.cli import app
from dagan_gn.datasets.cifar10 import CIFAR10_CLASSES, Cifar10FormatError, load_cifar10


def _batch(n: int = 4, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": [i % 10 for i in range(n)],
            b"batch_label": b"training batch 1 of 5", b"filenames": [b"a.png"] * n}


def _folder(root: Path, test_batch: bytes) -> Path:
    """A ``cifar-10-batches-py`` folder whose ``test_batch`` holds ``test_batch`` (the bytes of a pickle)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [c.encode() for c in CIFAR10_CLASSES]}))
    (folder / "test_batch").write_bytes(test_batch)
    return folder


class _Reduce:
    """Pickles as a call of ``func(*args)``: what a malicious batch does."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _hostile_payloads(marker: Path) -> dict[str, bytes]:
    import builtins
    import subprocess

    command = f"touch {marker}"
    return {
        "os.system": pickle.dumps({b"data": _Reduce(os.system, command), b"labels": []}),
        "posix.system, protocol 0": pickle.dumps(_Reduce(os.system, command), protocol=0),
        "builtins.eval": pickle.dumps({b"labels": _Reduce(builtins.eval, f"open({str(marker)!r}, 'w')")}),
        "builtins.exec": pickle.dumps(_Reduce(builtins.exec, f"open({str(marker)!r}, 'w')")),
        "subprocess.Popen": pickle.dumps(_Reduce(subprocess.Popen, ["touch", str(marker)])),
        "builtins.__import__": pickle.dumps(_Reduce(builtins.__import__, "os")),
        "getattr gadget": pickle.dumps(_Reduce(getattr, tarfile.TarFile, "extractall")),
        "numpy load gadget": pickle.dumps(_Reduce(np.load, str(marker), True)),
        "codecs with another codec": b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R.",
        "persistent id": b"\x80\x02X\x01\x00\x00\x00xQ.",
    }


def test_hostile_batches_are_refused_before_their_code_runs(tmp_path):
    marker = tmp_path / "PWNED"
    tried = handled = 0
    for i, (name, payload) in enumerate(_hostile_payloads(marker).items()):
        tried += 1
        folder = _folder(tmp_path / f"case{i}", payload)
        with pytest.raises(Cifar10FormatError) as err:
            load_cifar10(folder.parent, "test")
        message = str(err.value)
        assert message.startswith(f"{folder / 'test_batch'}: refused to unpickle: the file asks for "), (name, message)
        assert "\n" not in message and not marker.exists(), name
        handled += 1
    assert (tried, handled) == (10, 10)


def test_broken_and_odd_batches_are_one_clear_error(tmp_path):
    good = pickle.dumps(_batch())
    object_array = np.array([b"x", 1, None], dtype=object)
    cases = {
        "truncated": (good[: len(good) // 2], "not a readable CIFAR-10 python batch"),
        "empty": (b"", "not a readable CIFAR-10 python batch"),
        "random bytes": (np.random.default_rng(0).bytes(500), "not a readable CIFAR-10 python batch"),
        "a list, not a dict": (pickle.dumps([1, 2, 3]), "expected a dict"),
        "object array": (pickle.dumps({b"data": object_array, b"labels": [0]}), "expected a dict of arrays"),
        "no labels": (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}), "lacks 'data' or 'labels'"),
        "wrong shape": (pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}),
                        r"has shape \(2, 100\), expected \[N, 3072\]"),
    }
    for i, (name, (payload, message)) in enumerate(cases.items()):
        folder = _folder(tmp_path / f"case{i}", payload)
        with pytest.raises(Cifar10FormatError, match=message) as err:
            load_cifar10(folder.parent, "test")
        assert str(err.value).startswith(str(folder / "test_batch")) and "\n" not in str(err.value), name


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_genuine_batches_still_load_under_every_protocol(tmp_path, protocol):
    batch = _batch(6, seed=protocol)
    folder = _folder(tmp_path, pickle.dumps(batch, protocol=protocol))
    images, labels, names = load_cifar10(folder, "test")
    assert images.shape == (6, 32, 32, 3) and names == list(CIFAR10_CLASSES)
    np.testing.assert_array_equal(images, batch[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(labels, batch[b"labels"])


def _python2_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """The opcodes Python 2 + numpy 1 wrote for the published archive: protocol 2, byte strings as BINSTRING,
    ``numpy.core.multiarray._reconstruct`` for the uint8 array (written by hand: no Python 2 here)."""
    import struct

    def string(b: bytes) -> bytes:
        return b"T" + struct.pack("<i", len(b)) + b
    n, width = data.shape
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + string(b"b") + b"\x87R("
             + b"K\x01J" + struct.pack("<i", n) + b"J" + struct.pack("<i", width) + b"\x86"
             + b"cnumpy\ndtype\n" + string(b"u1") + b"K\x00K\x01\x87R(K\x03" + string(b"|")
             + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89" + string(data.tobytes()) + b"tb")
    label_list = b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    return (b"\x80\x02}(" + string(b"data") + array + string(b"labels") + label_list + string(b"batch_label")
            + string(b"testing batch 1 of 1") + b"u.")


def test_a_python2_batch_as_in_the_published_archive_loads(tmp_path):
    data = np.random.default_rng(5).integers(0, 256, (3, 3072), dtype=np.uint8)
    payload = _python2_batch(data, [7, 0, 3])
    assert pickle.loads(payload, encoding="bytes")[b"labels"] == [7, 0, 3]  # what plain pickle made of it
    folder = _folder(tmp_path, payload)
    images, labels, _ = load_cifar10(folder, "test")
    assert labels.tolist() == [7, 0, 3]
    np.testing.assert_array_equal(images, data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def test_a_hostile_tar_archive_fails_train_with_one_line_and_runs_nothing(tmp_path):
    """``dagan train data.kind=cifar10`` on a tar whose batch calls os.system: exit 2, one error line."""
    marker = tmp_path / "PWNED"
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"):
            payload = _hostile_payloads(marker)["os.system"] if name == "data_batch_3" else pickle.dumps(_batch())
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    result = CliRunner().invoke(app, ["train", "--data", str(archive), "--out", str(tmp_path / "run"), "--steps", "1",
                                      "--device", "cpu", "--quiet", "data.kind=cifar10", "model.name=cifar_dcgan",
                                      "model.image_size=32"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output
    assert "data_batch_3: refused to unpickle: the file asks for posix.system" in lines[0]
    assert not marker.exists()
