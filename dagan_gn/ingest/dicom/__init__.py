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

Modules: ``header`` (:class:`ImageMeta`, :class:`DicomReadError`, laterality/view/patient-key parsing), ``read``
(opening a file safely, header checks, :func:`read_dicom_meta`), ``decode`` (pixel decoding, :func:`read_dicom_raw`,
:func:`read_dicom`), ``voi`` (the display pipeline, steps 2-5), ``resample`` (:func:`resample_to_spacing`),
``discovery`` (:func:`find_dicom_files`). Import the public names from here.
"""

from __future__ import annotations

from dagan_gn.ingest.dicom.decode import RawDicomImage, read_dicom, read_dicom_raw
from dagan_gn.ingest.dicom.discovery import DicomSearch, find_dicom_files, list_dicom_files
from dagan_gn.ingest.dicom.header import (
    ANY_MODALITY,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MODALITIES,
    DicomImage,
    DicomReadError,
    ImageMeta,
    canonical_patient_id,
    parse_laterality_view,
)
from dagan_gn.ingest.dicom.read import read_dicom_meta
from dagan_gn.ingest.dicom.resample import resample_to_spacing, spacing_scales

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
