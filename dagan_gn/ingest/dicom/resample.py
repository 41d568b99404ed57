"""Resampling to a target pixel spacing (downsampling only, anti-aliased with scikit-image)."""

from __future__ import annotations

import numpy as np


def spacing_scales(spacing_mm: tuple[float, float] | None, target_mm: float | None) -> tuple[float, float]:
    """Per-axis (row, column) factors old_spacing / target that bring an image to ``target_mm`` per pixel; (1, 1)
    when either is unknown or the image is already at least as coarse (images are only ever downsampled)."""
    if target_mm is None or spacing_mm is None:
        return (1.0, 1.0)
    if target_mm <= 0:
        raise ValueError(f"target spacing must be positive, got {target_mm} mm")
    return tuple(min(1.0, float(s) / float(target_mm)) for s in spacing_mm)  # type: ignore[return-value]


def resample_to_spacing(
    pixels: np.ndarray, spacing_mm: tuple[float, float] | None, target_mm: float | None
) -> tuple[np.ndarray, float]:
    """Downsample ``pixels`` (anti-aliased, scikit-image) so one pixel is ``target_mm`` wide.

    Returns ``(pixels, scale)`` with ``scale = old_spacing / new_spacing`` (≤ 1): a coordinate ``c`` in the input maps
    to ``c * scale``. No-op (scale 1.0) when ``spacing_mm`` or ``target_mm`` is None or the image is already coarser
    than the target (upsampling invents no detail). Anisotropic spacing (never seen in mammography) is resampled per
    axis and the returned scale is the row factor; :func:`spacing_scales` gives both.
    """
    sy, sx = spacing_scales(spacing_mm, target_mm)
    if sy >= 1.0 and sx >= 1.0:
        return pixels, 1.0
    from skimage.transform import resize

    h, w = pixels.shape
    shape = (max(1, int(round(h * sy))), max(1, int(round(w * sx))))
    # Gaussian pre-filter with sigma (1/scale - 1)/2 per axis is skimage's anti-aliasing default.
    out = resize(pixels, shape, order=1, mode="reflect", anti_aliasing=True, preserve_range=True)
    return out.astype(pixels.dtype, copy=False), float(sy)
