"""CIFAR-10 readers: the standard python form (tar.gz and folder), image zips/trees, errors, per-class limits."""

from __future__ import annotations

import io
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dagan_gn.datasets.cifar10 import (
    CIFAR10_CLASSES,
    CIFAR10Dataset,
    Cifar10FormatError,
    limit_indices_per_class,
    load_cifar10,
)

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cifar10"


def _fake_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(n) % 10
    return images, labels


def _batch_bytes(images: np.ndarray, labels: np.ndarray) -> bytes:
    data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # CIFAR rows: R plane, G plane, B plane
    return pickle.dumps({b"data": data, b"labels": [int(v) for v in labels], b"batch_label": b"x"})


def write_python_archive(path: Path, per_batch: int = 10, test: int = 6) -> dict:
    """A tiny ``cifar-10-python.tar.gz`` in the standard pickle form; returns the arrays written."""
    out = {"train": [], "test": None}
    with tarfile.open(path, "w:gz") as tar:

        def add(name: str, payload: bytes) -> None:
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

        add("batches.meta", pickle.dumps({b"label_names": [c.encode() for c in CIFAR10_CLASSES]}))
        for i in range(1, 6):
            imgs, labs = _fake_split(per_batch, seed=i)
            out["train"].append((imgs, labs))
            add(f"data_batch_{i}", _batch_bytes(imgs, labs))
        imgs, labs = _fake_split(test, seed=99)
        out["test"] = (imgs, labs)
        add("test_batch", _batch_bytes(imgs, labs))
    return out


