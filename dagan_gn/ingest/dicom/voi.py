"""The display pipeline after decoding (DICOM PS3.3 C.11): Modality LUT / rescale, VOI LUT or window mapped onto
[0, 1] (the robust range without one), MONOCHROME1 inverted; computed once per grey level and applied as a table, or
as one multiply-add when it is a clipped straight line."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi, apply_voi_lut, apply_windowing

from dagan_gn.ingest.dicom.header import DicomReadError, _int, _text


def _honour_bits_stored(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Drop the bits above BitsStored (they may hold overlays) and sign-extend signed data, when the decoder did not."""
    bits_stored = _int(ds, "BitsStored", arr.dtype.itemsize * 8)
    bits_alloc = arr.dtype.itemsize * 8
    if not (0 < bits_stored < bits_alloc) or arr.dtype.kind not in "iu":
        return arr
    if _int(ds, "PixelRepresentation", 0) == 0:
        limit = (1 << bits_stored) - 1
        if arr.dtype.kind == "u" and int(arr.max()) <= limit:
            return arr
        return (arr.astype(np.uint64, copy=False) & limit).astype(arr.dtype) if arr.dtype.kind == "i" else arr & limit
    lo, hi = -(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1
    if int(arr.min()) >= lo and int(arr.max()) <= hi:
        return arr
    unsigned = arr.view(np.dtype(f"u{arr.dtype.itemsize}")) & ((1 << bits_stored) - 1)
    shifted = unsigned.astype(np.int64) << (64 - bits_stored)
    return (shifted >> (64 - bits_stored)).astype(arr.dtype)


def _voi_output_range(ds: Dataset) -> tuple[float, float] | None:
    """The output range of the VOI transform pydicom will apply, or None when the file has no VOI LUT or window."""
    seq = ds.get("VOILUTSequence", None)
    if seq and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None:
        descriptor = seq[0].LUTDescriptor
        n_entries = int(descriptor[0]) or 2**16
        first = int(descriptor[1])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lut = apply_voi(np.arange(first, first + n_entries, dtype=np.int64), ds)
        return float(lut.min()), float(lut.max())
    if ds.get("WindowCenter", None) is not None and ds.get("WindowWidth", None) is not None:
        probe = apply_windowing(np.array([-1e15, 1e15]), ds)
        return float(probe.min()), float(probe.max())
    return None


_ROBUST_PERCENTILES = (0.5, 99.9)  # range stretched onto [0, 1] when a file has no VOI LUT or window


def _robust_range(values: np.ndarray, counts: np.ndarray | None = None) -> tuple[float, float]:
    """The 0.5th and 99.9th percentiles: of ``values`` weighted by ``counts`` (a histogram), or of an image."""
    if counts is None:
        step = max(1, int(np.sqrt(values.size / 250_000)))  # ~250k samples: percentiles in milliseconds
        sample = values[::step, ::step]
        lo, hi = np.percentile(sample, _ROBUST_PERCENTILES)
        if hi <= lo:
            lo, hi = float(sample.min()), float(sample.max())
        return float(lo), float(hi)
    order = np.argsort(values, kind="stable")
    sorted_values, cumulative = values[order], np.cumsum(counts[order])
    total = cumulative[-1]
    lo, hi = (
        sorted_values[min(len(order) - 1, int(np.searchsorted(cumulative, q / 100.0 * total, side="left")))]
        for q in _ROBUST_PERCENTILES
    )
    if hi <= lo:
        present = counts[order] > 0
        lo, hi = sorted_values[present][0], sorted_values[present][-1]
    return float(lo), float(hi)


def _to_unit_range(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    out = arr.astype(np.float32, copy=True) if arr.dtype != np.float32 else arr.copy()
    if hi > lo:
        out -= np.float32(lo)
        out /= np.float32(hi) - np.float32(lo)  # division, so the top of the range lands exactly on 1.0
        np.clip(out, 0.0, 1.0, out=out)
    else:  # a constant image
        out[...] = 0.0
    return out


def _display_transform(path: Path, ds: Dataset, values: np.ndarray, counts: np.ndarray | None) -> np.ndarray:
    """Modality LUT, VOI LUT/window, scaling onto [0, 1] and MONOCHROME1 inversion of ``values`` (stored values;
    with ``counts``, every stored level once and how often it occurs in the image)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values = apply_modality_lut(values, ds)
            voi_range = _voi_output_range(ds)
            if voi_range is not None:
                if ds.get("VOILUTSequence") and values.dtype.kind == "f":
                    values = np.rint(values).astype(np.int64)  # VOI LUTs index with integers
                values = apply_voi_lut(values, ds)
    except Exception as exc:
        raise DicomReadError(path, f"bad Modality/VOI LUT or window ({type(exc).__name__}: {exc})") from None
    lo, hi = voi_range if voi_range is not None else _robust_range(values, counts)
    pixels = _to_unit_range(values, lo, hi)
    if _text(ds, "PhotometricInterpretation").upper() == "MONOCHROME1":
        np.subtract(np.float32(1.0), pixels, out=pixels)
    return pixels


def _affine_fit(levels: np.ndarray, table: np.ndarray) -> tuple[float, float] | None:
    """(a, b) when ``table == clip(a * levels + b, 0, 1)`` (a linear window after a rescale: the usual case), else
    None."""
    inside = np.flatnonzero((table > 0.0) & (table < 1.0))
    if len(inside) < 2:
        return None
    i, j = inside[0], inside[-1]
    if levels[j] == levels[i]:
        return None
    a = (float(table[j]) - float(table[i])) / float(levels[j] - levels[i])
    b = float(table[i]) - a * float(levels[i])
    if np.abs(np.clip(a * levels + b, 0.0, 1.0) - table).max() > 1e-5:
        return None
    return a, b


def _display_function(
    path: Path, ds: Dataset, stored: np.ndarray
) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """``(values, display)`` with ``display(values)`` the display image, and ``display`` elementwise: applied to any
    part of ``values`` (a patch) it gives exactly that part of the display image. Float inputs that are not grey
    levels (block means) are interpolated in the grey-level table."""
    arr = _honour_bits_stored(stored, ds)
    if not (arr.dtype.kind in "iu" and arr.dtype.itemsize <= 2 and arr.size > 65536):
        # No per-level table (percentiles of the whole image set the range): the display image is the value array.
        pixels = _display_transform(path, ds, arr, None)
        return pixels, lambda values: np.asarray(values, dtype=np.float32).copy()
    # Every step is a function of the stored value alone: run pydicom's pipeline once per grey level (at most 65536)
    # rather than in float64 over 12 million pixels, then apply the resulting table to the image: as one float32
    # multiply-add when it is a clipped straight line (rescale + linear window, or a plain stretch), else by lookup.
    first, last = int(arr.min()), int(arr.max())
    levels = np.arange(first, last + 1, dtype=np.int64)
    step = max(1, int(np.sqrt(arr.size / 1_000_000)))  # ~1M samples give the percentiles for files without window
    sample = arr[::step, ::step].ravel()
    if arr.dtype.kind == "u":  # no shifted int64 copy: count from 0 and drop the levels below the minimum
        counts = np.bincount(sample, minlength=last + 1)[first:]
    else:
        counts = np.bincount(sample.astype(np.int64) - first, minlength=len(levels))
    table = _display_transform(path, ds, levels, counts)
    affine = _affine_fit(levels, table)
    if affine is None:

        def lookup(values: np.ndarray) -> np.ndarray:
            values = np.asarray(values)
            if values.dtype.kind == "f":
                return np.interp(values, levels, table).astype(np.float32)
            return table[values.astype(np.intp) - first]

        return arr, lookup
    slope, intercept = affine
    # Written as slope * (x - zero_level), with zero_level rid of float noise (it is usually a whole or half grey
    # level), so the bottom of the range maps exactly onto 0.0.
    zero_level = np.float32(round(-intercept / slope, 6))

    def window(values: np.ndarray) -> np.ndarray:
        out = np.subtract(values, zero_level, dtype=np.float32)  # convert and shift in one pass
        out *= np.float32(slope)
        np.clip(out, 0.0, 1.0, out=out)
        return out

    return arr, window


def _display_pixels(path: Path, ds: Dataset, stored: np.ndarray) -> np.ndarray:
    values, display = _display_function(path, ds, stored)
    return display(values)
