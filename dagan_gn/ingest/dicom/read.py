"""Opening a DICOM file safely: checks before reading (zero-size, folders), the header checks (modality, pixel count
declared before decoding, colour, multi-frame), pydicom's warnings and log records kept off the console (re-logged at
DEBUG under ``dagan_gn.ingest.dicom``), and :func:`read_dicom_meta`."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import Tag

from dagan_gn.fileio import printable_path
from dagan_gn.ingest.dicom.header import (
    ANY_MODALITY,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MODALITIES,
    DicomReadError,
    ImageMeta,
    _int,
    _meta_from_dataset,
)


log = logging.getLogger("dagan_gn.ingest.dicom")  # one logger for the whole DICOM reader

_PIXEL_TAGS = {Tag(0x7FE0, 0x0010), Tag(0x7FE0, 0x0008), Tag(0x7FE0, 0x0009)}  # Pixel, Float, Double Float Pixel Data


def _normalise_modalities(allow_modalities: Iterable[str] | None) -> tuple[str, ...] | None:
    if allow_modalities is None:
        return None
    allowed = tuple(m.strip().upper() for m in allow_modalities if m and m.strip())
    if not allowed or ANY_MODALITY in allowed or "ANY" in allowed:
        return None
    return allowed


def _check_header(
    path: Path, ds: Dataset, meta: ImageMeta, allow_modalities, has_pixels: bool, max_pixels: int | None
) -> None:
    if not any(keyword in ds for keyword in ("SOPClassUID", "Modality", "Rows", "PixelData")):
        raise DicomReadError(path, "corrupt or not an image: no SOP Class, Modality, image size or pixel data")
    allowed = _normalise_modalities(allow_modalities)
    if allowed is not None and meta.modality not in allowed:
        if not meta.modality:
            raise DicomReadError(
                path, f"no Modality tag (expected {', '.join(allowed)}); pass --allow-modality '*' to accept it"
            )
        raise DicomReadError(
            path,
            f"modality {meta.modality} is not {' or '.join(allowed)}; pass --allow-modality {meta.modality} "
            "to accept it",
        )
    if not has_pixels:
        sop = ds.get("SOPClassUID", None)
        sop_name = str(getattr(sop, "name", sop or ""))
        if "Rows" in ds or "Image Storage" in sop_name:
            raise DicomReadError(path, f"no pixel data: the {sop_name or 'image'} header ends before it (truncated?)")
        raise DicomReadError(path, f"no pixel data: not an image{f' ({sop_name})' if sop_name else ''}")
    frames = _int(ds, "NumberOfFrames", 1)
    samples = _int(ds, "SamplesPerPixel", 1)
    if max_pixels is not None:
        declared = max(meta.rows, 0) * max(meta.cols, 0) * max(samples, 1) * max(frames, 1)
        if declared > max_pixels:
            raise DicomReadError(
                path,
                f"the header declares {meta.rows}x{meta.cols}"
                f"{f'x{samples} samples' if samples > 1 else ''}{f'x{frames} frames' if frames > 1 else ''} = "
                f"{declared:,} pixels, more than the limit of {max_pixels:,}; not decoded "
                "(raise the limit with --max-pixels if the image is genuine)",
            )
    if frames > 1:
        raise DicomReadError(path, f"multi-frame image ({frames} frames, e.g. tomosynthesis) is not supported")
    if samples == 1 and not meta.photometric:
        raise DicomReadError(path, "no PhotometricInterpretation: mammograms are MONOCHROME1 or MONOCHROME2")
    if samples != 1 or meta.photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DicomReadError(
            path,
            f"colour image (PhotometricInterpretation {meta.photometric or 'missing'}, {samples} samples per pixel) "
            "is not supported: mammograms are MONOCHROME1 or MONOCHROME2",
        )
    if meta.rows <= 0 or meta.cols <= 0:
        raise DicomReadError(path, f"bad image size {meta.rows}x{meta.cols} (Rows/Columns missing or zero)")


def _last_short_element(ds: Dataset) -> tuple[Tag, int, int] | None:
    """(tag, bytes read, bytes declared) of the last element when the file ended inside its value (pydicom keeps the
    short value silently), else None."""
    raw = getattr(ds, "_dict", {})
    if not raw:
        return None
    elem = raw[next(reversed(raw))]
    value, length = getattr(elem, "value", None), getattr(elem, "length", None)
    if isinstance(value, (bytes, bytearray)) and length not in (None, 0xFFFFFFFF) and len(value) < length:
        return Tag(elem.tag), len(value), int(length)
    return None


def _open_checks(path: Path) -> None:
    if not path.exists():
        raise DicomReadError(path, "file not found")
    if path.is_dir():
        raise DicomReadError(path, "is a directory, not a file")
    if path.stat().st_size == 0:
        raise DicomReadError(path, "empty file (0 bytes)")


class _RecordCollector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _pydicom_logs_kept_from_console(path: Path):
    """Hold back pydicom's log records while ``path`` is read: pydicom logs invalid element values (identifiers) and
    full decoder tracebacks, without the file name. The one-line reason of a failure says what matters; the records
    go to this module's logger at DEBUG, prefixed with the file."""
    logger = logging.getLogger("pydicom")
    collector = _RecordCollector()
    propagate = logger.propagate
    logger.addHandler(collector)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(collector)
        logger.propagate = propagate
        for message in collector.messages:
            log.debug("%s: pydicom: %s", printable_path(path), message.splitlines()[0] if message else "")


