"""Tests for dagan_gn/datasets/patches.py: PatchDataset, SameClassPairDataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dagan_gn.datasets.patches import PatchDataset, SameClassPairDataset
from dagan_gn.store.patch_file import PatchWriter

S = 8


@pytest.fixture(scope="module")
def patch_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ds") / "p.h5"
    n = 12
    # patch i is filled with value i * 1000 so items can be recognised; row i: class i % 3, split by i // 4
    patches = (np.arange(n, dtype=np.uint16) * 1000)[:, None, None, None] * np.ones((1, 1, S, S), np.uint16)
    patches[11] = 65535
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])
    split = np.array([0] * 9 + [1, 1, 2])
    with PatchWriter(path, patch_size=S, class_names=["normal", "benign", "malignant"],
                     provenance={"noise": "int32"}) as w:
        w.append(patches, labels, split, {"noise": np.arange(n)})
    return path


def test_patch_dataset_items(patch_file):
    ds = PatchDataset(patch_file, split="train")
    assert len(ds) == 9 and ds.class_names == ["normal", "benign", "malignant"]
    assert ds.labels.tolist() == [0, 1, 2] * 3
    item = ds[4]
    assert set(item) == {"image", "label", "index"}
    assert item["image"].dtype == torch.float32 and item["image"].shape == (1, S, S)
    assert item["label"] == 1 and item["index"] == 4
    assert torch.allclose(item["image"], torch.full((1, S, S), 4000 / 65535 * 2 - 1))
    assert ds[0]["image"].min().item() == -1.0
    assert {k: v.tolist() for k, v in ds.indices_by_class().items()} == {0: [0, 3, 6], 1: [1, 4, 7], 2: [2, 5, 8]}
    test = PatchDataset(patch_file, split="test")
    assert len(test) == 1 and test[0]["index"] == 11 and test[0]["image"].max().item() == 1.0
    assert len(PatchDataset(patch_file, split=None)) == 12
    with pytest.raises(IndexError):
        ds[9]
    with pytest.raises(ValueError, match="unknown split"):
        PatchDataset(patch_file, split="holdout")


def test_class_selection_and_transform(patch_file):
    ds = PatchDataset(patch_file, split="train", classes=["malignant", "normal"], transform=lambda x: x * 0 + 7)
    assert ds.class_names == ["malignant", "normal"]
    assert [ds[i]["index"] for i in range(len(ds))] == [0, 2, 3, 5, 6, 8]
    assert [ds[i]["label"] for i in range(len(ds))] == [1, 0, 1, 0, 1, 0]
    assert ds[0]["image"].unique().tolist() == [7.0]
    with pytest.raises(ValueError, match="not in the file"):
        PatchDataset(patch_file, classes=["cyst"])


def test_in_memory_gives_the_same_items_without_reading_the_file_again(patch_file, monkeypatch):
    from dagan_gn.datasets.patches import limit_patches_per_class

    for split, classes in (("train", None), (None, ["malignant", "normal"]), ("val", None)):
        on_disk = PatchDataset(patch_file, split=split, classes=classes)
        in_memory = PatchDataset(patch_file, split=split, classes=classes, in_memory=True)
        assert in_memory._memory.dtype == np.uint16 and len(in_memory._memory) == len(on_disk)
        for i in range(len(on_disk)):
            a, b = on_disk[i], in_memory[i]
            assert a["label"] == b["label"] and a["index"] == b["index"] and torch.equal(a["image"], b["image"])
    ds = PatchDataset(patch_file, split="train", in_memory=True)
    monkeypatch.setattr(PatchDataset, "_patches", lambda self: pytest.fail("read the file again"))
    limited = limit_patches_per_class(ds, 1, seed=0)  # fewer rows: still found by file row
    assert [int(limited[i]["image"][0, 0, 0].add(1).mul(65535 / 2).round()) for i in range(len(limited))] == [
        1000 * int(r) for r in limited.rows]
    batches = list(DataLoader(SameClassPairDataset(ds, seed=0), batch_size=3, num_workers=0))
    assert sum(len(b["index"]) for b in batches) == 9


def test_training_split_in_memory_from_the_config(patch_file):
    from dagan_gn.config import load_config
    from dagan_gn.datasets.registry import training_images

    cfg = load_config(None, [f"data.path={patch_file}", "data.in_memory=true"])
    images = training_images(cfg)
    assert images._memory is not None and len(images._memory) == 9
    cfg = load_config(None, [f"data.path={patch_file}"])
    assert training_images(cfg)._memory is None


def test_dataloader_with_workers(patch_file):
    ds = PatchDataset(patch_file, split=None)
    ds[0]  # open a handle in the parent first: workers must not reuse it
    batches = list(DataLoader(ds, batch_size=4, num_workers=2))
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(12))


def test_same_class_pairs(patch_file):
    base = PatchDataset(patch_file, split="train")
    pairs = SameClassPairDataset(base, seed=3)
    seen = set()
    for i in range(len(pairs)):
        item = pairs[i]
        assert item["pair"].shape == (1, S, S)
        assert item["pair_index"] != item["index"]
        assert base.labels[list(base.rows).index(item["pair_index"])] == item["label"]
        value = round((item["pair"][0, 0, 0].item() + 1) / 2 * 65535)
        assert value == item["pair_index"] * 1000
        seen.add((item["index"], item["pair_index"]))
    assert pairs[5]["pair_index"] == SameClassPairDataset(base, seed=3)[5]["pair_index"]  # seeded
    draws = {pairs[0]["pair_index"]}
    for epoch in range(1, 12):
        pairs.set_epoch(epoch)
        draws.add(pairs[0]["pair_index"])
    assert draws == {3, 6}  # both other members of class 0 get drawn


def test_single_patch_class_is_named(patch_file):
    with pytest.raises(ValueError, match="class 'malignant' has a single patch"):
        SameClassPairDataset(PatchDataset(patch_file, split="test"))
