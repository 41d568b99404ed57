"""Read DICOM mammograms with pydicom into float images in [0, 1] (tissue bright) plus the header fields we need.

The display pipeline follows DICOM PS3.3 C.11 in order:

1. decode the stored values with pydicom's pixel handlers (native, RLE Lossless, and JPEG / JPEG-LS / JPEG 2000 when a
   decoder plugin such as Pillow, pylibjpeg or python-gdcm is installed; otherwise a :class:`DicomReadError` names
   the transfer syntax and the packages that would decode it);
2. keep only the ``BitsStored`` low bits (unused high bits may carry overlays or garbage);
3. Modality LUT / rescale (:func:`pydicom.pixels.apply_modality_lut`);
4. VOI LUT or window (:func:`pydicom.pixels.apply_voi_lut`), mapped onto [0, 1] by the window's output range; without
   a VOI LUT or window, the robust range (0.5th to 99.9th percentile) of the image is stretched onto [0, 1];
5. MONOCHROME1 is inverted so that tissue is always bright.

Steps 3-5 depend on the stored value alone, so they run once per grey level (≤ 65536) and the resulting table is
applied to the image, as one float32 multiply-add when it is a clipped straight line (the usual rescale + linear
window).

Every failure (not DICOM, empty, corrupt, truncated, wrong modality, colour, multi-frame, no pixel data, missing
decoder, more pixels than ``max_pixels``) raises :class:`DicomReadError` with the path and one line saying what is
wrong, so a batch job can log it and go on. The pixel count is checked from the header before anything is decoded, so
a small compressed file that declares a huge image cannot exhaust memory. pydicom's own warnings and log records
(which quote element values, i.e. identifiers, and print decoder tracebacks) never reach the console: they are
re-logged at DEBUG level under this module's logger, with the file name.

Identifiers (patient name and ID, UIDs, accession number, dates) are read into :class:`ImageMeta` only so that
:mod:`dagan_gn.ingest.privacy` can pseudonymise them; nothing in this package writes them out.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi, apply_voi_lut, apply_windowing, get_decoder
from pydicom.tag import Tag

from dagan_gn.errors import DaganError
from dagan_gn.fileio import printable_path

__all__ = [
    "DicomReadError",
    "ImageMeta",
    "DicomImage",
    "read_dicom_meta",
    "read_dicom",
    "read_dicom_raw",
    "RawDicomImage",
    "resample_to_spacing",
    "spacing_scales",
    "list_dicom_files",
    "find_dicom_files",
    "DicomSearch",
    "DEFAULT_MAX_PIXELS",
    "parse_laterality_view",
    "canonical_patient_id",
    "DEFAULT_MODALITIES",
    "ANY_MODALITY",
]

#: Modalities accepted unless the caller allows more (``--allow-modality``).
DEFAULT_MODALITIES: tuple[str, ...] = ("MG",)
#: Put this in ``allow_modalities`` to accept every modality (and files without a Modality tag).
ANY_MODALITY = "*"
#: Largest image decoded unless the caller allows more (Rows x Columns x SamplesPerPixel x frames): a 4.5k x 2.7k
#: film is 12 M pixels; 100 M bounds one decode to about 0.2 GB of uint16 plus the float32 display copy.
DEFAULT_MAX_PIXELS = 100_000_000

log = logging.getLogger(__name__)

_PIXEL_TAGS = {Tag(0x7FE0, 0x0010), Tag(0x7FE0, 0x0008), Tag(0x7FE0, 0x0009)}  # Pixel, Float, Double Float Pixel Data
_DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}
# Names that are DICOM but never an image of a study: DICOMDIR is the media directory of a CD/DVD export.
_SKIP_NAMES = {"DICOMDIR"}

# Mammography view codes (DICOM CID 4014 abbreviations as used in ViewPosition).
_VIEWS = ("CC", "MLO", "ML", "LM", "LMO", "XCCL", "XCCM", "XCC", "FB", "SIO", "AT", "CV", "RL", "RM", "ID")
_VIEW_MEANINGS = {  # ViewCodeSequence CodeMeaning (lower case, punctuation removed) -> abbreviation
    "craniocaudal": "CC",
    "cranio caudal": "CC",
    "mediolateral oblique": "MLO",
    "medio lateral oblique": "MLO",
    "mediolateral": "ML",
    "medio lateral": "ML",
    "lateromedial": "LM",
    "latero medial": "LM",
    "lateromedial oblique": "LMO",
    "exaggerated craniocaudal": "XCC",
    "caudocranial": "FB",
    "from below": "FB",
    "superolateral to inferomedial oblique": "SIO",
    "axillary tail": "AT",
    "cleavage": "CV",
}
_SIDE_WORDS = {"LEFT": "L", "RIGHT": "R", "L": "L", "R": "R"}
_FUSED_TOKEN = re.compile(r"^([LR])(" + "|".join(sorted(_VIEWS, key=len, reverse=True)) + r")$")
# CBIS-DDSM style per-image patient IDs: "Mass-Test_P_00173_LEFT_CC" (and ROI files "..._LEFT_CC_1").
_COLLECTION_PREFIX = re.compile(r"^(?:Mass|Calc)-(?:Training|Test)_", re.IGNORECASE)
_SIDE_VIEW_SUFFIX = re.compile(
    r"[_\-\s](?:LEFT|RIGHT)[_\-\s](?:" + "|".join(_VIEWS) + r")(?:[_\-\s]\d+)?$", re.IGNORECASE
)


class DicomReadError(DaganError):
    """A file that cannot be used as a mammogram: ``path`` is the file and ``reason`` one line saying why."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __str__(self) -> str:
        return f"{printable_path(self.path)}: {self.reason}"

    def __reduce__(self):  # picklable across multiprocessing workers
        return (type(self), (self.path, self.reason))


