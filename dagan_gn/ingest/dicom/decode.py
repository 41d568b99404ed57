"""Decoding the pixels (pydicom's handlers; a missing decoder plugin is named), keeping the ``BitsStored`` bits, and
the readers :func:`read_dicom_raw` (stored grey levels + the display map) and :func:`read_dicom` (float [0, 1])."""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder

from dagan_gn.ingest.dicom.header import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MODALITIES,
    DicomImage,
    DicomReadError,
    ImageMeta,
    _meta_from_dataset,
)
from dagan_gn.ingest.dicom.read import _as_read_error, _check_header, _read_dataset
from dagan_gn.ingest.dicom.voi import _display_function, _display_pixels


def _pip_names(requirement_text: str) -> list[str]:
    """'pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1' -> ['pylibjpeg', 'pylibjpeg-libjpeg']."""
    _, _, reqs = requirement_text.partition("requires")
    names = []
    for part in re.split(r"\band\b|,", reqs):
        name = re.split(r"[<>=!~ ]", part.strip(), maxsplit=1)[0]
        if name and name != "numpy":
            names.append("python-gdcm" if name == "gdcm" else name)
    return names


def _missing_decoder_reason(ds: Dataset) -> str | None:
    """None when pydicom can decode the transfer syntax now, else a sentence naming it and what to install."""
    tsyntax = ds.file_meta.TransferSyntaxUID
    if not tsyntax.is_compressed:
        return None
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        return f"transfer syntax {tsyntax.name} ({tsyntax}) has no pydicom decoder"
    if decoder.is_available:
        return None
    options = [" + ".join(_pip_names(dep)) for dep in decoder.missing_dependencies]
    options = [o for o in options if o]
    return (
        f"cannot decode transfer syntax {tsyntax.name} ({tsyntax}): no decoder installed; "
        f"pip install one of: {'; '.join(options) or 'a pydicom decoder plugin'}"
    )


def _expected_native_bytes(ds: Dataset) -> int:
    rows, cols = int(ds.Rows), int(ds.Columns)
    bits = int(ds.get("BitsAllocated", 16))
    samples = int(ds.get("SamplesPerPixel", 1))
    return (rows * cols * samples * bits + 7) // 8


def _decode(path: Path, ds: Dataset) -> np.ndarray:
    reason = _missing_decoder_reason(ds)
    if reason:
        raise DicomReadError(path, reason)
    tsyntax = ds.file_meta.TransferSyntaxUID
    if not tsyntax.is_compressed and "PixelData" in ds:
        have, need = len(ds.PixelData), _expected_native_bytes(ds)
        if have < need:
            raise DicomReadError(path, f"pixel data truncated: {have} of {need} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
    except DicomReadError:
        raise
    except Exception as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        message = " ".join(lines) or type(exc).__name__
        lowered = message.lower()
        if any(word in lowered for word in ("truncat", "less than expected", "end of", "insufficient", "eof")):
            raise DicomReadError(path, f"pixel data truncated ({message})") from None
        hint = ""
        if tsyntax.is_compressed:
            with contextlib.suppress(Exception):
                options = [" + ".join(_pip_names(dep)) for dep in get_decoder(tsyntax).missing_dependencies]
                if options:
                    hint = f"; another decoder may handle it: pip install one of: {'; '.join(options)}"
        raise DicomReadError(
            path, f"cannot decode {tsyntax.name} pixel data, corrupt or unsupported ({message}){hint}"
        ) from None
    if arr.ndim != 2:
        raise DicomReadError(path, f"expected a single grey-level frame, got pixel array of shape {arr.shape}")
    return arr


@dataclass
class RawDicomImage:
    """A decoded mammogram before the display conversion: ``values`` [H, W] (stored grey levels, or already the
    display image for files without a per-level table) and ``display``, the elementwise map of any part of
    ``values`` onto what :func:`read_dicom` returns for it (float32 in [0, 1], tissue bright). Block means of
    ``values`` (floats) are mapped by interpolation in the grey-level table."""

    values: np.ndarray
    display: Callable[[np.ndarray], np.ndarray]
    meta: ImageMeta

    def to_image(self) -> DicomImage:
        return DicomImage(pixels=self.display(self.values), meta=self.meta)


def _read_stored(path: Path, allow_modalities, max_pixels: int | None) -> tuple[Dataset, ImageMeta, np.ndarray]:
    ds, has_pixels = _read_dataset(path, header_only=False)
    meta = _meta_from_dataset(ds)
    _check_header(path, ds, meta, allow_modalities, has_pixels, max_pixels)
    stored = _decode(path, ds)
    if stored.shape != (meta.rows, meta.cols):
        raise DicomReadError(path, f"decoded shape {stored.shape} differs from Rows x Columns {meta.rows}x{meta.cols}")
    return ds, meta, stored


def read_dicom_raw(
    path: str | os.PathLike,
    allow_modalities: Sequence[str] | None = DEFAULT_MODALITIES,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> RawDicomImage:
    """Like :func:`read_dicom`, but leaves the display conversion to the caller (``raw.display(part)``), so it can be
    applied to patches only; ``raw.to_image()`` is what :func:`read_dicom` returns.

    Raises:
        DicomReadError: for any file that cannot be used (never another exception for bad input).
    """
    path = Path(path)
    with _as_read_error(path):
        ds, meta, stored = _read_stored(path, allow_modalities, max_pixels)
        values, display = _display_function(path, ds, stored)
    return RawDicomImage(values=values, display=display, meta=meta)


def read_dicom(
    path: str | os.PathLike,
    allow_modalities: Sequence[str] | None = DEFAULT_MODALITIES,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> DicomImage:
    """Decode one DICOM mammogram into float32 [H, W] in [0, 1] with tissue bright (see the module docstring for the
    pipeline).

    Args:
        path: the DICOM file.
        allow_modalities: accepted Modality values; ``None`` or ``("*",)`` accepts all.
        max_pixels: refuse, before decoding, images declaring more pixels (Rows x Columns x samples x frames); None:
            no limit.

    Raises:
        DicomReadError: for any file that cannot be used (never another exception for bad input).
    """
    path = Path(path)
    with _as_read_error(path):
        ds, meta, stored = _read_stored(path, allow_modalities, max_pixels)
        pixels = _display_pixels(path, ds, stored)
    return DicomImage(pixels=pixels, meta=meta)
