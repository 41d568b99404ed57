"""Synthetic but realistic DICOM mammograms for the demo and the tests.

An image is composed in display intensity (float in [0, 1], tissue bright) and then stored the way a scanner would:

* a half-ellipse of breast tissue against the chest-wall side (left image edge for laterality ``L``, right edge for
  ``R``, as in CBIS-DDSM), darker towards the skin line where the breast is thinner, with fibroglandular texture
  (band-passed noise at several scales) and, for MLO views, a bright pectoral-muscle triangle in the upper chest-wall
  corner;
* lesions: a class name containing "calc" gives a cluster of bright specks, "malignant" a spiculated mass, anything
  else a smooth round mass;
* a dark, slightly noisy background and burned-in text (a 5×7 bitmap font, e.g. ``L CC``) in the top corner away from
  the chest wall: bright, and a separate connected component from the breast, like the view labels of scanned films;
* stored values span 10–90 % of the ``BitsStored`` range, with WindowCenter/Width that map them back exactly;
  MONOCHROME1 stores inverted values; RLE Lossless through ``Dataset.compress``.

Identifiers are planted on purpose (PatientName/ID, birth date, study date, accession number, institution, UIDs) so
privacy tests can assert that none of them reaches an output.

:func:`breast_region` returns the exact tissue mask of an image written with the same size, laterality and view.

Longer than 500 lines because the 5×7 bitmap font of the burned-in labels is a 45-line table; without it the module
is about 475 lines, one seeded generator (anatomy, lesions, labels, DICOM encodings, the demo archive).
"""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom
import scipy.fft
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid
from scipy import ndimage as ndi

__all__ = [
    "write_synthetic_mammogram",
    "make_demo_archive",
    "breast_region",
    "render_mammogram",
    "text_region",
    "DIGITAL_MAMMOGRAPHY_FOR_PRESENTATION",
    "LABELS_CSV_HEADER",
]

#: SOP Class UID of "Digital Mammography X-Ray Image Storage - For Presentation".
DIGITAL_MAMMOGRAPHY_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
#: Header of the labels CSV written by :func:`make_demo_archive`.
LABELS_CSV_HEADER = ("image", "class", "center_x", "center_y", "radius")

Lesion = tuple[int, int, int, str]  # (center_y, center_x, radius_px, class_name)

# 5x7 bitmap font, one string of 7 rows (5 columns each) per glyph.
_FONT = {
    "A": "01110 10001 10001 11111 10001 10001 10001",
    "B": "11110 10001 10001 11110 10001 10001 11110",
    "C": "01110 10001 10000 10000 10000 10001 01110",
    "D": "11110 10001 10001 10001 10001 10001 11110",
    "E": "11111 10000 10000 11110 10000 10000 11111",
    "F": "11111 10000 10000 11110 10000 10000 10000",
    "G": "01110 10001 10000 10111 10001 10001 01111",
    "H": "10001 10001 10001 11111 10001 10001 10001",
    "I": "01110 00100 00100 00100 00100 00100 01110",
    "J": "00111 00010 00010 00010 00010 10010 01100",
    "K": "10001 10010 10100 11000 10100 10010 10001",
    "L": "10000 10000 10000 10000 10000 10000 11111",
    "M": "10001 11011 10101 10101 10001 10001 10001",
    "N": "10001 11001 10101 10011 10001 10001 10001",
    "O": "01110 10001 10001 10001 10001 10001 01110",
    "P": "11110 10001 10001 11110 10000 10000 10000",
    "Q": "01110 10001 10001 10001 10101 10010 01101",
    "R": "11110 10001 10001 11110 10100 10010 10001",
    "S": "01111 10000 10000 01110 00001 00001 11110",
    "T": "11111 00100 00100 00100 00100 00100 00100",
    "U": "10001 10001 10001 10001 10001 10001 01110",
    "V": "10001 10001 10001 10001 10001 01010 00100",
    "W": "10001 10001 10001 10101 10101 10101 01010",
    "X": "10001 10001 01010 00100 01010 10001 10001",
    "Y": "10001 10001 01010 00100 00100 00100 00100",
    "Z": "11111 00001 00010 00100 01000 10000 11111",
    "0": "01110 10001 10011 10101 11001 10001 01110",
    "1": "00100 01100 00100 00100 00100 00100 01110",
    "2": "01110 10001 00001 00010 00100 01000 11111",
    "3": "11110 00001 00001 01110 00001 00001 11110",
    "4": "00010 00110 01010 10010 11111 00010 00010",
    "5": "11111 10000 11110 00001 00001 10001 01110",
    "6": "00110 01000 10000 11110 10001 10001 01110",
    "7": "11111 00001 00010 00100 01000 01000 01000",
    "8": "01110 10001 10001 01110 10001 10001 01110",
    "9": "01110 10001 10001 01111 00001 00010 01100",
    "-": "00000 00000 00000 11111 00000 00000 00000",
    " ": "00000 00000 00000 00000 00000 00000 00000",
}