@contextlib.contextmanager
def _as_read_error(path: Path):
    """Any failure on a file becomes a DicomReadError naming it (odd values in a header can raise anything). pydicom's
    warnings are silenced and its log records kept from the console: they quote element values, i.e. identifiers."""
    try:
        with warnings.catch_warnings(), _pydicom_logs_kept_from_console(path):
            warnings.simplefilter("ignore")
            yield
    except DicomReadError:
        raise
    except MemoryError:
        raise DicomReadError(path, "out of memory while decoding") from None
    except Exception as exc:
        raise DicomReadError(path, f"corrupt or unsupported file ({type(exc).__name__}: {exc})") from None


def _read_dataset(path: Path, header_only: bool) -> tuple[Dataset, bool]:
    """dcmread with clear errors; returns (dataset, has_pixel_data). Header-only reads stop at the pixel data tag and
    remember whether they reached it, so "no pixel data" is known without reading the pixels."""
    _open_checks(path)
    size = path.stat().st_size
    seen: dict = {"pixels": False, "short": None, "fh": None}

    def stop_at_pixels(tag, vr, length) -> bool:
        if tag in _PIXEL_TAGS:
            seen["pixels"] = True
            # Called with the file positioned at the start of the value: a native value longer than what is left of
            # the file means the pixel data is truncated, known without reading it.
            remaining = size - seen["fh"].tell()
            if length != 0xFFFFFFFF and length > remaining:
                seen["short"] = (max(0, remaining), int(length))
            return True
        return False

    def read(force: bool) -> Dataset:
        # pydicom warns about every odd value (we report what matters) and only warns, returning an empty dataset,
        # when a file ends inside encapsulated pixel data: turn that into a clear "truncated".
        with open(path, "rb") as fh, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            seen["fh"] = fh
            if header_only:
                ds = pydicom.filereader.read_partial(fh, stop_when=stop_at_pixels, force=force)
            else:
                ds = pydicom.dcmread(fh, force=force)
        for warning in caught:
            message = str(warning.message)
            if "end of file" in message.lower() or "truncated" in message.lower():
                what = "pixel data" if not header_only and "(FFFE,E0DD)" in message else "file"
                raise DicomReadError(path, f"{what} truncated: {message.split(' in file ')[0]}")
        if len(ds) == 0 and not force:
            raise DicomReadError(path, "file truncated or corrupt: no data elements could be read")
        short = _last_short_element(ds)
        if short is not None:
            tag, have, need = short
            if tag in _PIXEL_TAGS:
                raise DicomReadError(path, f"pixel data truncated: {have} of {need} bytes")
            raise DicomReadError(path, f"file truncated or corrupt: element {tag} runs past the end of the file")
        return ds

    try:
        try:
            ds = read(force=False)
        except InvalidDicomError:
            # No "DICM" preamble: old archives store bare datasets. Accept only what parses into an image header.
            try:
                ds = read(force=True)
            except Exception:
                raise DicomReadError(path, "not a DICOM file (no DICM preamble and not a parseable dataset)") from None
            if "SOPClassUID" not in ds and "Modality" not in ds or "Rows" not in ds:
                raise DicomReadError(path, "not a DICOM file (no DICM preamble and no image header)")
            if getattr(ds, "file_meta", None) is None:
                ds.file_meta = pydicom.dataset.FileMetaDataset()
            if "TransferSyntaxUID" not in ds.file_meta:
                explicit = getattr(ds, "is_implicit_VR", True) is False
                ds.file_meta.TransferSyntaxUID = (
                    pydicom.uid.ExplicitVRLittleEndian if explicit else pydicom.uid.ImplicitVRLittleEndian
                )
    except DicomReadError:
        raise
    except (EOFError, OSError) as exc:
        raise DicomReadError(path, f"file truncated or unreadable ({type(exc).__name__}: {exc})") from None
    except Exception as exc:  # pydicom raises many types for corrupt headers
        raise DicomReadError(path, f"corrupt DICOM header ({type(exc).__name__}: {exc})") from None

    if header_only:
        has_pixels = seen["pixels"]
        if seen["short"] is not None:
            raise DicomReadError(path, "pixel data truncated: {} of {} bytes".format(*seen["short"]))
    else:
        has_pixels = any(tag in ds for tag in _PIXEL_TAGS)
    return ds, has_pixels


def read_dicom_meta(
    path: str | os.PathLike,
    allow_modalities: Sequence[str] | None = DEFAULT_MODALITIES,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> ImageMeta:
    """Read the header of one DICOM image without its pixels (fast) and check it is a usable mammogram.

    Args:
        path: the DICOM file (with or without ``.dcm``).
        allow_modalities: accepted Modality values; ``None`` or ``("*",)`` accepts all.
        max_pixels: refuse images declaring more pixels (Rows x Columns x samples x frames); None: no limit.

    Raises:
        DicomReadError: not DICOM, empty, corrupt header, wrong modality, no pixel data, colour, multi-frame or
            above ``max_pixels``.
    """
    path = Path(path)
    with _as_read_error(path):
        ds, has_pixels = _read_dataset(path, header_only=True)
        meta = _meta_from_dataset(ds)
        _check_header(path, ds, meta, allow_modalities, has_pixels, max_pixels)
    return meta