@dataclass
class ImageMeta:
    """Header fields of one DICOM image.

    ``patient_id`` is the patient key used for pseudonyms and the patient-level split: the PatientID with per-image
    decorations removed (CBIS-DDSM stores one PatientID per image, ``Mass-Test_P_00173_LEFT_CC``; its patient is
    ``P_00173``), so every image of a patient gets the same pseudonym. ``raw_patient_id`` is the tag as stored.
    Identifiers are held here only to be pseudonymised; never write them out.
    """

    patient_id: str
    patient_name: str
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    accession: str
    study_date: str
    modality: str
    laterality: str  # 'L', 'R' or ''
    view: str  # 'CC', 'MLO', ... or ''
    pixel_spacing_mm: tuple[float, float] | None  # (row, column) spacing in mm
    rows: int
    cols: int
    bits_stored: int
    photometric: str
    transfer_syntax: str  # UID
    manufacturer: str
    raw_patient_id: str = ""
    transfer_syntax_name: str = ""


@dataclass
class DicomImage:
    """A decoded mammogram: ``pixels`` float32 [H, W] in [0, 1] with tissue bright, and its header ``meta``."""

    pixels: np.ndarray
    meta: ImageMeta


# --------------------------------------------------------------------------------------------------------------------
# Header parsing


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, None)
    if value is None:
        return ""
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        value = value[0] if len(value) else ""
    return str(value).strip()


def _int(ds: Dataset, keyword: str, default: int = 0) -> int:
    try:
        value = ds.get(keyword, None)
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def _spacing(ds: Dataset) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword, None)
        try:
            if value is not None and len(value) == 2:
                row, col = float(value[0]), float(value[1])
                if row > 0 and col > 0 and np.isfinite(row) and np.isfinite(col):
                    return (row, col)
        except (TypeError, ValueError):
            continue
    return None


def parse_laterality_view(*texts: str) -> tuple[str, str]:
    """Find laterality ('L'/'R'/'') and view ('CC', 'MLO', ... or '') in free text such as a CBIS-DDSM PatientID
    (``Mass-Test_P_00173_LEFT_CC``) or a SeriesDescription (``L CC``, ``RMLO``, ``Left MLO``). Only whole tokens count,
    so an ID that merely contains the letters "CC" is not mistaken for a view. The first text that has a value wins.
    """
    laterality, view = "", ""
    for text in texts:
        if not text:
            continue
        tokens = [t for t in re.split(r"[^A-Z0-9]+", text.upper()) if t]
        for token in tokens:
            fused = _FUSED_TOKEN.match(token)
            if fused:
                laterality = laterality or fused.group(1)
                view = view or fused.group(2)
            elif token in ("LEFT", "RIGHT"):
                laterality = laterality or _SIDE_WORDS[token]
            elif token in _VIEWS and len(token) > 1:
                view = view or token
        # Single letters L/R count only next to a view token ("L CC"), never on their own.
        if not laterality:
            for a, b in zip(tokens, tokens[1:]):
                if a in ("L", "R") and b in _VIEWS:
                    laterality = a
                    break
        if laterality and view:
            break
    return laterality, view


