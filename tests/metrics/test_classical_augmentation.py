"""Tests for the ``strokes`` preset of dagan_gn.metrics.downstream.classical_augmentation (handwriting)."""

from __future__ import annotations

import numpy as np
import pytest

from dagan_gn.metrics.downstream import classical_augmentation


def _glyph() -> np.ndarray:
    img = np.zeros((32, 32, 1), np.float32)
    img[8:24, 14:18] = 1.0  # a bright vertical stroke on black
    return img


def test_strokes_preset_moves_strokes_keeps_background_dark_and_is_seeded():
    tf = classical_augmentation("strokes", 32)
    tf.set_random_seed(0)
    a = [tf(image=_glyph())["image"] for _ in range(4)]
    tf.set_random_seed(0)
    b = [tf(image=_glyph())["image"] for _ in range(4)]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
        assert x.shape == (32, 32, 1) and x.min() >= 0.0 and x.max() <= 1.0
        assert x[0].max() == 0.0 and x[:, 0].max() == 0.0  # the border filled with background, not reflected
        assert abs(x.sum() - _glyph().sum()) < 0.35 * _glyph().sum()  # a small affine: ink roughly conserved
    assert any(np.abs(x - _glyph()).max() > 0.5 for x in a)  # every draw is an actual change of geometry


def test_strokes_strength_scales_the_ranges():
    gentle, zero = classical_augmentation("strokes:0.5", 32), classical_augmentation("strokes:0", 32)
    zero.set_random_seed(1)
    np.testing.assert_allclose(zero(image=_glyph())["image"], _glyph(), atol=1e-6)
    affine = gentle.transforms[0]
    assert affine.rotate == pytest.approx((-5.0, 5.0))
    for bad in ("strokes:x", "strokes:9", "natural:2", "cursive"):
        with pytest.raises(ValueError):
            classical_augmentation(bad, 32)
