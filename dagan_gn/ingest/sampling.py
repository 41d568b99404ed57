"""Patch centres: lesion-centred (with seeded jitter, the lesion stays inside the patch) and normal tissue (the
breast mask covers at least ``min_tissue`` of the patch, away from every lesion).

Coordinates are (row, col) pixel centres of an S×S window ``[cy - S//2, cy - S//2 + S)``; every returned window lies
fully inside the image. Tissue coverage of all candidate windows is computed at once with an integral image on a
block-downsampled mask (fast on 4.5k×2.7k images), then the chosen windows are re-checked exactly at full resolution.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from dagan_gn.ingest.mask import BlockMask

__all__ = [
    "window_origin",
    "cut_patch",
    "tissue_fraction",
    "lesion_centres",
    "normal_centres",
]


def window_origin(center: int, patch_size: int) -> int:
    """Top (or left) index of the window of size ``patch_size`` centred on ``center``."""
    return int(center) - patch_size // 2


def cut_patch(image: np.ndarray, center_yx: tuple[int, int], patch_size: int) -> np.ndarray:
    """The S×S window of ``image`` centred on ``center_yx`` (must lie inside the image)."""
    y0, x0 = window_origin(center_yx[0], patch_size), window_origin(center_yx[1], patch_size)
    if y0 < 0 or x0 < 0 or y0 + patch_size > image.shape[0] or x0 + patch_size > image.shape[1]:
        raise ValueError(f"patch at {tuple(center_yx)} of size {patch_size} leaves the {image.shape} image")
    return image[y0:y0 + patch_size, x0:x0 + patch_size]


def tissue_fraction(mask: np.ndarray, center_yx: tuple[int, int], patch_size: int) -> float:
    """Exact fraction of the window covered by ``mask``."""
    return float(cut_patch(mask, center_yx, patch_size).mean())


def _centre_range(size: int, patch_size: int) -> tuple[int, int]:
    """Inclusive range of centres whose window fits in ``size``."""
    half = patch_size // 2
    return half, size - patch_size + half


def lesion_centres(
    lesions: Sequence[tuple[float, float, float]],
    image_shape: tuple[int, int],
    patch_size: int,
    rng: np.random.Generator,
    *,
    per_lesion: int = 1,
    jitter: float = 0.25,
) -> list[tuple[int, int, int]]:
    """Centres of patches on lesions ``(cy, cx, radius)``: ``per_lesion`` per lesion, shifted by a seeded jitter of at
    most ``jitter * patch_size`` per axis and never so far that the lesion (its centre, and its whole disc when it
    fits) leaves the patch; clamped so the window stays inside the image. Returns ``(cy, cx, lesion_index)``.

    Lesions whose centre cannot be inside any in-image window (image smaller than the patch) are skipped."""
    H, W = image_shape
    if H < patch_size or W < patch_size:
        return []
    ylo, yhi = _centre_range(H, patch_size)
    xlo, xhi = _centre_range(W, patch_size)
    out: list[tuple[int, int, int]] = []
    half = patch_size // 2
    for index, (cy, cx, radius) in enumerate(lesions):
        if not (0 <= cy < H and 0 <= cx < W):
            continue
        # room for the lesion disc inside the window; a lesion larger than the patch gets no jitter
        room = max(0.0, half - 1 - float(radius))
        max_shift = int(min(room, jitter * patch_size))
        for _ in range(per_lesion):
            dy, dx = (rng.integers(-max_shift, max_shift + 1, size=2) if max_shift > 0 else (0, 0))
            y = int(np.clip(round(cy) + int(dy), ylo, yhi))
            x = int(np.clip(round(cx) + int(dx), xlo, xhi))
            out.append((y, x, index))
    return out


def _block_fraction(mask: np.ndarray, f: int, Hs: int, Ws: int) -> np.ndarray:
    """Fraction of True in each f×f block; two small-integer reductions (≈7× faster than a float mean on a
    13-Mpixel mask)."""
    m = np.ascontiguousarray(mask[: Hs * f, : Ws * f]).view(np.uint8).reshape(Hs, f, Ws * f)
    rows = m.sum(axis=1, dtype=np.uint8 if f < 256 else np.uint32)  # column sums within each block row
    blocks = rows.reshape(Hs, Ws, f).sum(axis=2, dtype=np.uint32)
    return blocks / float(f * f)


def _window_fraction(mask: np.ndarray | BlockMask, center_yx: tuple[int, int], patch_size: int) -> float:
    """:func:`tissue_fraction` for a full mask or a :class:`BlockMask` (same value, without the full mask)."""
    if not isinstance(mask, BlockMask):
        return tissue_fraction(mask, center_yx, patch_size)
    y0, x0 = window_origin(center_yx[0], patch_size), window_origin(center_yx[1], patch_size)
    ii = mask.integral(np.asarray([y0, y0 + patch_size]), np.asarray([x0, x0 + patch_size]))
    return float(ii[1, 1] - ii[0, 1] - ii[1, 0] + ii[0, 0]) / float(patch_size * patch_size)


def _box_mean(mask_small: np.ndarray, k: int) -> np.ndarray:
    """Mean of every k×k window of ``mask_small`` (valid positions only) via an integral image."""
    ii = np.zeros((mask_small.shape[0] + 1, mask_small.shape[1] + 1), dtype=np.float64)
    np.cumsum(np.cumsum(mask_small, axis=0, dtype=np.float64), axis=1, out=ii[1:, 1:])
    sums = ii[k:, k:] - ii[:-k, k:] - ii[k:, :-k] + ii[:-k, :-k]
    return sums / float(k * k)


def normal_centres(
    mask: np.ndarray | BlockMask,
    patch_size: int,
    n: int,
    rng: np.random.Generator,
    *,
    min_tissue: float = 0.9,
    lesions: Sequence[tuple[float, float, float]] = (),
    margin: float | None = None,
    stride: int | None = None,
    grid_factor: int | None = None,
) -> list[tuple[int, int]]:
    """Centres of normal-tissue patches: ``mask`` covers at least ``min_tissue`` of the window and the window keeps
    ``margin`` pixels (default ``patch_size // 4``) away from every lesion disc ``(cy, cx, radius)``.

    Random mode (``stride=None``): up to ``n`` distinct seeded centres. Grid mode (``stride`` pixels): every qualifying
    centre of a regular grid (``n`` is ignored). Fewer are returned when the tissue does not allow more.

    ``mask`` is the full [H, W] boolean mask or the :class:`~dagan_gn.ingest.mask.BlockMask` from
    ``breast_mask(..., full_resolution=False)``; both give the same centres."""
    H, W = mask.shape
    S = int(patch_size)
    if H < S or W < S:
        return []
    if margin is None:
        margin = S // 4
    half = S // 2
    lesion_arr = np.asarray(lesions, dtype=np.float64).reshape(-1, 3)

    def far_from_lesions(ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        ok = np.ones(ys.shape, dtype=bool)
        for cy, cx, r in lesion_arr:
            # distance from the lesion centre to the nearest point of the window
            y0, x0 = ys - half, xs - half
            dy = np.maximum(np.maximum(y0 - cy, cy - (y0 + S - 1)), 0)
            dx = np.maximum(np.maximum(x0 - cx, cx - (x0 + S - 1)), 0)
            ok &= np.hypot(dy, dx) > r + margin
        return ok

    if stride is not None:
        if stride <= 0:
            raise ValueError(f"stride must be positive, got {stride}")
        ylo, yhi = _centre_range(H, S)
        xlo, xhi = _centre_range(W, S)
        gy, gx = np.meshgrid(np.arange(ylo, yhi + 1, stride), np.arange(xlo, xhi + 1, stride), indexing="ij")
        ys, xs = gy.ravel(), gx.ravel()
        keep = far_from_lesions(ys, xs)
        out = []
        for y, x in zip(ys[keep], xs[keep]):
            if _window_fraction(mask, (y, x), S) >= min_tissue:
                out.append((int(y), int(x)))
        return out

    if n <= 0:
        return []
    # Block-downsample the mask so the patch spans ~32 cells, then a box filter gives every window's coverage.
    f = grid_factor or max(1, S // 32)
    Hs, Ws = H // f, W // f
    if isinstance(mask, BlockMask):
        ii = mask.integral(np.arange(Hs + 1) * f, np.arange(Ws + 1) * f)
        small = (ii[1:, 1:] - ii[:-1, 1:] - ii[1:, :-1] + ii[:-1, :-1]) / float(f * f)
    else:
        small = _block_fraction(mask, f, Hs, Ws)
    k = S // f
    if Hs < k or Ws < k:
        return []
    cover = _box_mean(small, k)  # cover[i, j] ~ window with top-left (i*f, j*f)
    # A coarse estimate can be off near the border of the mask; keep slightly looser candidates, re-check exactly.
    slack = 0.5 / k if f > 1 else 0.0
    ci, cj = np.nonzero(cover >= min_tissue - slack)
    if ci.size == 0:
        return []
    ys = ci * f + half
    xs = cj * f + half
    keep = far_from_lesions(ys, xs)
    ys, xs = ys[keep], xs[keep]
    order = rng.permutation(ys.size)
    out: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()
    for idx in order[: max(50 * n, 2000)]:  # bounded work even when the coarse estimate is too optimistic
        y, x = int(ys[idx]), int(xs[idx])
        if f > 1:  # a random offset inside the coarse cell so centres are not locked to the grid
            y = min(y + int(rng.integers(0, f)), H - S + half)
            x = min(x + int(rng.integers(0, f)), W - S + half)
            if not far_from_lesions(np.asarray([y]), np.asarray([x]))[0]:
                continue
        if (y, x) in seen or _window_fraction(mask, (y, x), S) < min_tissue:
            continue
        seen.add((y, x))
        out.append((y, x))
        if len(out) >= n:
            break
    return out
