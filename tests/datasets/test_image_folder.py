"""Tests for dagan_gn/datasets/image_folder.py: zips read in place, folders, dedup, decode/resize/invert, bad input."""

from __future__ import annotations

import io
import logging
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from factories import make_omniglot_zip

from dagan_gn.datasets.image_folder import (
    ImageArrayDataset,
    ImageFolderError,
    class_matches,
    decode_image,
    read_image_folder,
)
from dagan_gn.errors import DaganError

REPO = Path(__file__).resolve().parents[2]
OMNIGLOT = next((b / "shared" / "data" / "omniglot" for b in (REPO.parent, REPO.parent.parent)
                 if (b / "shared" / "data" / "omniglot").is_dir()), REPO.parent / "shared" / "data" / "omniglot")


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG") if mode else Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture()
def two_zips(tmp_path):
    """Omniglot-like: 'Shared' is in both zips with identical bytes (same seed), each zip has one own alphabet."""
    z1 = make_omniglot_zip(tmp_path / "small1.zip", {"Alpha": 2, "Shared": 2}, drawings=3, top="small1", seed=1)
    z2 = make_omniglot_zip(tmp_path / "small2.zip", {"Beta": 3, "Shared": 2}, drawings=3, top="small2", seed=1)
    return z1, z2


def test_two_zips_merge_with_dedup_by_relative_path(two_zips):
    z1, z2 = two_zips
    with zipfile.ZipFile(z1) as a, zipfile.ZipFile(z2) as b:  # the fixture's premise: same bytes under both tops
        assert a.read("small1/Shared/character01/0101_01.png") == b.read("small2/Shared/character01/0101_01.png")
    data = read_image_folder([z1, z2], size=16, invert=True)
    # The zipped top folder is dropped, so both zips name the shared characters alike: 2 + 3 + 2 characters.
    assert data.class_names == ["Alpha/character01", "Alpha/character02", "Beta/character01", "Beta/character02",
                                "Beta/character03", "Shared/character01", "Shared/character02"]
    assert len(data) == 7 * 3 and data.duplicates == 2 * 3 and data.conflicts == []
    assert len(set(data.keys)) == len(data.keys)
    assert data.images.shape == (21, 1, 16, 16) and data.images.dtype == np.float32
    assert set(data.counts().values()) == {3}
    assert [data.class_names[lbl] for lbl in data.labels] == [k.rsplit("/", 1)[0] for k in data.keys]


def test_invert_and_antialiased_resize():
    img = np.full((105, 105), 255, np.uint8)
    img[20:50, 30:90] = 0  # a black bar on white
    plain = decode_image(_png(img), 21)
    inverted = decode_image(_png(img), 21, invert=True)
    assert plain.shape == inverted.shape == (1, 21, 21)
    np.testing.assert_allclose(plain + inverted, 1.0, atol=1e-6)
    assert inverted[0, 6:9, 8:16].min() > 0.95 and inverted[0, 15:, :].max() < 0.05  # bar bright, paper dark
    # Anti-aliasing: the bar's edge row (pixel 20 of 105 lies at 4.0 of 21) is fractional, not just 0 or 1.
    assert np.mean(inverted.sum() / (21 * 21)) == pytest.approx(30 * 60 / 105**2, abs=0.01)
    edge = inverted[0, 9, 8:16]  # rows 45-50 of 105: half inside the bar
    assert 0.05 < edge.mean() < 0.95


def test_sixteen_bit_and_color():
    img16 = np.full((8, 8), 65535, np.uint16)
    img16[0, 0] = 1  # would be lost at 8 bits
    out = decode_image(_png(img16), 8)
    assert out[0, 0, 0] == pytest.approx(1 / 65535, abs=1e-7) and out[0, 1, 1] == 1.0
    rgb = np.zeros((10, 10, 3), np.uint8)
    rgb[..., 0] = 255
    out = decode_image(_png(rgb), 10, color=True)
    assert out.shape == (3, 10, 10) and out[0].min() == 1.0 and out[1:].max() == 0.0


def test_class_folder_layout_and_single_class_zip(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / "pets" / cls).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "pets" / cls / f"{i}.png").write_bytes(_png(np.full((12, 12), 40 * i, np.uint8)))
    (tmp_path / "pets" / "notes.txt").write_text("not an image: ignored")
    (tmp_path / "pets" / ".DS_Store").write_bytes(b"\0")
    data = read_image_folder(tmp_path / "pets", size=6)
    assert data.class_names == ["cat", "dog"] and data.keys[0] == "cat/0.png" and data.skipped == []
    np.testing.assert_array_equal(data.labels, [0, 0, 1, 1])
    # A zip holding a single top folder that is itself the class keeps it as the class.
    with zipfile.ZipFile(tmp_path / "cats.zip", "w") as zf:
        zf.writestr("cats/a.png", _png(np.zeros((4, 4), np.uint8)))
        zf.writestr("__MACOSX/cats/._a.png", b"resource fork")
    data = read_image_folder(tmp_path / "cats.zip", size=4)
    assert data.class_names == ["cats"] and len(data) == 1