def write_image_zip(path: Path, split: str, per_class: int, classes=("cat", "dog", "ship")) -> np.ndarray:
    """A zip of ``<split>/<class>/NNNN.png``; returns the images in reader order (class, then file name)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    images = []
    with zipfile.ZipFile(path, "w") as zf:
        for cls in classes:
            for i in range(per_class):
                img = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="PNG")
                zf.writestr(f"{split}/{cls}/{i:04d}.png", buf.getvalue())
                images.append(img)
    return np.stack(images)


def test_python_tar_gz_reads_train_and_test(tmp_path):
    arch = tmp_path / "cifar-10-python.tar.gz"
    written = write_python_archive(arch)
    x, y, names = load_cifar10(arch, "train")
    assert x.shape == (50, 32, 32, 3) and x.dtype == np.uint8
    assert y.dtype == np.int64 and y.shape == (50,)
    assert names == list(CIFAR10_CLASSES)
    np.testing.assert_array_equal(x[:10], written["train"][0][0])  # channel planes decoded to HWC correctly
    np.testing.assert_array_equal(x[40:], written["train"][4][0])
    xt, yt, _ = load_cifar10(arch, "test")
    np.testing.assert_array_equal(xt, written["test"][0])
    np.testing.assert_array_equal(yt, written["test"][1])
    assert not (tmp_path / "cifar-10-batches-py").exists()  # nothing extracted to disk


def test_python_folder_form(tmp_path):
    arch = tmp_path / "cifar-10-python.tar.gz"
    written = write_python_archive(arch)
    with tarfile.open(arch) as tar:
        tar.extractall(tmp_path / "ex", filter="data")
    for root in (tmp_path / "ex", tmp_path / "ex" / "cifar-10-batches-py"):
        xt, yt, names = load_cifar10(root, "test")
        np.testing.assert_array_equal(xt, written["test"][0])
        assert names[0] == "airplane"


def test_image_zip_and_sibling_split(tmp_path):
    train = write_image_zip(tmp_path / "tiny-train.zip", "train", per_class=3)
    test = write_image_zip(tmp_path / "tiny-test.zip", "test", per_class=2)
    x, y, names = load_cifar10(tmp_path / "tiny-train.zip", "train")
    assert names == ["cat", "dog", "ship"]
    np.testing.assert_array_equal(x, train)
    np.testing.assert_array_equal(y, [0, 0, 0, 1, 1, 1, 2, 2, 2])
    # The test split of a train zip comes from its sibling zip.
    xt, yt, _ = load_cifar10(tmp_path / "tiny-train.zip", "test")
    np.testing.assert_array_equal(xt, test)
    # A folder holding the zips works too.
    xt2, _, _ = load_cifar10(tmp_path, "test")
    np.testing.assert_array_equal(xt2, test)


def test_image_tree_and_decode_cache(tmp_path):
    write_image_zip(tmp_path / "t.zip", "train", per_class=2)
    with zipfile.ZipFile(tmp_path / "t.zip") as zf:
        zf.extractall(tmp_path / "tree")
    x, y, names = load_cifar10(tmp_path / "tree", "train")
    assert x.shape == (6, 32, 32, 3) and names == ["cat", "dog", "ship"]
    cache = tmp_path / "cache"
    x1, _, _ = load_cifar10(tmp_path / "t.zip", "train", cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 1
    x2, _, n2 = load_cifar10(tmp_path / "t.zip", "train", cache_dir=cache)
    np.testing.assert_array_equal(x1, x2)
    assert n2 == names


@pytest.mark.parametrize("make", ["missing", "text", "empty_dir", "bad_split"])
def test_clear_error_naming_the_path(tmp_path, make):
    target = tmp_path / "not-cifar"
    split = "train"
    if make == "text":
        target = tmp_path / "notes.txt"
        target.write_text("hello")
    elif make == "empty_dir":
        target.mkdir()
    elif make == "bad_split":
        target = tmp_path / "cifar-10-python.tar.gz"
        write_python_archive(target)
        split = "validation"
    with pytest.raises(Cifar10FormatError) as info:
        load_cifar10(target, split)
    assert str(target) in str(info.value)


def test_limit_per_class_is_deterministic_and_balanced():
    labels = np.repeat(np.arange(10), 7)
    a = limit_indices_per_class(labels, 3, seed=1)
    b = limit_indices_per_class(labels, 3, seed=1)
    c = limit_indices_per_class(labels, 3, seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.bincount(labels[a]).tolist() == [3] * 10
    assert len(limit_indices_per_class(labels, 0)) == 70


def test_dataset_items_follow_the_contract(tmp_path):
    arch = tmp_path / "cifar-10-python.tar.gz"
    write_python_archive(arch)
    ds = CIFAR10Dataset(arch, "train", limit_per_class=1, seed=0, cache_dir=None)
    assert len(ds) == 10 and ds.class_names == list(CIFAR10_CLASSES)
    item = ds[3]
    assert set(item) >= {"image", "label", "index"}
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0
    x, y, _ = load_cifar10(arch, "train")
    assert y[item["index"]] == item["label"]
    expected = torch.from_numpy(x[item["index"]]).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(item["image"], expected)
    assert ds.images_uint8.shape == (10, 3, 32, 32) and ds.images_uint8.dtype == torch.uint8


def test_limited_zip_decodes_only_the_kept_images(tmp_path):
    write_image_zip(tmp_path / "z-train.zip", "train", per_class=4)
    full, labels, _ = load_cifar10(tmp_path / "z-train.zip", "train")
    ds = CIFAR10Dataset(tmp_path / "z-train.zip", "train", limit_per_class=2, seed=3, cache_dir=None)
    keep = limit_indices_per_class(labels, 2, seed=3)
    np.testing.assert_array_equal(ds.indices.numpy(), keep)
    np.testing.assert_array_equal(ds.images_uint8.permute(0, 2, 3, 1).numpy(), full[keep])


@pytest.mark.skipif(not (SHARED / "cifar10-jpeg-test.zip").is_file(), reason="../shared/data/cifar10 is absent")
def test_real_cifar10_jpeg_zip_reads_a_few_hundred_images():
    ds = CIFAR10Dataset(SHARED / "cifar10-jpeg-train.zip", "test", limit_per_class=30, seed=0, cache_dir=None)
    assert len(ds) == 300
    assert ds.class_names == list(CIFAR10_CLASSES)
    assert torch.bincount(ds.labels).tolist() == [30] * 10
    mean = ds.images_uint8.float().mean(dim=(0, 2, 3)) / 255
    # Published CIFAR-10 channel means are 0.49/0.48/0.45; a 300-image sample lands near them.
    assert torch.allclose(mean, torch.tensor([0.49, 0.48, 0.45]), atol=0.05)