# --------------------------------------------------------------------------------------------------------------------
# Geometry


def _check_laterality(laterality: str) -> str:
    lat = laterality.strip().upper()[:1]
    if lat not in ("L", "R"):
        raise ValueError(f"laterality must be 'L' or 'R', got {laterality!r}")
    return lat


def _ellipse_params(size: tuple[int, int], view: str) -> tuple[float, float, float, float]:
    """(center_y, radius_y, radius_x, pectoral) of the breast half-ellipse; pectoral > 0 for MLO views."""
    h, w = size
    if view.upper() in ("MLO", "ML", "LM", "LMO", "SIO"):
        return 0.55 * h, 0.45 * h, 0.60 * w, 1.0
    return 0.50 * h, 0.42 * h, 0.64 * w, 0.0


def _normalised_radius(size: tuple[int, int], laterality: str, view: str) -> np.ndarray:
    """Elliptical radius (0 at the chest-wall centre, 1 on the skin line) for every pixel."""
    h, w = size
    cy, ry, rx, _ = _ellipse_params(size, view)
    yy = (np.arange(h, dtype=np.float32)[:, None] - cy) / ry
    xx = np.arange(w, dtype=np.float32)[None, :]
    if _check_laterality(laterality) == "R":
        xx = (w - 1) - xx
    xx = xx / rx
    return np.sqrt(yy * yy + xx * xx)


def breast_region(size: tuple[int, int] = (768, 512), laterality: str = "L", view: str = "CC") -> np.ndarray:
    """The exact tissue mask (bool [H, W]) of a synthetic image of this size, laterality and view."""
    return _normalised_radius(size, laterality, view) <= 1.0


def _pectoral_depth(size: tuple[int, int], laterality: str) -> np.ndarray:
    """Horizontal distance (pixels) inside the pectoral-muscle triangle of an MLO view, negative outside: the
    triangle starts 0.45 w wide at the top of the chest wall and ends 0.5 h down it."""
    h, w = size
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    if laterality == "R":
        xx = (w - 1) - xx
    return 0.45 * w * (1.0 - yy / (0.5 * h)) - xx


def _pectoral_mask(size: tuple[int, int], laterality: str, view: str) -> np.ndarray:
    if not _ellipse_params(size, view)[3]:
        return np.zeros(size, dtype=bool)
    return (_pectoral_depth(size, laterality) > 0) & breast_region(size, laterality, view)


