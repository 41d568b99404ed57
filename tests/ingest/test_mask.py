"""dagan_gn.ingest.mask: breast mask on synthetic mammograms (known ellipse, burned-in text, film borders)."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import measure

from dagan_gn.ingest.mask import breast_mask, chest_wall_side, downsample_factor, flip_to_chest_wall_left
from dagan_gn.phantom.mammogram import breast_region, render_mammogram, text_region


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def text_box(size, laterality, text, margin=0):
    top, left, bottom, right = text_region(size, laterality, text)
    box = np.zeros(size, bool)
    box[max(0, top - margin) : bottom + margin, max(0, left - margin) : right + margin] = True
    return box


@pytest.mark.parametrize("size", [(768, 512), (1536, 1024)])
@pytest.mark.parametrize("laterality, view", [("L", "CC"), ("R", "CC"), ("L", "MLO"), ("R", "MLO")])
def test_mask_covers_the_breast_and_excludes_burned_in_text(size, laterality, view):
    text = f"{laterality} {view}"
    img = render_mammogram(seed=7, size=size, laterality=laterality, view=view, burned_in_text=text)
    mask = breast_mask(img, laterality)
    assert mask.shape == size and mask.dtype == bool
    truth = breast_region(size, laterality, view)
    assert iou(mask, truth) > 0.9
    assert not (mask & text_box(size, laterality, text, margin=2)).any()
    assert measure.label(mask, connectivity=2).max() == 1  # one component, no holes to speak of
    assert iou(breast_mask(img), mask) > 0.99  # laterality is only a hint


def test_mask_keeps_lesions_and_dark_fat_inside():
    size = (512, 384)
    lesions = [(256, 60, 15, "malignant"), (200, 120, 12, "calcification")]
    img = render_mammogram(seed=1, size=size, lesions=lesions, burned_in_text="L CC")
    mask = breast_mask(img, "L")
    for cy, cx, _, _ in lesions:
        assert mask[cy, cx]
    # The thin periphery near the skin line (outer 10 % of the ellipse) is mostly kept.
    from dagan_gn.phantom.mammogram import _normalised_radius  # geometry of the generator

    rim = (_normalised_radius(size, "L", "CC") > 0.9) & breast_region(size, "L", "CC")
    assert mask[rim].mean() > 0.7


def test_bright_film_border_touching_the_breast_is_not_followed():
    """Scanned films have bright strips along their edges; in an MLO they touch the pectoral muscle."""
    size = (768, 512)
    img = render_mammogram(seed=2, size=size, laterality="L", view="MLO", burned_in_text="L MLO")
    img[:6, :] = 0.95  # film border along the top edge, connected to the pectoral muscle
    img[:, -5:] = 0.95  # and the far edge
    mask = breast_mask(img, "L")
    truth = breast_region(size, "L", "MLO")
    assert iou(mask, truth) > 0.9
    assert not mask[:, size[1] // 2 :].any() or mask[:10, size[1] // 2 :].mean() < 0.05
    assert not mask[:, -5:].any()


def test_separate_marker_is_excluded_and_laterality_prefers_the_chest_wall_component():
    size = (512, 384)
    img = render_mammogram(seed=3, size=size, laterality="R", view="CC", burned_in_text="")
    img[400:460, 10:60] = 0.9  # a bright lead marker on the far side
    mask = breast_mask(img, "R")
    assert not mask[400:460, 10:60].any()
    assert iou(mask, breast_region(size, "R", "CC")) > 0.9


def test_degenerate_inputs():
    assert not breast_mask(np.zeros((64, 64), np.float32)).any()
    assert not breast_mask(np.full((64, 64), 0.7, np.float32)).any()
    with pytest.raises(ValueError):
        breast_mask(np.zeros((4, 4, 3), np.float32))
    small = render_mammogram(seed=0, size=(64, 48), burned_in_text="")
    assert iou(breast_mask(small, "L"), breast_region((64, 48), "L", "CC")) > 0.85
    assert downsample_factor((4560, 2864)) == 9 and downsample_factor((300, 200)) == 1


def test_chest_wall_side_and_flip():
    size = (256, 192)
    left = render_mammogram(seed=0, size=size, laterality="L")
    right = render_mammogram(seed=0, size=size, laterality="R")
    assert chest_wall_side(left) == "left" and chest_wall_side(right) == "right"
    assert chest_wall_side(breast_region(size, "R", "CC")) == "right"
    flipped, did = flip_to_chest_wall_left(right, "R")
    assert did and chest_wall_side(flipped) == "left" and flipped.flags.c_contiguous
    same, did = flip_to_chest_wall_left(left, "L")
    assert not did and same is left
    # The image decides, not the tag: a mislabelled left image is not flipped.
    _, did = flip_to_chest_wall_left(left, "R")
    assert not did


def test_mask_from_grey_levels_with_display_map_matches_the_display_image_mask(tmp_path):
    """Block means of the stored grey levels mapped through the display window give the mask of the display image
    (they differ only inside blocks where the window clips, which do not move the threshold here)."""
    from dagan_gn.ingest.dicom import read_dicom_raw
    from dagan_gn.phantom.mammogram import write_synthetic_mammogram

    for lat, view in (("L", "CC"), ("R", "MLO")):
        path = write_synthetic_mammogram(tmp_path / f"{lat}.dcm", size=(1500, 1000), seed=3, laterality=lat, view=view)
        raw = read_dicom_raw(path)
        assert raw.values.dtype.kind in "iu"
        ref = breast_mask(raw.to_image().pixels, lat, full_resolution=False)
        got = breast_mask(raw.values, lat, full_resolution=False, display=raw.display)
        assert got.factor == ref.factor and got.shape == ref.shape
        np.testing.assert_array_equal(got.blocks, ref.blocks)


@pytest.mark.parametrize("dtype, lo, hi", [(np.uint16, 0, 65535), (np.int16, -32768, 32767)])
@pytest.mark.parametrize("shape", [(100, 77), (90, 63), (37, 41)])
@pytest.mark.parametrize("factor", [1, 3, 9])
def test_block_mean_of_integers_equals_the_float_path(dtype, lo, hi, shape, factor):
    from dagan_gn.ingest.mask import _block_mean

    values = np.random.default_rng(0).integers(lo, hi, shape, endpoint=True).astype(dtype)
    got = _block_mean(values, factor)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, _block_mean(values.astype(np.float32), factor))


def test_disk_morphology_equals_the_distance_transform():
    """_erode/_dilate (row-by-row disk) give exactly the Euclidean-distance-transform opening they replaced."""
    from scipy import ndimage as ndi

    from dagan_gn.ingest.mask import _dilate, _erode

    rng = np.random.default_rng(1)
    for _ in range(400):
        h, w = rng.integers(1, 40, 2)
        r = int(rng.integers(2, 9))
        m = rng.random((h, w)) < rng.random()
        np.testing.assert_array_equal(_erode(m, r), ndi.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1] > r)
        np.testing.assert_array_equal(_dilate(m, r), ndi.distance_transform_edt(~m) <= r)


def test_fill_holes_equals_scipy():
    from scipy import ndimage as ndi

    from dagan_gn.ingest.mask import _fill_holes

    rng = np.random.default_rng(2)
    for _ in range(400):
        h, w = rng.integers(1, 40, 2)
        m = rng.random((h, w)) < rng.random()
        np.testing.assert_array_equal(_fill_holes(m), ndi.binary_fill_holes(m))
