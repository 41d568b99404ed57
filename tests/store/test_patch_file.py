"""Tests for dagan_gn/store/patch_file/: the HDF5 patch file writer, reader, resume bookkeeping and merge."""

from __future__ import annotations

import json
import re

import h5py
import numpy as np
import pytest

from dagan_gn.store.patch_file import (
    EXTRACTION_PROVENANCE,
    FORMAT_VERSION,
    PatchFile,
    PatchWriter,
    StoreError,
    encode_patch_chunks,
    merge_patch_files,
    partial_path,
    to_uint16,
    uint16_to_signed,
    uint16_to_unit,
)

S = 16


def _batch(n: int, start: int = 0, image: str = "I-1", patient: str = "P-1"):
    rng = np.random.default_rng(start)
    patches = to_uint16(rng.random((n, 1, S, S)))
    prov = {
        "patient_pseudonym": [patient] * n,
        "image_pseudonym": [image] * n,
        "laterality": ["L"] * n,
        "view": ["CC"] * n,
        "center_yx": np.arange(start, start + 2 * n).reshape(n, 2),
        "pixel_spacing_mm": np.full(n, 0.1),
        "source_index": np.zeros(n),
        "lesion_index": np.full(n, -1),
    }
    return patches, np.zeros(n, dtype=int), ["train"] * n, prov


def test_uint16_scale_round_trip():
    x = np.array([0.0, 0.5, 1.0, 1.2, -0.1], dtype=np.float32)
    v = to_uint16(x)
    assert v.dtype == np.uint16
    assert v.tolist() == [0, 32768, 65535, 65535, 0]
    np.testing.assert_allclose(uint16_to_unit(v)[:3], [0, 0.5, 1], atol=1e-4)
    np.testing.assert_allclose(uint16_to_signed(v)[:3], [-1, 0, 1], atol=1e-4)


def test_write_read_layout(tmp_path):
    out = tmp_path / "p.h5"
    patches, labels, split, prov = _batch(5)
    with PatchWriter(out, patch_size=S, class_names=["normal", "benign"], parameters={"seed": 3},
                     attrs={"salt_fingerprint": "abc", "generator_config": {"a": 1}}) as w:
        w.add_sources(["I-1"])
        w.append(patches, np.arange(5) % 2, split, prov)
        assert partial_path(out).exists() and not out.exists()
    assert out.exists() and not partial_path(out).exists()
    with PatchFile(out) as pf:
        assert len(pf) == 5
        assert pf.patches.dtype == np.uint16 and pf.patches.shape == (5, 1, S, S)
        assert pf.patches.chunks == (1, 1, S, S) and pf.patches.compression == "gzip"
        np.testing.assert_array_equal(pf.patches[:], patches)
        np.testing.assert_array_equal(pf.read_patch(3), patches[3])
        assert pf.class_names == ["normal", "benign"]
        assert pf.split_names == ["train", "val", "test"]
        assert pf.labels.tolist() == [0, 1, 0, 1, 0]
        assert pf.split_indices("train").tolist() == [0, 1, 2, 3, 4]
        assert pf.split_indices("val").tolist() == []
        assert pf.provenance("patient_pseudonym").tolist() == ["P-1"] * 5
        assert pf.provenance("center_yx").shape == (5, 2) and pf.provenance("center_yx").dtype == np.int32
        assert pf.provenance_specs() == EXTRACTION_PROVENANCE
        assert pf.sources.tolist() == ["I-1"]
        assert pf.parameters == {"seed": 3}
        attrs = pf.attrs
        assert attrs["format_version"] == FORMAT_VERSION and not attrs["synthetic"] and not pf.synthetic
        assert json.loads(attrs["generator_config"]) == {"a": 1}
        assert attrs["salt_fingerprint"] == "abc"
        assert "created" in attrs and "tool_version" in attrs


def test_custom_columns_for_synthetic_files(tmp_path):
    out = tmp_path / "syn.h5"
    cols = {"source_index": "int64", "noise_seed": "int64", "patient_pseudonym": "str"}
    with PatchWriter(out, patch_size=S, class_names=["benign"], provenance=cols, synthetic=True,
                     attrs={"checkpoint_sha256": "f" * 64}) as w:
        w.append(np.zeros((2, 1, S, S), np.uint16), [0, 0], [0, 2],
                 {"source_index": [4, 9], "noise_seed": [1, 2], "patient_pseudonym": ["P-a", "P-b"]})
    with PatchFile(out) as pf:
        assert pf.synthetic
        assert pf.provenance("noise_seed").tolist() == [1, 2]
        assert pf.split.tolist() == [0, 2]
        assert pf.attrs["checkpoint_sha256"] == "f" * 64