def _glyph_scale(size: tuple[int, int]) -> int:
    return max(2, size[0] // 128)


def text_region(
    size: tuple[int, int] = (768, 512), laterality: str = "L", text: str = "L CC"
) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) pixel box of the burned-in text: top corner on the side away from the chest wall."""
    h, w = size
    scale = _glyph_scale(size)
    text_w = len(text) * 6 * scale - scale
    text_h = 7 * scale
    top = max(1, int(0.03 * h))
    margin = max(1, int(0.03 * w))
    left = w - margin - text_w if _check_laterality(laterality) == "L" else margin
    left = max(0, left)
    return top, left, min(h, top + text_h), min(w, left + text_w)


def _draw_text(img: np.ndarray, text: str, top: int, left: int, scale: int, value: float) -> None:
    x = left
    for char in text.upper():
        glyph = _FONT.get(char)
        if glyph is None:
            glyph = "11111 10001 10001 10001 10001 10001 11111"  # unknown character: a box
        bitmap = np.array([[c == "1" for c in row] for row in glyph.split()], dtype=bool)
        block = np.kron(bitmap, np.ones((scale, scale), dtype=bool))
        y1, x1 = min(img.shape[0], top + block.shape[0]), min(img.shape[1], x + block.shape[1])
        if x < img.shape[1] and top < img.shape[0]:
            region = img[top:y1, x:x1]
            region[block[: y1 - top, : x1 - x]] = value
        x += 6 * scale


# --------------------------------------------------------------------------------------------------------------------
# Rendering


def _texture(rng: np.random.Generator, size: tuple[int, int], bands: Sequence[tuple[float, float]]) -> np.ndarray:
    """Sum of band-limited noises: ``weight`` × white noise low-passed by a Gaussian of ``sigma`` and scaled to unit
    variance, made with one single-precision FFT: fibroglandular-looking texture in milliseconds."""
    h, w = size
    spectrum = scipy.fft.rfft2(rng.standard_normal(size, dtype=np.float32))
    fy2 = np.fft.fftfreq(h).astype(np.float32) ** 2
    fx2 = np.fft.rfftfreq(w).astype(np.float32) ** 2
    total = np.zeros((h, len(fx2)), dtype=np.float32)
    for sigma, weight in bands:
        a = np.float32(2.0 * np.pi**2 * sigma**2)
        gy, gx = np.exp(-a * fy2), np.exp(-a * fx2)  # the Gaussian's transfer function is separable
        # Parseval: variance of filtered unit white noise = mean of |gain|^2 over the full spectrum.
        full_x = np.concatenate([gx, gx[1 : (w + 1) // 2][::-1]])
        variance = float((gy**2).sum() * (full_x**2).sum()) / (h * w)
        total += np.float32(weight / np.sqrt(variance)) * np.outer(gy, gx)
    return scipy.fft.irfft2(spectrum * total, s=size).astype(np.float32, copy=False)


def _draw_lesion(
    img: np.ndarray, rng: np.random.Generator, cy: int, cx: int, radius: int, class_name: str
) -> None:
    h, w = img.shape
    r = max(2, int(radius))
    pad = 2 * r + 4
    y0, y1, x0, x1 = max(0, cy - pad), min(h, cy + pad + 1), max(0, cx - pad), min(w, cx + pad + 1)
    if y0 >= y1 or x0 >= x1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    dist = np.sqrt(dy * dy + dx * dx)
    name = class_name.lower()
    patch = img[y0:y1, x0:x1]
    if "calc" in name:
        n_specks = int(rng.integers(6, 14))
        for _ in range(n_specks):
            ang, rad = rng.uniform(0, 2 * np.pi), r * np.sqrt(rng.uniform(0, 1))
            sy, sx = cy + rad * np.sin(ang), cx + rad * np.cos(ang)
            size = rng.uniform(0.8, 1.8) * max(1.0, r / 12)
            speck = np.exp(-((yy - sy) ** 2 + (xx - sx) ** 2) / (2 * size * size))
            patch += 0.35 * speck
        return
    # Mass: soft-edged blob with a lobulated (benign) or spiculated (malignant) outline.
    angle = np.arctan2(dy, dx)
    phases = rng.uniform(0, 2 * np.pi, size=3)
    outline = r * (1 + 0.08 * np.sin(3 * angle + phases[0]) + 0.05 * np.sin(5 * angle + phases[1]))
    blob = 1.0 / (1.0 + np.exp((dist - outline) / max(1.0, 0.15 * r)))
    patch += 0.22 * blob
    if "malig" in name:
        for _ in range(int(rng.integers(8, 14))):
            theta = rng.uniform(0, 2 * np.pi)
            length = r * rng.uniform(1.4, 2.0)
            along = dx * np.cos(theta) + dy * np.sin(theta)
            across = -dx * np.sin(theta) + dy * np.cos(theta)
            spicule = (along > 0.5 * r) & (along < length) & (np.abs(across) < 1.2 * (1 - along / length) + 0.3)
            patch += 0.06 * spicule * (1 - np.clip(along / length, 0, 1))


def render_mammogram(
    *,
    seed: int = 0,
    size: tuple[int, int] = (768, 512),
    laterality: str = "L",
    view: str = "CC",
    lesions: Sequence[Lesion] = (),
    burned_in_text: str = "L CC",
) -> np.ndarray:
    """The display image (float32 [H, W] in [0, 1], tissue bright) that :func:`write_synthetic_mammogram` stores."""
    lat = _check_laterality(laterality)
    h, w = size
    if h < 32 or w < 32:
        raise ValueError(f"image size must be at least 32x32, got {size}")
    rng = np.random.default_rng(seed)
    radius = _normalised_radius(size, lat, view)
    inside = radius <= 1.0
    thickness = np.sqrt(np.clip(1.0 - radius * radius, 0.0, 1.0))  # compressed breast thins towards the skin line
    scale = min(h, w) / 512.0
    texture = _texture(rng, size, [(2.0 * scale, 0.5), (6.0 * scale, 0.8), (18.0 * scale, 1.0)])
    # Fibroglandular density: smooth texture, denser towards the chest wall, fading into fat near the skin line.
    density = np.clip(0.45 + 0.11 * texture, 0.0, 1.0) * (1.0 - 0.7 * radius.clip(0, 1))
    tissue = 0.12 + 0.38 * thickness**0.7 + 0.38 * density
    img = np.where(inside, tissue, 0.03).astype(np.float32)
    if _ellipse_params(size, view)[3]:  # MLO: pectoral muscle with a soft edge
        soft = np.clip(_pectoral_depth(size, lat) / (6.0 * scale) + 0.5, 0.0, 1.0)
        img += (0.74 + 0.02 * texture - img) * soft * inside
    quantum_noise = rng.normal(0.0, 0.006, size=size).astype(np.float32)
    # Lesions draw from their own generator, so adding one changes nothing outside it.
    lesion_rng = np.random.default_rng([seed, 1])
    for cy, cx, r, class_name in lesions:
        _draw_lesion(img, lesion_rng, int(cy), int(cx), int(r), str(class_name))
    img += quantum_noise
    # Lesions never spill into the background, which is flat like the saturated background of a digital detector
    # (and keeps RLE encoding fast).
    img = np.where(inside, img, 0.03)
    if burned_in_text:
        top, left, _, _ = text_region(size, lat, burned_in_text)
        _draw_text(img, burned_in_text, top, left, _glyph_scale(size), 0.97)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------------------------------------------------
# DICOM writing


def _uid(*parts: object) -> str:
    return generate_uid(entropy_srcs=["dagan-gn synthetic", *map(str, parts)])


def _date(seed: int, *parts: object) -> str:
    digest = int(hashlib.sha256(repr((seed, parts)).encode()).hexdigest()[:8], 16)
    year, month, day = 2005 + digest % 18, 1 + (digest >> 8) % 12, 1 + (digest >> 16) % 28
    return f"{year:04d}{month:02d}{day:02d}"


def write_synthetic_mammogram(
    path: str | os.PathLike,
    *,
    seed: int = 0,
    size: tuple[int, int] = (768, 512),
    laterality: str = "L",
    view: str = "CC",
    photometric: str = "MONOCHROME2",
    bits_stored: int = 16,
    rle: bool = False,
    pixel_spacing_mm: float | None = 0.1,
    patient_id: str = "SYNTH-001",
    patient_name: str = "Doe^Jane",
    lesions: Sequence[Lesion] = (),
    modality: str = "MG",
    burned_in_text: str | None = "L CC",
    window: bool = True,
    study_date: str | None = None,
    accession: str | None = None,
    birth_date: str = "19650412",
    institution: str = "Synthetic General Hospital",
) -> Path:
    """Write one synthetic mammogram as a DICOM file and return its path (parent folders are created).

    Args:
        path: output file.
        seed: makes pixels, UIDs and dates deterministic.
        size: (rows, columns).
        laterality: 'L' (chest wall on the left edge) or 'R' (right edge).
        view: 'CC' or 'MLO' (MLO adds a pectoral muscle); also written to ViewPosition.
        photometric: 'MONOCHROME2' (high = bright) or 'MONOCHROME1' (stored inverted).
        bits_stored: 12, 14 or 16 (BitsAllocated is 16, PixelRepresentation 0).
        rle: store RLE Lossless compressed.
        pixel_spacing_mm: PixelSpacing and ImagerPixelSpacing; None writes neither.
        patient_id, patient_name: identifiers (planted for privacy tests).
        lesions: (center_y, center_x, radius_px, class_name) per lesion, in pixels of this image.
        modality: the Modality tag (e.g. 'CT' to test refusal).
        burned_in_text: text burned into the top corner away from the chest wall; None or '' for none.
        window: write WindowCenter/WindowWidth (without, readers stretch the image's own range).
        study_date, accession: identifiers; derived from ``seed`` when None.
        birth_date, institution: more identifiers that must never reach an output.
    """
    lat = _check_laterality(laterality)
    photometric = photometric.upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, got {photometric!r}")
    if not 8 <= bits_stored <= 16:
        raise ValueError(f"bits_stored must be between 8 and 16, got {bits_stored}")
    view = view.upper()
    if burned_in_text is None:
        burned_in_text = ""
    display = render_mammogram(
        seed=seed, size=size, laterality=lat, view=view, lesions=lesions, burned_in_text=burned_in_text
    )
    max_value = (1 << bits_stored) - 1
    lo, hi = round(0.1 * max_value), round(0.9 * max_value)
    values = display if photometric == "MONOCHROME2" else 1.0 - display
    stored = np.rint(lo + values * (hi - lo)).astype(np.uint16)

    key = (seed, patient_id, lat, view, size)
    study_date = _date(seed, patient_id) if study_date is None else study_date
    accession = f"ACC{int(hashlib.sha256(repr((seed, patient_id)).encode()).hexdigest()[:7], 16):08d}" if (
        accession is None
    ) else accession
    sop_uid = _uid("image", *key)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DIGITAL_MAMMOGRAPHY_FOR_PRESENTATION
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.SOPClassUID = DIGITAL_MAMMOGRAPHY_FOR_PRESENTATION
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
    ds.AccessionNumber = accession
    ds.Modality = modality
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = "dagan-gn synthetic"
    ds.InstitutionName = institution
    ds.ReferringPhysicianName = "Referrer^Rita"
    ds.SeriesDescription = f"{'LEFT' if lat == 'L' else 'RIGHT'} {view}"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = birth_date
    ds.PatientSex = "F"
    ds.BodyPartExamined = "BREAST"
    ds.StudyInstanceUID = _uid("study", seed, patient_id)
    ds.SeriesInstanceUID = _uid("series", seed, patient_id, lat, view)
    ds.StudyID = accession[-6:] or "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["A", "R"] if lat == "L" else ["P", "L"]
    ds.ImageLaterality = lat
    ds.ViewPosition = view
    ds.BurnedInAnnotation = "YES" if burned_in_text else "NO"
    if pixel_spacing_mm is not None:
        ds.PixelSpacing = [f"{pixel_spacing_mm:.6g}", f"{pixel_spacing_mm:.6g}"]
        ds.ImagerPixelSpacing = [f"{pixel_spacing_mm:.6g}", f"{pixel_spacing_mm:.6g}"]
    # Rows, Columns, Bits*, PixelRepresentation, PixelData; keep our deterministic SOP Instance UID.
    ds.set_pixel_data(stored, photometric, bits_stored, generate_instance_uid=False)
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
    if window:
        # DICOM LINEAR window: centre - 0.5 and width - 1 in the formula, so this maps lo..hi exactly onto 0..1.
        ds.WindowCenter = f"{(lo + hi) / 2 + 0.5:.1f}"
        ds.WindowWidth = f"{hi - lo + 1:.1f}"
        ds.VOILUTFunction = "LINEAR"
    if rle:
        ds.compress(RLELossless, generate_instance_uid=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# --------------------------------------------------------------------------------------------------------------------
# Demo archive


def _place_lesions(
    rng: np.random.Generator, size: tuple[int, int], laterality: str, view: str, n: int, class_name: str
) -> list[Lesion]:
    h, _ = size
    radius_map = _normalised_radius(size, laterality, view)
    allowed = (radius_map <= 0.62) & ~ndi.binary_dilation(_pectoral_mask(size, laterality, view), iterations=8)
    border = int(0.1 * min(size))  # lesions (and a patch around them) stay inside the image
    allowed[:border], allowed[-border:], allowed[:, :border], allowed[:, -border:] = False, False, False, False
    ys, xs = np.nonzero(allowed)
    placed: list[Lesion] = []
    for _ in range(200):
        if len(placed) == n or len(ys) == 0:
            break
        k = int(rng.integers(len(ys)))
        cy, cx = int(ys[k]), int(xs[k])
        r = int(round(rng.uniform(0.016, 0.034) * h))
        r = max(r, 3)
        if all((cy - py) ** 2 + (cx - px) ** 2 > (r + pr + 0.03 * h) ** 2 for py, px, pr, _ in placed):
            placed.append((cy, cx, r, class_name))
    return placed


def make_demo_archive(
    out_dir: str | os.PathLike, *, n_patients: int = 6, seed: int = 0, size: tuple[int, int] = (768, 512)
) -> tuple[Path, Path]:
    """Write a small synthetic screening archive and its lesion labels.

    ``out_dir/dicom/<patient id>/<image>`` holds 4 images per patient (L/R × CC/MLO) in a mix of MONOCHROME1/2,
    12/16-bit and RLE/uncompressed, some files without the ``.dcm`` suffix. Patients are 'normal', 'benign' or
    'malignant' in turn (in a seeded order); about three quarters of the images of a benign/malignant patient carry
    1–2 lesions of that class (malignant: spiculated masses or calcification clusters). ``out_dir/labels.csv`` has one
    row per lesion, header ``image,class,center_x,center_y,radius``, with ``image`` relative to the CSV's folder and
    centre/radius in pixels of the stored image. Deterministic given ``seed``.

    Returns:
        (dicom_dir, labels_csv)
    """
    if n_patients < 1:
        raise ValueError(f"n_patients must be at least 1, got {n_patients}")
    out_dir = Path(out_dir)
    dicom_dir = out_dir / "dicom"
    rng = np.random.default_rng(seed)
    kinds = ["normal", "benign", "malignant"]
    order = [kinds[i] for i in rng.permutation(3)]
    rows: list[tuple[str, str, int, int, int]] = []
    image_index = 0
    for p in range(n_patients):
        kind = order[p % 3]
        patient_id = f"DEMO{seed:02d}-{p + 1:04d}"
        patient_name = f"Synthetic^Patient{p + 1:03d}"
        photometric = "MONOCHROME2" if p % 2 == 0 else "MONOCHROME1"
        bits = 16 if (p // 2) % 2 == 0 else 12
        views = [(lat, view) for lat in ("L", "R") for view in ("CC", "MLO")]
        with_lesions = [False] * 4
        if kind != "normal":
            with_lesions = [bool(rng.random() < 0.75) for _ in views]
            if not any(with_lesions):
                with_lesions[int(rng.integers(4))] = True
        for j, ((lat, view), has_lesion) in enumerate(zip(views, with_lesions)):
            lesions: list[Lesion] = []
            if has_lesion:
                n = int(rng.integers(1, 3))
                class_name = kind
                lesions = _place_lesions(rng, size, lat, view, n, class_name)
            name = f"{lat}{view}.dcm" if image_index % 5 != 4 else f"IM{image_index:05d}"
            path = dicom_dir / patient_id / name
            # Half of the malignant findings look like calcification clusters, the rest like spiculated masses.
            render_lesions = [
                (cy, cx, r, "malignant calcification" if kind == "malignant" and rng.random() < 0.5 else c)
                for cy, cx, r, c in lesions
            ]
            write_synthetic_mammogram(
                path,
                seed=seed * 100_003 + image_index,
                size=size,
                laterality=lat,
                view=view,
                photometric=photometric,
                bits_stored=bits,
                rle=image_index % 6 == 0,
                pixel_spacing_mm=0.1 if p % 3 != 2 else 0.07,
                patient_id=patient_id,
                patient_name=patient_name,
                lesions=render_lesions,
                burned_in_text=f"{lat} {view}",
            )
            for cy, cx, r, class_name in lesions:
                rows.append((path.relative_to(out_dir).as_posix(), class_name, cx, cy, r))
            image_index += 1
    labels_csv = out_dir / "labels.csv"
    with open(labels_csv, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(LABELS_CSV_HEADER)
        writer.writerows(rows)
    return dicom_dir, labels_csv
