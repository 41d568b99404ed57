"""Tests for dagan_gn/ingest/sampling.py: lesion-centred and normal-tissue patch centres."""

from __future__ import annotations

import numpy as np
import pytest

from dagan_gn.ingest.sampling import cut_patch, lesion_centres, normal_centres, tissue_fraction, window_origin


def _ellipse_mask(h=384, w=512):
    yy, xx = np.mgrid[:h, :w]
    return ((yy - h / 2) / (h * 0.45)) ** 2 + (xx / (w * 0.8)) ** 2 <= 1.0  # breast against the left edge


def test_cut_patch_and_window():
    img = np.arange(100).reshape(10, 10)
    assert window_origin(5, 4) == 3
    np.testing.assert_array_equal(cut_patch(img, (5, 5), 4), img[3:7, 3:7])
    with pytest.raises(ValueError, match="leaves"):
        cut_patch(img, (1, 5), 4)


@pytest.mark.parametrize("radius", [3.0, 20.0])
def test_lesion_centres_keep_lesion_inside(radius):
    rng = np.random.default_rng(0)
    lesions = [(100.0, 200.0, radius), (10.0, 5.0, 4.0), (383.0, 511.0, 2.0)]  # one in the middle, two at corners
    S = 64
    centres = lesion_centres(lesions, (384, 512), S, rng, per_lesion=5, jitter=0.25)
    assert len(centres) == 15
    shifts = set()
    for y, x, i in centres:
        cy, cx, r = lesions[i]
        y0, x0 = window_origin(y, S), window_origin(x, S)
        assert 0 <= y0 and y0 + S <= 384 and 0 <= x0 and x0 + S <= 512
        assert y0 <= cy < y0 + S and x0 <= cx < x0 + S  # lesion centre inside the patch
        if i == 0:  # fits: the whole disc is inside
            assert y0 <= cy - r and cy + r < y0 + S and x0 <= cx - r and cx + r < x0 + S
            shifts.add((y - cy, x - cx))
    assert len(shifts) > 1  # jittered
    again = lesion_centres(lesions, (384, 512), S, np.random.default_rng(0), per_lesion=5, jitter=0.25)
    assert again == centres  # seeded


def test_lesion_centres_tiny_image_and_outside():
    rng = np.random.default_rng(0)
    assert lesion_centres([(5, 5, 2)], (30, 30), 64, rng) == []
    assert lesion_centres([(500, 5, 2)], (384, 512), 64, rng) == []


def test_normal_centres_respect_mask_and_lesions():
    mask = _ellipse_mask()
    S = 64
    lesion = (192.0, 150.0, 20.0)
    centres = normal_centres(mask, S, 12, np.random.default_rng(1), min_tissue=0.9, lesions=[lesion], margin=8)
    assert len(centres) == 12 and len(set(centres)) == 12
    for y, x in centres:
        assert tissue_fraction(mask, (y, x), S) >= 0.9
        y0, x0 = window_origin(y, S), window_origin(x, S)
        # nearest window point to the lesion centre is further than radius + margin
        dy = max(y0 - lesion[0], lesion[0] - (y0 + S - 1), 0)
        dx = max(x0 - lesion[1], lesion[1] - (x0 + S - 1), 0)
        assert np.hypot(dy, dx) > lesion[2] + 8
    assert normal_centres(mask, S, 12, np.random.default_rng(1), min_tissue=0.9, lesions=[lesion],
                          margin=8) == centres
    assert normal_centres(mask, S, 12, np.random.default_rng(2), min_tissue=0.9, lesions=[lesion],
                          margin=8) != centres


def test_normal_centres_coarse_grid_on_large_patch():
    mask = np.zeros((1200, 900), dtype=bool)
    mask[100:1100, 0:700] = True
    centres = normal_centres(mask, 256, 20, np.random.default_rng(0), min_tissue=0.95)
    assert len(centres) == 20
    assert all(tissue_fraction(mask, c, 256) >= 0.95 for c in centres)


def test_normal_centres_none_when_no_tissue():
    mask = np.zeros((200, 200), dtype=bool)
    mask[:50, :50] = True
    assert normal_centres(mask, 64, 5, np.random.default_rng(0), min_tissue=0.9) == []
    assert normal_centres(mask, 256, 5, np.random.default_rng(0)) == []


def test_normal_centres_stride_grid():
    mask = _ellipse_mask()
    S = 64
    grid = normal_centres(mask, S, 0, np.random.default_rng(0), min_tissue=0.9, stride=32)
    assert grid and all((y - 32) % 32 == 0 and (x - 32) % 32 == 0 for y, x in grid)
    assert all(tissue_fraction(mask, c, S) >= 0.9 for c in grid)
    assert grid == normal_centres(mask, S, 0, np.random.default_rng(5), min_tissue=0.9, stride=32)
    with pytest.raises(ValueError, match="stride"):
        normal_centres(mask, S, 0, np.random.default_rng(0), stride=0)