def _view_from_code(ds: Dataset) -> str:
    seq = ds.get("ViewCodeSequence", None)
    if not seq:
        return ""
    meaning = str(seq[0].get("CodeMeaning", "")).lower()
    meaning = re.sub(r"[^a-z ]+", " ", meaning).strip()
    meaning = re.sub(r"\s+", " ", meaning)
    return _VIEW_MEANINGS.get(meaning, "")


def canonical_patient_id(patient_id: str) -> str:
    """The patient part of a PatientID: strips CBIS-DDSM's collection prefix (``Mass-Test_``) and per-image suffix
    (``_LEFT_CC``, ``_RIGHT_MLO_1``) so all images of one patient share one key; other IDs come back stripped of
    surrounding spaces only."""
    pid = patient_id.strip()
    stripped = _SIDE_VIEW_SUFFIX.sub("", pid)
    if stripped != pid:
        stripped = _COLLECTION_PREFIX.sub("", stripped)
    return stripped or pid


def _meta_from_dataset(ds: Dataset) -> ImageMeta:
    raw_pid = _text(ds, "PatientID")
    series_description = _text(ds, "SeriesDescription")
    parsed_lat, parsed_view = parse_laterality_view(raw_pid, series_description, _text(ds, "ProtocolName"))
    laterality = (_text(ds, "ImageLaterality") or _text(ds, "Laterality")).upper()[:1]
    if laterality not in ("L", "R"):
        laterality = parsed_lat
    view = _text(ds, "ViewPosition").upper() or _view_from_code(ds) or parsed_view
    file_meta = getattr(ds, "file_meta", None)
    tsyntax = file_meta.get("TransferSyntaxUID", None) if file_meta is not None else None
    return ImageMeta(
        patient_id=canonical_patient_id(raw_pid),
        patient_name=_text(ds, "PatientName"),
        study_uid=_text(ds, "StudyInstanceUID"),
        series_uid=_text(ds, "SeriesInstanceUID"),
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        accession=_text(ds, "AccessionNumber"),
        study_date=_text(ds, "StudyDate"),
        modality=_text(ds, "Modality").upper(),
        laterality=laterality,
        view=view,
        pixel_spacing_mm=_spacing(ds),
        rows=_int(ds, "Rows"),
        cols=_int(ds, "Columns"),
        bits_stored=_int(ds, "BitsStored", _int(ds, "BitsAllocated")),
        photometric=_text(ds, "PhotometricInterpretation").upper(),
        transfer_syntax=str(tsyntax) if tsyntax else "",
        manufacturer=_text(ds, "Manufacturer"),
        raw_patient_id=raw_pid,
        transfer_syntax_name=tsyntax.name if tsyntax else "",
    )


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


# --------------------------------------------------------------------------------------------------------------------
# Pixels


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


# --------------------------------------------------------------------------------------------------------------------
# Resampling and file discovery


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


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _looks_like_dicom(path: Path) -> bool:
    if path.name in _SKIP_NAMES:
        return False
    if path.suffix.lower() in _DICOM_SUFFIXES:
        return True  # named DICOM: keep it even if broken, so the job reports it instead of ignoring it
    try:
        return pydicom.misc.is_dicom(path)
    except OSError:
        return False


@dataclass
class DicomSearch:
    """What :func:`find_dicom_files` found under the inputs.

    ``files``: the DICOM files, sorted by path, each real file once. ``unreadable``: ``(path, reason)`` of entries named
    like DICOM (or without a suffix) that cannot be opened at all: broken (dangling) or looping symbolic links; a job
    reports each as a skipped file. ``notes``: ``(path, note)`` of what was deliberately not taken twice: a file
    reached again through a symbolic or hard link, a folder link that leads back into a folder already searched.
    """

    files: list[Path] = field(default_factory=list)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    notes: list[tuple[Path, str]] = field(default_factory=list)