def test_append_validates(tmp_path):
    w = PatchWriter(tmp_path / "v.h5", patch_size=S, class_names=["tissue"])
    patches, labels, split, prov = _batch(2)
    with pytest.raises(StoreError, match="uint16"):
        w.append(patches.astype(np.float32), [0, 0], split, prov)
    with pytest.raises(StoreError, match="shape"):
        w.append(np.zeros((2, 1, 8, 8), np.uint16), [0, 0], split, prov)
    with pytest.raises(StoreError, match="labels must index"):
        w.append(patches, [0, 1], split, prov)
    with pytest.raises(StoreError, match="missing"):
        w.append(patches, [0, 0], split, {k: v for k, v in prov.items() if k != "view"})
    with pytest.raises(StoreError, match="split names"):
        w.append(patches, [0, 0], ["train", "holdout"], prov)
    w.close()
    with pytest.raises(StoreError, match="reserved"):
        PatchWriter(tmp_path / "r.h5", patch_size=S, class_names=["a"], attrs={"patch_size": 3})


def test_partial_never_looks_complete_and_is_not_clobbered(tmp_path):
    out = tmp_path / "x.h5"
    with pytest.raises(RuntimeError):
        with PatchWriter(out, patch_size=S, class_names=["tissue"]) as w:
            w.append(*_batch(3))
            raise RuntimeError("killed")
    assert not out.exists() and partial_path(out).exists()
    with pytest.raises(StoreError, match="no such patch file.*--resume"):
        PatchFile(out)
    with pytest.raises(StoreError, match="interrupted run"):
        PatchWriter(out, patch_size=S, class_names=["tissue"])


def test_resume_truncates_to_last_commit(tmp_path):
    out = tmp_path / "r.h5"
    w = PatchWriter(out, patch_size=S, class_names=["tissue"])
    w.add_sources(["I-a"])
    a = _batch(3, start=0, image="I-a")
    w.append(*a)
    w.commit("file-a")
    w.add_sources(["I-b"])
    w.append(*_batch(4, start=10, image="I-b"))  # never committed: the process "dies" here
    w.close()

    w2 = PatchWriter(out, patch_size=S, class_names=["tissue"], resume=True)
    assert w2.resumed and w2.done_sources == {"file-a"}
    assert w2.num_patches == 3 and w2.num_sources == 1
    w2.add_sources(["I-b"])
    b = _batch(4, start=10, image="I-b")
    w2.append(*b)
    w2.commit("file-b")
    w2.finalize()
    with PatchFile(out) as pf:
        assert len(pf) == 7
        np.testing.assert_array_equal(pf.patches[:3], a[0])
        np.testing.assert_array_equal(pf.patches[3:], b[0])
        assert pf.sources.tolist() == ["I-a", "I-b"]
        assert pf.provenance("image_pseudonym").tolist() == ["I-a"] * 3 + ["I-b"] * 4


def test_resume_refuses_other_layout(tmp_path):
    out = tmp_path / "m.h5"
    PatchWriter(out, patch_size=S, class_names=["tissue"]).close()
    with pytest.raises(StoreError, match="px patches"):
        PatchWriter(out, patch_size=32, class_names=["tissue"], resume=True)
    with pytest.raises(StoreError, match="classes"):
        PatchWriter(out, patch_size=S, class_names=["normal", "benign"], resume=True)


