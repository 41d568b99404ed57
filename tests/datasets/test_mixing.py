"""Tests of dagan_gn/datasets/mixing.py: ratios, per-class balancing, the synthetic flag, albumentations on top."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from dagan_gn.datasets.mixing import BALANCE, MixedRealSyntheticDataset, apply_albumentations, dataset_labels


class ToyPatches(Dataset):
    """Stand-in with the PatchDataset item contract: image [1, S, S] in [-1, 1], label, index."""

    def __init__(self, labels, size=8, fill=0.0, class_names=("benign", "malignant", "normal")):
        self.labels = np.asarray(labels, dtype=np.int64)
        self.size = size
        self.fill = fill
        self.class_names = list(class_names)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        img = torch.full((1, self.size, self.size), self.fill)
        img[0, 0, 0] = -1.0  # an asymmetric pixel so flips are visible
        return {"image": img, "label": int(self.labels[i]), "index": int(i)}


def test_ratio_gives_requested_fraction():
    real = ToyPatches([0, 1] * 50)
    fake = ToyPatches([0, 1] * 300, fill=0.5)
    for ratio in (0.0, 0.25, 0.5, 0.8):
        mixed = MixedRealSyntheticDataset(real, fake, synthetic_ratio=ratio, seed=1)
        flags = np.array([mixed[i]["synthetic"] for i in range(len(mixed))])
        assert flags.sum() == mixed.num_synthetic
        assert (~flags).sum() == 100  # every real item exactly once
        assert flags.mean() == pytest.approx(ratio, abs=0.01)


def test_ratio_over_many_epochs_and_pool_exhaustion():
    real = ToyPatches([0] * 30)
    fake = ToyPatches([0] * 10, fill=0.5)
    mixed = MixedRealSyntheticDataset(real, fake, synthetic_ratio=0.75, seed=0)  # needs 90 synthetic from a pool of 10
    seen = []
    for epoch in range(20):
        mixed.set_epoch(epoch)
        plan = mixed._plan
        syn = plan[plan[:, 0] == 1, 1]
        assert len(syn) == 90 and len(plan) == 120
        assert set(syn.tolist()) == set(range(10))  # the whole pool is used before any repeat
        seen.append(plan.copy())
    assert not all(np.array_equal(seen[0], s) for s in seen[1:])  # epochs differ
    mixed.set_epoch(3)
    assert np.array_equal(mixed._plan, seen[3])  # and are reproducible


def test_balance_tops_up_each_class():
    real = ToyPatches([0] * 40 + [1] * 10 + [2] * 25)
    fake = ToyPatches([0] * 5 + [1] * 50 + [2] * 50, fill=0.5)
    mixed = MixedRealSyntheticDataset(real, fake, synthetic_ratio=BALANCE, seed=3)
    labels = mixed.labels
    assert np.bincount(labels).tolist() == [40, 40, 40]
    assert np.array_equal(labels, [mixed[i]["label"] for i in range(len(mixed))])
    syn_labels = labels[mixed._plan[:, 0] == 1]
    assert np.bincount(syn_labels, minlength=3).tolist() == [0, 30, 15]


def test_balance_without_synthetic_for_a_class_fails_clearly():
    real = ToyPatches([0] * 10 + [1] * 2)
    fake = ToyPatches([0] * 5, fill=0.5)
    with pytest.raises(ValueError, match="malignant"):
        MixedRealSyntheticDataset(real, fake, synthetic_ratio=BALANCE)


def test_bad_arguments():
    real = ToyPatches([0, 1])
    with pytest.raises(ValueError, match="synthetic_ratio"):
        MixedRealSyntheticDataset(real, real, synthetic_ratio=1.5)
    with pytest.raises(ValueError, match="synthetic_ratio"):
        MixedRealSyntheticDataset(real, real, synthetic_ratio="half")
    with pytest.raises(ValueError, match="different classes"):
        MixedRealSyntheticDataset(real, ToyPatches([0], class_names=("a", "b")))


def test_real_only_and_synthetic_only():
    real = ToyPatches([0, 1, 1])
    fake = ToyPatches([1, 0], fill=0.5)
    only_real = MixedRealSyntheticDataset(real, None, seed=0)
    assert len(only_real) == 3 and not any(only_real[i]["synthetic"] for i in range(3))
    only_fake = MixedRealSyntheticDataset(real, fake, synthetic_ratio=1.0)
    assert len(only_fake) == 2 and all(only_fake[i]["synthetic"] for i in range(2))


def test_albumentations_applied_and_reproducible():
    real = ToyPatches([0] * 16)
    tf = A.Compose([A.HorizontalFlip(p=0.5), A.RandomRotate90(p=1.0)])
    a = MixedRealSyntheticDataset(real, None, transform=tf, seed=5)
    b = MixedRealSyntheticDataset(real, None, transform=A.Compose([A.HorizontalFlip(p=0.5), A.RandomRotate90(p=1.0)]),
                                  seed=5)
    imgs_a = torch.stack([a[i]["image"] for i in range(16)])
    imgs_b = torch.stack([b[i]["image"] for i in reversed(range(16))]).flip(0)  # access order does not matter
    assert torch.equal(imgs_a, imgs_b)
    assert imgs_a.shape == (16, 1, 8, 8) and imgs_a.dtype == torch.float32
    # the marked corner pixel moved in some items: the transform ran
    moved = (imgs_a[:, 0, 0, 0] != -1.0).sum().item()
    assert 0 < moved <= 16
    # only the transform's geometry changed the pixel values: still the same multiset of values
    assert torch.equal(imgs_a.flatten(1).sort(1).values, real[0]["image"].flatten().sort().values.expand(16, -1))


def test_transform_synthetic_false_leaves_synthetic_untouched():
    real = ToyPatches([0] * 4)
    fake = ToyPatches([0] * 4, fill=0.5)
    tf = A.Compose([A.VerticalFlip(p=1.0)])
    mixed = MixedRealSyntheticDataset(real, fake, synthetic_ratio=0.5, transform=tf, transform_synthetic=False)
    for i in range(len(mixed)):
        item = mixed[i]
        corner = item["image"][0, 0, 0].item()
        assert (corner == -1.0) == item["synthetic"]


def test_apply_albumentations_range_and_shape():
    img = torch.linspace(-1, 1, 3 * 8 * 8).reshape(3, 8, 8)
    out = apply_albumentations(img, A.Compose([A.RandomBrightnessContrast(brightness_limit=(0.5, 0.5), p=1.0)]))
    assert out.shape == img.shape and out.min() >= -1 and out.max() <= 1
    assert torch.allclose(apply_albumentations(img, A.Compose([])), img, atol=1e-6)


def test_works_with_dataloader_and_dataset_labels():
    real = ToyPatches([0, 1] * 8)
    fake = ToyPatches([1] * 8, fill=0.5)
    mixed = MixedRealSyntheticDataset(real, fake, synthetic_ratio=0.5, seed=0)
    batch = next(iter(DataLoader(mixed, batch_size=32)))
    assert batch["image"].shape == (32, 1, 8, 8)
    assert batch["synthetic"].dtype == torch.bool and batch["synthetic"].sum() == 16
    assert np.array_equal(dataset_labels(mixed), mixed.labels)