def test_bad_images_are_skipped_with_a_named_reason(tmp_path, caplog):
    zpath = make_omniglot_zip(tmp_path / "o.zip", {"Alpha": 2}, drawings=2)
    with zipfile.ZipFile(zpath, "a") as zf:
        zf.writestr("images_background_small1/Alpha/character01/broken.png", b"\x89PNG\r\n\x1a\n truncated")
        zf.writestr("images_background_small1/loose.png", _png(np.zeros((4, 4), np.uint8)))
    with caplog.at_level(logging.WARNING):
        data = read_image_folder(zpath, size=8)
    assert len(data) == 4 and "Alpha/character01/broken.png" not in data.keys
    reasons = dict(data.skipped)
    assert "cannot decode image" in reasons[f"{zpath}:images_background_small1/Alpha/character01/broken.png"]
    # An image directly in the wrapping folder belongs to no class.
    assert reasons[f"{zpath}:images_background_small1/loose.png"] == "not inside a class folder"
    assert any("broken.png" in r.getMessage() and "cannot decode" in r.getMessage() for r in caplog.records)


def test_not_a_zip_missing_path_and_empty_source(tmp_path):
    fake = tmp_path / "images.zip"
    fake.write_text("hello")
    with pytest.raises(ImageFolderError, match="images.zip: not a zip archive") as info:
        read_image_folder(fake)
    assert isinstance(info.value, DaganError) and isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)
    with pytest.raises(ImageFolderError, match="no such folder or zip"):
        read_image_folder(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageFolderError, match="no images found"):
        read_image_folder(tmp_path / "empty")


def test_class_prefixes_filter_before_decoding(tmp_path):
    zpath = make_omniglot_zip(tmp_path / "o.zip", {"Greek": 2, "Greek_old": 1, "Latin": 1}, drawings=2)
    with zipfile.ZipFile(zpath, "a") as zf:  # a corrupt file in a class that is filtered out is never decoded
        zf.writestr("images_background_small1/Latin/character01/bad.png", b"junk")
    data = read_image_folder(zpath, size=8, class_prefixes=["Greek"])
    assert data.class_names == ["Greek/character01", "Greek/character02"] and data.skipped == []
    assert class_matches("Greek/character01", ["Greek/"]) and not class_matches("Greek_old/character01", ["Greek"])
    with pytest.raises(ImageFolderError, match="no class matches 'Gerek'.*Greek, Greek_old, Latin"):
        read_image_folder(zpath, class_prefixes=["Greek", "Gerek"])


def test_conflicting_duplicate_keeps_the_first(tmp_path, caplog):
    for name, value in (("a", 0), ("b", 255)):
        (tmp_path / name / "cls").mkdir(parents=True)
        (tmp_path / name / "cls" / "x.png").write_bytes(_png(np.full((4, 4), value, np.uint8)))
    with caplog.at_level(logging.WARNING):
        data = read_image_folder([tmp_path / "a", tmp_path / "b"], size=4)
    assert data.duplicates == 1 and data.conflicts == ["cls/x.png"] and data.images.max() == 0.0
    assert any("different content" in r.getMessage() for r in caplog.records)


def test_select_and_array_dataset(two_zips):
    data = read_image_folder(two_zips[0], size=8, invert=True)
    part = data.select_classes(["Shared/character02", "Alpha/character01"])
    assert part.class_names == ["Alpha/character01", "Shared/character02"] and len(part) == 6
    ds = ImageArrayDataset(part.images, part.labels, part.class_names)
    item = ds[5]
    assert item["image"].shape == (1, 8, 8) and item["label"] == int(part.labels[5]) and item["index"] == 5
    assert -1.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    from_u16 = ImageArrayDataset(np.full((2, 1, 2, 2), 65535, np.uint16), [0, 1], ["a", "b"], indices=[7, 9])
    assert float(from_u16[1]["image"].min()) == 1.0 and from_u16[1]["index"] == 9
    with pytest.raises(ValueError, match="labels must index"):
        ImageArrayDataset(np.zeros((1, 1, 2, 2), np.float32), [3], ["a"])


@pytest.mark.slow
@pytest.mark.skipif(not OMNIGLOT.is_dir(), reason="../shared/data/omniglot is absent")
def test_real_omniglot_small_zips_give_242_characters_of_20():
    data = read_image_folder([OMNIGLOT / "images_background_small1.zip", OMNIGLOT / "images_background_small2.zip"],
                             size=8, invert=True)
    assert len(data.class_names) == 242 and len(data) == 4840 and set(data.counts().values()) == {20}
    assert data.duplicates == 1000 and data.conflicts == [] and data.skipped == []
    held_out = [c for c in data.class_names if class_matches(c, ["Greek", "Latin"])]
    assert len(held_out) == 50