def _identity(st: os.stat_result) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)


def _link_problem(path: Path) -> str | None:
    """Why a symbolic link cannot be followed (dangling or looping), or None when it can."""
    try:
        os.stat(path)
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop (the link leads back to itself); nothing to read"
        try:
            target = printable_path(os.readlink(path))
        except OSError:
            target = "?"
        return f"broken symbolic link: its target {target} does not exist"


def find_dicom_files(inputs: Sequence[str | os.PathLike] | str | os.PathLike) -> DicomSearch:
    """The DICOM files under ``inputs``, and the entries that could not be taken (see :class:`DicomSearch`).

    Folders are searched recursively, following symbolic links to folders (each folder is searched once, so a link
    that loops back is noted and not followed again); files given in ``inputs`` are always kept. A file counts when
    its name ends in ``.dcm``/``.dicom``/``.dic`` (kept even when broken, so the extraction job can report it) or when
    it carries the DICOM "DICM" preamble whatever its name. Hidden files and folders (leading dot) and DICOMDIR
    indexes are skipped. The same file reached by two paths (links) is listed once, under its path without links
    when it has one, else the first in sorted order.

    Raises:
        FileNotFoundError: an input path does not exist.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    search = DicomSearch()
    candidates: dict[Path, tuple[int, int]] = {}
    unreadable: dict[Path, str] = {}
    searched: set[tuple[int, int]] = set()
    for item in inputs:
        root = Path(item)
        if root.is_file():
            candidates[root] = _identity(root.stat())
            continue
        if not root.is_dir():
            raise FileNotFoundError(f"input not found: {printable_path(root)}")
        if _identity(root.stat()) in searched:
            continue
        searched.add(_identity(root.stat()))
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            kept = []
            for d in sorted(dirnames):
                if _is_hidden(d):
                    continue
                sub = Path(dirpath) / d
                try:
                    ident = _identity(sub.stat())
                except OSError:
                    continue  # vanished while searching
                if ident in searched:
                    search.notes.append(
                        (sub, "folder link leads into a folder already searched (a loop or a second path); "
                              "not searched again"))
                    continue
                searched.add(ident)
                kept.append(d)
            dirnames[:] = kept
            for name in filenames:
                if _is_hidden(name):
                    continue
                candidate = Path(dirpath) / name
                if candidate.is_symlink():
                    problem = _link_problem(candidate)
                    if problem is not None:
                        suffix = candidate.suffix.lower()
                        if (suffix in _DICOM_SUFFIXES or not suffix) and name not in _SKIP_NAMES:
                            unreadable[candidate] = problem
                        continue
                if candidate.is_file() and _looks_like_dicom(candidate):
                    candidates[candidate] = _identity(candidate.stat())
    first_path: dict[tuple[int, int], Path] = {}
    # Of several paths to one file, keep the one without links (then the first in sorted order): deterministic, and
    # the key of a file does not change when someone adds a link to it.
    for path in sorted(candidates, key=lambda p: (os.path.realpath(p) != os.path.abspath(p), p.as_posix())):
        ident = candidates[path]
        if ident in first_path:
            search.notes.append((path, f"same file as {printable_path(first_path[ident])} (reached through a link); "
                                       "read once"))
            continue
        first_path[ident] = path
        search.files.append(path)
    search.files.sort(key=lambda p: p.as_posix())
    search.unreadable = sorted(unreadable.items(), key=lambda kv: kv[0].as_posix())
    search.notes.sort(key=lambda kv: kv[0].as_posix())
    return search


def list_dicom_files(inputs: Sequence[str | os.PathLike] | str | os.PathLike) -> list[Path]:
    """The DICOM files under ``inputs``, sorted: :attr:`DicomSearch.files` of :func:`find_dicom_files` (which also
    says what could not be taken).

    Raises:
        FileNotFoundError: an input path does not exist.
    """
    return find_dicom_files(inputs).files
