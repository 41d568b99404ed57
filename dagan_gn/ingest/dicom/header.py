"""The header of a DICOM mammogram: :class:`ImageMeta` (laterality and view, spacing, identifiers to pseudonymise),
:class:`DicomReadError`, the accepted modalities and the pixel limit, and the parsing of laterality, view and the
patient key (CBIS-DDSM's per-image PatientIDs)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from dagan_gn.errors import DaganError
from dagan_gn.fileio import printable_path


#: Modalities accepted unless the caller allows more (``--allow-modality``).
DEFAULT_MODALITIES: tuple[str, ...] = ("MG",)
#: Put this in ``allow_modalities`` to accept every modality (and files without a Modality tag).
ANY_MODALITY = "*"
#: Largest image decoded unless the caller allows more (Rows x Columns x SamplesPerPixel x frames): a 4.5k x 2.7k
#: film is 12 M pixels; 100 M bounds one decode to about 0.2 GB of uint16 plus the float32 display copy.
DEFAULT_MAX_PIXELS = 100_000_000

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
