"""Tests for dagan_gn/jobs/import_images.py: images → patch file that the training data path reads."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from factories import make_omniglot_zip

from dagan_gn.datasets.patches import PatchDataset, SameClassPairDataset
from dagan_gn.jobs.import_images import ImageImportError, import_images, split_within_classes
from dagan_gn.store.patch_file import PatchFile, uint16_to_unit


@pytest.fixture()
def omniglot_zip(tmp_path):
    return make_omniglot_zip(tmp_path / "o.zip", {"Alpha": 3, "Beta": 2}, drawings=5)


def test_import_writes_a_patch_file_the_trainer_reads(omniglot_zip, tmp_path):
    out = tmp_path / "images.h5"
    report = import_images([omniglot_zip], out, size=16, invert=True, split="0.6,0.2,0.2", seed=3, salt="s",
                           progress=False)
    assert report.images_written == 25 and report.classes == 5 and report.exit_code == 0
    assert report.images_by_split == {"train": 15, "val": 5, "test": 5}
    with PatchFile(out) as pf:
        assert len(pf) == 25 and pf.patch_size == 16 and pf.channels == 1 and not pf.synthetic
        assert pf.class_names[0] == "Alpha/character01"
        for c in range(5):  # the fractions hold within every class
            rows = pf.labels == c
            assert [int((pf.split[rows] == s).sum()) for s in range(3)] == [3, 1, 1]
        pseudonyms = list(pf.provenance("image_pseudonym"))
        assert all(re.fullmatch(r"I-[0-9a-f]{16}", p) for p in pseudonyms) and len(set(pseudonyms)) == 25
        assert list(pf.sources) == pseudonyms and pf.attrs["salt_fingerprint"]
        assert "o.zip" not in json.dumps(pf.attrs) and "character" not in " ".join(pseudonyms)
        images = uint16_to_unit(pf.patches[:])
        assert images.mean() < 0.3  # inverted: mostly dark background
    stored = json.loads((tmp_path / "images.h5.report.json").read_text())
    assert stored["images_written"] == 25 and stored["parameters"]["invert"] is True
    assert stored["environment"]["device"] == "cpu" and stored["environment"]["numpy"] == np.__version__
    pairs = SameClassPairDataset(PatchDataset(out, split="train"))
    item = pairs[0]
    assert item["pair"].shape == (1, 16, 16) and pairs.labels[0] == item["label"]


def test_same_salt_same_pseudonyms_and_existing_output(omniglot_zip, tmp_path):
    a = import_images([omniglot_zip], tmp_path / "a.h5", size=8, salt="k", progress=False)
    import_images([omniglot_zip], tmp_path / "b.h5", size=8, salt="k", progress=False)
    with PatchFile(tmp_path / "a.h5") as pa, PatchFile(tmp_path / "b.h5") as pb:
        assert list(pa.provenance("image_pseudonym")) == list(pb.provenance("image_pseudonym"))
    with pytest.raises(ImageImportError, match="already exists"):
        import_images([omniglot_zip], tmp_path / "a.h5", size=8, salt="k", progress=False)
    assert import_images([omniglot_zip], tmp_path / "a.h5", size=8, salt="k", overwrite=True,
                         progress=False).images_written == a.images_written
    # Without --salt a salt file beside the output is created once and reused.
    import_images([omniglot_zip], tmp_path / "c.h5", size=8, progress=False)
    assert (tmp_path / "c.h5.salt").is_file()


def test_split_within_classes_and_bad_split(omniglot_zip, tmp_path):
    labels = np.repeat(np.arange(3), [1, 4, 10])
    split = split_within_classes(labels, (0.5, 0.0, 0.5), seed=0)
    assert list(split[labels == 0]) == ["train"]  # a lone image goes to train
    assert sorted(split[labels == 2]) == ["test"] * 5 + ["train"] * 5
    assert list(split_within_classes(labels, (0.5, 0.0, 0.5), seed=0)) == list(split)
    with pytest.raises(ImageImportError, match="--split 'trian'"):
        import_images([omniglot_zip], tmp_path / "x.h5", split="trian", salt="k", progress=False)
    assert not (tmp_path / "x.h5").exists() and not (tmp_path / "x.h5.partial").exists()
