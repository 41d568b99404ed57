"""The lesion labels CSV of ``dagan extract-patches --labels`` (format documented in ``docs/labels-csv.md``).

One row per lesion. The image is named by ``image`` (a path relative to the CSV's folder, an absolute path, or the
image's SOPInstanceUID) or by ``patient_id`` + ``laterality`` + ``view``. ``class`` is the lesion class (any name,
e.g. ``benign``/``malignant`` or ``mass``/``calcification``). The lesion is given either by ``roi_mask`` (a PNG or
DICOM mask file, nonzero = lesion, same size as the image, path relative to the CSV) or by ``center_x``,
``center_y``, ``radius`` in pixels of the stored image. A row with class ``normal`` and no geometry marks an image
as explicitly lesion-free.

Class table: with a CSV, ``["normal", <lesion classes sorted>]`` (images absent from the CSV are all-normal);
without one, ``["tissue"]``.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dagan_gn.errors import DaganError

__all__ = [
    "LabelsError",
    "Lesion",
    "LabelTable",
    "load_labels",
    "read_roi_mask",
    "NORMAL_CLASS",
    "TISSUE_CLASS",
]

NORMAL_CLASS = "normal"
TISSUE_CLASS = "tissue"
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)+$")
_LATERALITY = {"l": "L", "left": "L", "r": "R", "right": "R"}


class LabelsError(DaganError, ValueError):
    """A labels CSV (or a mask file it names) is unreadable or has a bad row; the message names file and line."""


@dataclass(frozen=True)
class Lesion:
    """One labelled lesion. Geometry in pixels of the stored image (before any resampling).

    Either ``center_yx`` + ``radius`` are set, or ``roi_mask`` names a mask file (see :meth:`resolve`)."""

    class_name: str
    center_yx: tuple[float, float] | None = None
    radius: float | None = None
    roi_mask: Path | None = None
    source: str = ""  # "labels.csv:12", for error messages

    def resolve(self, image_shape: tuple[int, int] | None = None) -> "Lesion":
        """A lesion with ``center_yx``/``radius`` (centroid and enclosing radius of the ROI mask when it has one).

        Raises LabelsError naming the CSV line when the mask is unreadable, empty or of another size than the image.
        """
        if self.roi_mask is None:
            return self
        mask = read_roi_mask(self.roi_mask, self.source)
        if image_shape is not None and tuple(mask.shape) != tuple(image_shape):
            raise LabelsError(
                f"{self.source}: ROI mask {self.roi_mask.name} is {mask.shape[1]}x{mask.shape[0]} but the image is "
                f"{image_shape[1]}x{image_shape[0]}"
            )
        ys, xs = np.nonzero(mask)
        cy, cx = float(ys.mean()), float(xs.mean())
        radius = float(np.sqrt(((ys - cy) ** 2 + (xs - cx) ** 2).max())) + 0.5
        return Lesion(self.class_name, (cy, cx), radius, None, self.source)


def read_roi_mask(path: Path, source: str = "") -> np.ndarray:
    """Read a PNG (or other image) or DICOM ROI mask as bool [H, W] (nonzero = lesion)."""
    where = f"{source}: " if source else ""
    if not path.is_file():
        raise LabelsError(f"{where}ROI mask file {path} does not exist")
    try:
        if path.suffix.lower() in (".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg"):
            from skimage import io as skio

            arr = np.asarray(skio.imread(str(path)))
        else:
            import pydicom

            arr = np.asarray(pydicom.dcmread(str(path)).pixel_array)
    except Exception as exc:  # any decoder error becomes one clear line
        raise LabelsError(f"{where}cannot read ROI mask {path}: {exc}") from exc
    if arr.ndim == 3:
        arr = arr[..., 0] if arr.shape[-1] in (1, 3, 4) else arr[0]
    if arr.ndim != 2:
        raise LabelsError(f"{where}ROI mask {path} is not a 2-D image (shape {arr.shape})")
    mask = arr != 0
    if not mask.any():
        raise LabelsError(f"{where}ROI mask {path} is empty")
    return mask


@dataclass
class LabelTable:
    """Lesions by image, looked up by path, SOPInstanceUID, or (patient id, laterality, view)."""

    csv_path: Path | None
    class_names: list[str]
    by_path: dict[str, list[Lesion]] = field(default_factory=dict)
    by_uid: dict[str, list[Lesion]] = field(default_factory=dict)
    by_patient_view: dict[tuple[str, str, str], list[Lesion]] = field(default_factory=dict)

    @property
    def has_labels(self) -> bool:
        return self.csv_path is not None

    def lookup(self, path: str | os.PathLike, meta: Any) -> list[Lesion]:
        """Lesions of an image (``meta`` needs ``sop_instance_uid``, ``patient_id``, ``laterality``, ``view``).

        Rows matching by several keys are combined; an unlisted image has no lesions."""
        found: list[Lesion] = []
        keys: list[tuple[dict, Any]] = [(self.by_path, _path_key(path))]
        uid = getattr(meta, "sop_instance_uid", "") or ""
        if uid:
            keys.append((self.by_uid, uid))
        side, view = getattr(meta, "laterality", "") or "", (getattr(meta, "view", "") or "").upper()
        # the CSV may use the PatientID as stored or the patient part of it (CBIS-DDSM: P_00173 of
        # Mass-Test_P_00173_LEFT_CC); accept both
        for pid in dict.fromkeys([getattr(meta, "patient_id", "") or "", getattr(meta, "raw_patient_id", "") or ""]):
            if pid:
                keys.append((self.by_patient_view, (pid, side, view)))
        for table, key in keys:
            for lesion in table.get(key, ()):
                if lesion not in found:
                    found.append(lesion)
        return [lesion for lesion in found if lesion.class_name != NORMAL_CLASS]

    def label_of(self, class_name: str) -> int:
        return self.class_names.index(class_name)

    @property
    def num_rows(self) -> int:
        return sum(len(v) for t in (self.by_path, self.by_uid, self.by_patient_view) for v in t.values())


def _path_key(path: str | os.PathLike) -> str:
    return os.path.normcase(os.path.realpath(os.fspath(path)))


def _float(row: dict, name: str, where: str) -> float:
    text = (row.get(name) or "").strip()
    try:
        value = float(text)
    except ValueError:
        raise LabelsError(f"{where}: column {name!r} must be a number, got {text!r}") from None
    if not np.isfinite(value):
        raise LabelsError(f"{where}: column {name!r} must be finite, got {text!r}")
    return value


def load_labels(csv_path: str | os.PathLike | None) -> LabelTable:
    """Parse a labels CSV; ``None`` gives the unlabelled table (single class ``tissue``).

    Raises LabelsError naming the file and line for any bad row (missing image reference, unknown columns mix,
    non-numeric or negative centre/radius, missing ROI mask file)."""
    if csv_path is None:
        return LabelTable(None, [TISSUE_CLASS])
    path = Path(csv_path)
    if not path.is_file():
        raise LabelsError(f"{path}: labels CSV does not exist")
    base = path.resolve().parent
    table = LabelTable(path, [])
    classes: set[str] = set()
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            reader.fieldnames = header
            if not header:
                raise LabelsError(f"{path}: empty labels CSV (expected a header line)")
            has_image = "image" in header
            has_pv = {"patient_id", "laterality", "view"} <= set(header)
            if not (has_image or has_pv):
                raise LabelsError(
                    f"{path}:1: header needs an 'image' column or 'patient_id','laterality','view' columns "
                    f"(has {header})"
                )
            if "class" not in header:
                raise LabelsError(f"{path}:1: header needs a 'class' column (has {header})")
            has_geom = {"center_x", "center_y", "radius"} <= set(header)
            if not (has_geom or "roi_mask" in header):
                raise LabelsError(
                    f"{path}:1: header needs 'roi_mask' or 'center_x','center_y','radius' columns (has {header})"
                )
            for row in reader:
                line = reader.line_num
                where = f"{path}:{line}"
                if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                    continue  # blank line
                if None in row:
                    raise LabelsError(f"{where}: more fields than header columns")
                cls = (row.get("class") or "").strip()
                if not cls:
                    raise LabelsError(f"{where}: empty 'class'")
                roi = (row.get("roi_mask") or "").strip() if "roi_mask" in header else ""
                geom_given = has_geom and any((row.get(c) or "").strip() for c in ("center_x", "center_y", "radius"))
                if cls == NORMAL_CLASS:
                    lesion = Lesion(NORMAL_CLASS, source=where)
                elif roi:
                    mask_path = Path(roi) if Path(roi).is_absolute() else base / roi
                    if not mask_path.is_file():
                        raise LabelsError(f"{where}: ROI mask file {roi} does not exist")
                    lesion = Lesion(cls, roi_mask=mask_path, source=where)
                elif geom_given:
                    cx, cy, r = (_float(row, c, where) for c in ("center_x", "center_y", "radius"))
                    if cx < 0 or cy < 0:
                        raise LabelsError(f"{where}: centre ({cx}, {cy}) must not be negative")
                    if r <= 0:
                        raise LabelsError(f"{where}: radius must be positive, got {r}")
                    lesion = Lesion(cls, (cy, cx), r, source=where)
                else:
                    raise LabelsError(f"{where}: lesion of class {cls!r} needs roi_mask or center_x,center_y,radius")
                image = (row.get("image") or "").strip() if has_image else ""
                if image:
                    candidate = Path(image) if Path(image).is_absolute() else base / image
                    if _UID_RE.match(image) and not candidate.exists():
                        table.by_uid.setdefault(image, []).append(lesion)
                    else:
                        table.by_path.setdefault(_path_key(candidate), []).append(lesion)
                elif has_pv and (row.get("patient_id") or "").strip():
                    lat_text = (row.get("laterality") or "").strip().lower()
                    if lat_text not in _LATERALITY:
                        raise LabelsError(f"{where}: laterality must be L/R/left/right, got {lat_text!r}")
                    view = (row.get("view") or "").strip().upper()
                    if not view:
                        raise LabelsError(f"{where}: empty 'view'")
                    key = ((row.get("patient_id") or "").strip(), _LATERALITY[lat_text], view)
                    table.by_patient_view.setdefault(key, []).append(lesion)
                else:
                    raise LabelsError(f"{where}: no image reference (fill 'image' or 'patient_id','laterality','view')")
                if cls != NORMAL_CLASS:
                    classes.add(cls)
    except UnicodeDecodeError as exc:
        raise LabelsError(f"{path}: not a UTF-8 text CSV ({exc})") from exc
    except csv.Error as exc:
        raise LabelsError(f"{path}: malformed CSV ({exc})") from exc
    table.class_names = [NORMAL_CLASS, *sorted(classes)]
    return table

