"""DAGANAugmenter and its MONAI dictionary wrapper (dagan_gn/training/augmenter.py): seeded, batched, class kept."""

import numpy as np
import pytest
import torch

from factories import make_checkpoint, make_patch_file  # tests/ is on pythonpath

from dagan_gn.datasets.patches import PatchDataset
from dagan_gn.training.augmenter import AugmenterError, DAGANAugmenter, DAGANAugmenterd
from dagan_gn.training.families import SampleInputs, get_family


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    patches = make_patch_file(tmp_path_factory.mktemp("real") / "patches.h5", n_train=8)
    return make_checkpoint(tmp_path_factory.mktemp("run") / "run", patches), patches


@pytest.fixture(scope="module")
def batch(run):
    ds = PatchDataset(run[1], split="train")
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([it["image"] for it in items]), torch.tensor([it["label"] for it in items])


def test_same_seed_same_batches_and_epochs_are_reproducible(run, batch):
    images, labels = batch
    a, b = DAGANAugmenter(run[0], p=0.5, seed=3, device="cpu"), DAGANAugmenter(run[0], p=0.5, seed=3, device="cpu")
    out_a = [a(images, labels)[0] for _ in range(3)]
    out_b = [b(images, labels)[0] for _ in range(3)]
    for x, y in zip(out_a, out_b):
        assert torch.equal(x, y)
    assert not torch.equal(out_a[0], out_a[1])  # fresh draws on every call
    a.set_epoch(1)
    first = a(images, labels)[0]
    a(images, labels)
    a.set_epoch(1)
    assert torch.equal(a(images, labels)[0], first)
    c = DAGANAugmenter(run[0], p=0.5, seed=4, device="cpu")
    assert not torch.equal(c(images, labels)[0], out_a[0])


def test_replaces_a_fraction_with_variants_of_themselves_and_keeps_labels(run, batch):
    images, labels = batch
    aug = DAGANAugmenter(run[0], p=0.5, seed=0, device="cpu")
    big, big_labels = images.repeat(8, 1, 1, 1), labels.repeat(8)
    state = aug.rng.get_state()
    out, out_labels = aug(big, big_labels)
    replaced = aug.last_replaced
    assert out_labels is big_labels  # the class of every row is unchanged
    assert 0.3 < replaced.float().mean() < 0.7
    assert torch.equal(out[~replaced], big[~replaced])
    # The replaced rows are variants of the same row, conditioned on that row's own class: recompute them through
    # the one sampling path with the same draws.
    from dagan_gn.training.models import truncated_noise

    g = torch.Generator()
    g.set_state(state)
    torch.rand(len(big), generator=g)
    z = truncated_noise(int(replaced.sum()), aug.generator.z_dim, 0.0, generator=g)
    expected = get_family("dagan").generate(aug.generator, SampleInputs(z, big[replaced], big_labels[replaced]))
    torch.testing.assert_close(out[replaced], expected)
    # A different class gives a different variant: the label does reach the generator.
    other = aug.variants(big[replaced][:4], (big_labels[replaced][:4] + 1) % 3, noise=z[:4])
    assert not torch.allclose(other, expected[:4])
    assert out.dtype == big.dtype and out.min() >= -1 and out.max() <= 1


def test_p_zero_and_one(run, batch):
    images, labels = batch
    same, _ = DAGANAugmenter(run[0], p=0.0, device="cpu")(images, labels)
    assert torch.equal(same, images)
    aug = DAGANAugmenter(run[0], p=1.0, device="cpu")
    changed, _ = aug(images, labels)
    assert bool(aug.last_replaced.all()) and not torch.equal(changed, images)


def test_bad_batches_are_refused(run, batch):
    images, labels = batch
    aug = DAGANAugmenter(run[0], device="cpu")
    with pytest.raises(AugmenterError, match=r"\[B, 1, 64, 64\]"):
        aug(images[:, :, :32, :32], labels)
    with pytest.raises(AugmenterError, match="labels"):
        aug(images)
    with pytest.raises(AugmenterError, match="0..2"):
        aug(images, labels + 5)
    with pytest.raises(AugmenterError, match="p must be"):
        DAGANAugmenter(run[0], p=1.5)


def test_monai_dictionary_transform_is_seeded_and_keeps_the_label(run, batch):
    from monai.transforms import Compose

    images, labels = batch
    aug = DAGANAugmenter(run[0], device="cpu")

    def pipeline(seed):
        return Compose([DAGANAugmenterd(keys="image", augmenter=aug, prob=0.5)]).set_random_state(seed)

    items = [{"image": images[i], "label": int(labels[i])} for i in range(len(images))]
    p1, p2 = pipeline(7), pipeline(7)
    out1 = [p1(dict(it)) for it in items]
    out2 = [p2(dict(it)) for it in items]
    changed = [not torch.equal(torch.as_tensor(o["image"]), it["image"]) for o, it in zip(out1, items)]
    assert any(changed) and not all(changed)
    for o1, o2, it in zip(out1, out2, items):
        assert torch.equal(torch.as_tensor(o1["image"]), torch.as_tensor(o2["image"]))
        assert o1["label"] == it["label"]
    # numpy items stay numpy
    arr = {"image": images[0].numpy(), "label": int(labels[0])}
    out = DAGANAugmenterd("image", aug, prob=1.0).set_random_state(0)(arr)
    assert isinstance(out["image"], np.ndarray) and out["image"].shape == (1, 64, 64)