def test_reader_rejects_foreign_files(tmp_path):
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f["x"] = [1]
    with pytest.raises(StoreError, match="not a dagan-gn patch file"):
        PatchFile(tmp_path / "foreign.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(StoreError, match="not a readable HDF5"):
        PatchFile(tmp_path / "junk.h5")


def _write(path, class_names, labels, image, fingerprint="fp"):
    n = len(labels)
    patches, _, split, prov = _batch(n, start=len(image), image=image)
    with PatchWriter(path, patch_size=S, class_names=class_names, parameters={"shard": [0, 2]},
                     attrs={"salt_fingerprint": fingerprint}) as w:
        prov["source_index"] = w.add_sources([image]).repeat(n)
        w.append(patches, labels, split, prov)
    return patches


def test_merge_remaps_classes_and_sources(tmp_path):
    pa = _write(tmp_path / "a.h5", ["normal", "benign"], [0, 1, 1], "I-a")
    pb = _write(tmp_path / "b.h5", ["normal", "malignant"], [1, 0], "I-b")
    out = merge_patch_files([tmp_path / "a.h5", tmp_path / "b.h5"], tmp_path / "all.h5")
    with PatchFile(out) as pf:
        assert pf.class_names == ["normal", "benign", "malignant"]
        names = [pf.class_names[i] for i in pf.labels]
        assert names == ["normal", "benign", "benign", "malignant", "normal"]
        np.testing.assert_array_equal(pf.patches[:], np.concatenate([pa, pb]))
        assert pf.sources.tolist() == ["I-a", "I-b"]
        assert pf.provenance("source_index").tolist() == [0, 0, 0, 1, 1]
        assert "shard" not in pf.parameters and pf.parameters["merged_from"] == ["a.h5", "b.h5"]
        assert pf.attrs["salt_fingerprint"] == "fp"


def test_merge_copies_compressed_chunks_without_re_encoding(tmp_path):
    # Inputs written at gzip level 1 but holding level-9 chunk bytes (any level decodes alike): a merge that copies
    # chunks keeps the level-9 bytes, one that decoded and compressed again would write level-1 bytes.
    parts = {}
    for name, image in (("a", "I-a"), ("b", "I-b")):
        patches, _, split, prov = _batch(3, start=len(image), image=image)
        with PatchWriter(tmp_path / f"{name}.h5", patch_size=S, class_names=["tissue"], compression_level=1,
                         attrs={"salt_fingerprint": "fp"}) as w:
            prov["source_index"] = w.add_sources([image]).repeat(3)
            w.append(None, [0, 0, 0], split, prov, encoded=encode_patch_chunks(patches, "gzip", 9))
        parts[name] = (patches, encode_patch_chunks(patches, "gzip", 9))
    out = merge_patch_files([tmp_path / "a.h5", tmp_path / "b.h5"], tmp_path / "all.h5")
    with PatchFile(out) as pf:
        np.testing.assert_array_equal(pf.patches[:], np.concatenate([parts["a"][0], parts["b"][0]]))
        stored = [pf.patches.id.read_direct_chunk((i, 0, 0, 0))[1] for i in range(6)]
        assert stored == parts["a"][1] + parts["b"][1]
        assert pf.patches.compression_opts == 1  # the inputs' level is kept
    # Another level for the output: the patches are decoded and compressed again, values unchanged.
    again = merge_patch_files([tmp_path / "a.h5", tmp_path / "b.h5"], tmp_path / "lvl4.h5", compression_level=4)
    with PatchFile(again) as pf:
        np.testing.assert_array_equal(pf.patches[:], np.concatenate([parts["a"][0], parts["b"][0]]))
        assert pf.patches.id.read_direct_chunk((0, 0, 0, 0))[1] == encode_patch_chunks(parts["a"][0][:1], "gzip", 4)[0]


def test_merge_refuses_incompatible(tmp_path):
    _write(tmp_path / "a.h5", ["tissue"], [0], "I-a")
    _write(tmp_path / "dup.h5", ["tissue"], [0], "I-a")
    _write(tmp_path / "salt.h5", ["tissue"], [0], "I-c", fingerprint="other")
    with pytest.raises(StoreError, match="overlapping shards"):
        merge_patch_files([tmp_path / "a.h5", tmp_path / "dup.h5"], tmp_path / "o.h5")
    with pytest.raises(StoreError, match="different salts"):
        merge_patch_files([tmp_path / "a.h5", tmp_path / "salt.h5"], tmp_path / "o.h5")
    with PatchWriter(tmp_path / "big.h5", patch_size=32, class_names=["tissue"], attrs={"salt_fingerprint": "fp"}):
        pass
    with pytest.raises(StoreError, match="patch size"):
        merge_patch_files([tmp_path / "a.h5", tmp_path / "big.h5"], tmp_path / "o.h5")
    assert not (tmp_path / "o.h5").exists()


def test_strings_are_fixed_length_and_checked(tmp_path):
    with PatchWriter(tmp_path / "s.h5", patch_size=S, class_names=["a"], provenance={"tag": "str8"}) as w:
        w.append(np.zeros((1, 1, S, S), np.uint16), [0], [0], {"tag": ["ünï"]})
        with pytest.raises(StoreError, match="longer than 8 bytes"):
            w.append(np.zeros((1, 1, S, S), np.uint16), [0], [0], {"tag": ["x" * 9]})
    with PatchFile(tmp_path / "s.h5") as pf:
        assert pf.provenance("tag").tolist() == ["ünï"]
        assert pf.provenance_specs() == {"tag": "str8"}


@pytest.mark.parametrize("compression", ["gzip", None])
def test_pre_encoded_chunks_read_back_identically(tmp_path, compression):
    from dagan_gn.store.patch_file import encode_patch_chunks

    patches, labels, split, prov = _batch(3)
    with PatchWriter(tmp_path / "e.h5", patch_size=S, class_names=["tissue"], compression=compression,
                     compression_level=3) as w:
        assert w.chunk_encoding == (compression, 3 if compression else 0)
        w.append(None, labels, split, prov, encoded=encode_patch_chunks(patches, *w.chunk_encoding))
        w.append(patches, labels, split, prov)
    with PatchFile(tmp_path / "e.h5") as pf:
        np.testing.assert_array_equal(pf.patches[:3], patches)
        np.testing.assert_array_equal(pf.patches[3:], patches)
    with PatchWriter(tmp_path / "l.h5", patch_size=S, class_names=["tissue"], compression="lzf") as w:
        assert w.chunk_encoding is None
        with pytest.raises(StoreError, match="pre-encoded"):
            w.append(None, labels, split, prov, encoded=[b""] * 3)


def _rewrite(path, fn):
    with h5py.File(path, "r+") as f:
        fn(f)


@pytest.mark.parametrize("edit, message", [
    (lambda f: (f.__delitem__("labels"), f.create_dataset("labels", data=np.zeros(4, np.int32))),
     "dataset 'labels' has 4 rows, 'patches' has 5"),
    (lambda f: f["labels"].__setitem__(1, -1), "'labels' row 1 is -1, outside 0..1"),
    (lambda f: f["split"].__setitem__(4, 7), "'split' row 4 is 7, outside 0..2"),
    (lambda f: (f.__delitem__("patches"), f.create_dataset("patches", data=np.zeros((5, 1, S, S), np.float32))),
     "'patches' is float32, expected uint16"),
    (lambda f: f.__delitem__("split"), "dataset 'split' is missing"),
])
def test_reader_validates_layout_on_open(tmp_path, edit, message):
    """Bad content fails on open with one line naming the file and the dataset: float32 patches used to train as
    near-black images and negative labels wrapped to another class."""
    out = tmp_path / "p.h5"
    patches, labels, split, prov = _batch(5)
    with PatchWriter(out, patch_size=S, class_names=["normal", "benign"]) as w:
        w.append(patches, np.arange(5) % 2, split, prov)
    _rewrite(out, edit)
    with pytest.raises(StoreError, match=re.escape(message)) as info:
        PatchFile(out)
    assert str(out) in str(info.value) and "\n" not in str(info.value)


def test_each_committed_row_has_a_digest_and_a_failed_writer_refuses_more(tmp_path, monkeypatch):
    import errno

    out = tmp_path / "d.h5"
    w = PatchWriter(out, patch_size=S, class_names=["tissue"])
    w.append(*_batch(3))
    w.commit("a")
    digests = w._file["_resume/row_digest"][:]
    assert digests.shape == (3,) and len(set(digests.tolist())) == 3

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(h5py.Dataset, "__setitem__", full)
    with pytest.raises(StoreError, match="no space left on device while writing patches"):
        w.append(*_batch(2, start=5))
    monkeypatch.undo()
    with pytest.raises(StoreError, match="no space left"):  # the writer stays failed: nothing after it commits
        w.commit("b")
    w.close()
    resumed = PatchWriter(out, patch_size=S, class_names=["tissue"], resume=True)
    assert resumed.num_patches == 3 and resumed.done_sources == {"a"}
    resumed.close()


def test_append_refuses_split_values_outside_split_names(tmp_path):
    w = PatchWriter(tmp_path / "v.h5", patch_size=S, class_names=["tissue"])
    patches, labels, _, prov = _batch(2)
    with pytest.raises(StoreError, match="split values must index"):
        w.append(patches, labels, [0, 7], prov)
    w.close()
